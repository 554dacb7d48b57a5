"""Property-based fuzzing of the readers that take untrusted files: the safetensors header, the safetensors
index, config.json, and GGUF metadata. Thousands of generated inputs per run; the only exception allowed is
MlxGemmaError, and a per-example alarm turns a hang into a failure.

The default profile is derandomized (the same inputs on every CI run); HYPOTHESIS_PROFILE=explore draws new
ones, many more: `HYPOTHESIS_PROFILE=explore python -m pytest tests/test_fuzz.py`."""

import json
import os
import signal
import struct
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlxgemma
from mlxgemma import MlxGemmaError
from mlxgemma.checkpoints.loading import read_weights, weight_files
from mlxgemma.models import config_from_dict

pytestmark = pytest.mark.slow  # thousands of generated inputs per reader

settings.register_profile("ci", max_examples=1000, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("explore", max_examples=20000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@contextmanager
def only_clear_errors(seconds: int = 10):
    """Run a reader: returning or raising MlxGemmaError is fine; anything else, or a hang, fails."""
    def expire(signum, frame):
        raise TimeoutError("the reader hung")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    except MlxGemmaError as e:
        assert "\n" not in str(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
sizes = st.one_of(st.integers(1, 64), st.sampled_from([0, -1, 2**31 - 1, 2**31, 10**30]), json_values)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- safetensors headers -----------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "Q4", ""]
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES) | json_values,
    "shape": st.lists(st.integers(-2, 2**33), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 2**34), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.text(min_size=1, max_size=10), entry | json_values, max_size=4) | json_values


@given(header=headers, claimed=st.none() | st.integers(0, 2**64 - 1), tail=st.binary(max_size=96),
       raw=st.none() | st.binary(max_size=64))
def test_safetensors_header(folder, header, claimed, tail, raw):
    body = raw if raw is not None else json.dumps(header).encode()
    n = len(body) if claimed is None else claimed
    for f in folder.glob("*"):
        f.unlink()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + body + tail)
    with only_clear_errors():
        weights = read_weights(folder)
        assert isinstance(weights, dict)


# --- safetensors index -------------------------------------------------------------------------------------

names = st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "a/b.safetensors",
                         "model-00001-of-00002.safetensors", "..", ".", "", "x\x00.safetensors",
                         "C:\\\\model.safetensors"]) | st.text(max_size=20) | json_values


@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=10), names, max_size=4)
                                    | json_values}) | json_values)
def test_safetensors_index(folder, index):
    for f in folder.glob("*"):
        f.unlink()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with only_clear_errors():
        for f in weight_files(folder):
            assert f.parent == folder and f.is_file()


# --- config.json -------------------------------------------------------------------------------------------

FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "head_dim", "max_position_embeddings", "sliding_window", "query_pre_attn_scalar", "sliding_window_pattern"]
OTHER = ["rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "layer_types",
         "architectures", "eos_token_id", "pad_token_id", "hidden_activation", "hidden_act", "tie_word_embeddings",
         "final_logit_softcapping", "attn_logit_softcapping", "quantization", "id2label", "text_config",
         "encoder", "decoder", "partial_rotary_factor", "rope_local_base_freq", "use_bidirectional_attention"]
configs = st.fixed_dictionaries(
    {"model_type": st.sampled_from(["gemma", "gemma2", "gemma3_text", "gemma3", "stablelm", "t5gemma2", "x"])
     | json_values,
     "num_hidden_layers": st.integers(1, 6) | st.sampled_from([0, -3, 1025, 10**12, "2", None])},
    optional={**{k: sizes for k in FIELDS}, **{k: json_values for k in OTHER}})


@given(d=configs | json_values)
def test_config(d):
    with only_clear_errors():
        config_from_dict(d)
        model = mlxgemma.build_model(d)
        model.make_cache()


# --- GGUF metadata -----------------------------------------------------------------------------------------

def _write_gguf(path, arch, meta: dict):
    import gguf

    w = gguf.GGUFWriter(str(path), arch if isinstance(arch, str) else "gemma3")
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if 0 <= value < 2**32 else w.add_int64)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


KEYS = ["{a}.attention.head_count", "{a}.embedding_length", "{a}.block_count", "{a}.feed_forward_length",
        "{a}.attention.key_length", "{a}.attention.head_count_kv", "{a}.context_length", "{a}.rope.freq_base",
        "{a}.attention.layer_norm_rms_epsilon", "{a}.attention.sliding_window", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.model",
        "{a}.rope.scaling.type", "{a}.rope.scaling.factor"]
scalars = (st.integers(-2**40, 2**40) | st.floats(allow_nan=True, width=32) | st.text(max_size=8) | st.booleans())
gguf_values = (scalars | st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5)
               | st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5))


# A complete description, which the drawn keys then override (so that the later readers are reached too).
VALID = {"{a}.attention.head_count": 4, "{a}.embedding_length": 32, "{a}.block_count": 1,
         "{a}.feed_forward_length": 48, "tokenizer.ggml.model": "llama"}


@given(arch=st.sampled_from(["gemma", "gemma2", "gemma3", "llama"]),
       meta=st.dictionaries(st.sampled_from(KEYS), gguf_values, max_size=12)
       | st.dictionaries(st.sampled_from(KEYS), gguf_values, max_size=3).map(lambda d: {**VALID, **d}),
       tokens=st.none() | st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=8),
       flip=st.none() | st.tuples(st.integers(0, 400), st.integers(0, 255)))
def test_gguf_metadata(folder, arch, meta, tokens, flip):
    from mlxgemma.checkpoints.gguf_import import build_tokenizer, eos_ids, open_gguf, read_config

    path = folder / "m.gguf"
    meta = {k.format(a=arch): v for k, v in meta.items()}
    if tokens is not None:
        meta["tokenizer.ggml.tokens"] = tokens
    _write_gguf(path, arch, meta)
    if flip is not None:  # one corrupted byte in the header or metadata
        data = bytearray(path.read_bytes())
        data[flip[0] % len(data)] = flip[1]
        path.write_bytes(bytes(data))
    with only_clear_errors():
        reader = open_gguf(path)
        config = read_config(reader)
        assert isinstance(config["vocab_size"], int)
        eos_ids(reader)
        build_tokenizer(reader)

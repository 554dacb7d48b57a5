"""GGUF import of Gemma 4 (text), from files written as llama.cpp's converter writes them (gguf_fixture:
its metadata keys, tensor names and transforms, its tokenizer export run on a tiny tokenizer.json): every
variant the converter covers against transformers in float32, quantized files against transformers on the
GGUF's own dequantized weights, the tokenizer against the tokenizer.json it came from, and clear errors for
what a Gemma 4 GGUF can say that mlxgemma cannot run."""

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf import quants as gq

import mlxgemma
from gguf_fixture import _gemma4_metadata, converter_hparams, gemma4_tokenizer, write_gemma4_gguf
from mlxgemma import MlxGemmaError
from mlxgemma.checkpoints.gguf_import import open_gguf, read_config
from reference import TOL, WINDOW, hf_logits, max_diff, random_ids
from test_gemma4 import BASE, hf_gemma4

S, F = "sliding_attention", "full_attention"
# The converter asserts a proportional rope on the full layers and writes no rope scaling (nor an activation:
# llama.cpp runs GELU), so the variants keep to what a GGUF can describe.
ROPE = {S: {"rope_type": "default", "rope_theta": 100.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4}}
VARIANTS = {
    "dense": dict(attention_bias=True, tie_word_embeddings=False),
    # 7 layers, the last 3 share keys and values; per-layer inputs
    "E": dict(num_hidden_layers=7, layer_types=[S, F, S, F, S, S, F], num_kv_shared_layers=3,
              hidden_size_per_layer_input=8),
    "wide": dict(num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=4),
    "moe": dict(enable_moe_block=True, num_experts=5, top_k_experts=3, moe_intermediate_size=24),
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    # (the converter writes attention.causal = false, and config.json's window, which the config halves)
    "bidirectional": dict(use_bidirectional_attention="all", hidden_size_per_layer_input=8),
}
# Everything at once, every row a multiple of 32 so that each 2-D and 3-D weight can be a GGUF block type.
QUANTIZABLE = dict(VARIANTS["E"], hidden_size=64, intermediate_size=64, hidden_size_per_layer_input=32,
                   enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                   attention_k_eq_v=True, num_global_key_value_heads=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return gemma4_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _write(tmp_path, tokenizer_dir, overrides, name="m.gguf", **kwargs):
    """(transformers model, GGUF path, {gguf name: transformers name}) of a random tiny Gemma 4."""
    folder, vocab = tokenizer_dir
    given = dict(BASE, rope_parameters=ROPE, vocab_size=vocab, vocab_size_per_layer_input=vocab, **overrides)
    hf = hf_gemma4(**given)
    path = tmp_path / name
    names = write_gemma4_gguf(path, hf, converter_hparams(hf, **given), folder, **kwargs)
    return hf, path, names


def _ids():
    return random_ids(2, int(2.5 * WINDOW))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_f32_matches_transformers(name, tmp_path, tokenizer_dir):
    hf, path, _ = _write(tmp_path, tokenizer_dir, VARIANTS[name])
    model = mlxgemma.load_model(path, dtype="float32")
    ids = _ids()
    assert max_diff(np.array(model(mx.array(ids))), hf_logits(hf, ids)) <= TOL


def test_f32_cached_decoding(tmp_path, tokenizer_dir):
    """The imported E model decodes with its cache (4 owner layers) as transformers runs the whole sequence."""
    hf, path, _ = _write(tmp_path, tokenizer_dir, VARIANTS["E"])
    model = mlxgemma.load_model(path, dtype="float32")
    ids = random_ids(1, 3 * WINDOW)
    cache = model.make_cache()
    assert len(cache) == 4
    out = [np.array(model(mx.array(ids[:, :WINDOW]), cache=cache))]
    out += [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(WINDOW, ids.shape[1])]
    assert max_diff(np.concatenate(out, axis=1), hf_logits(hf, ids)) <= TOL


def test_config_as_read(tmp_path, tokenizer_dir):
    """What the metadata and tensors say, in transformers' Gemma4TextConfig terms."""
    _, path, _ = _write(tmp_path, tokenizer_dir, dict(VARIANTS["wide"], **VARIANTS["k_eq_v"]))
    config = read_config(open_gguf(path))
    assert config["layer_types"] == BASE["layer_types"] and config["num_kv_shared_layers"] == 2
    assert (config["head_dim"], config["global_head_dim"]) == (16, 32)
    assert (config["num_key_value_heads"], config["num_global_key_value_heads"]) == (2, 1)
    assert config["attention_k_eq_v"] and config["use_double_wide_mlp"] and config["intermediate_size"] == 48
    assert config["rope_parameters"] == ROPE
    assert config["hidden_size_per_layer_input"] == 4 and config["final_logit_softcapping"] == 3.0
    assert config["eos_token_id"] == [1, 5, 6]  # <eos>, <turn|>, <|tool_response>


@pytest.mark.parametrize("types", [[T.Q8_0], [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16]],
                         ids=["q8_0", "mixed"])
def test_quantized_is_the_gguf_weights(types, tmp_path, tokenizer_dir):
    """Block tensors are repacked into MLX affine groups as they are: 2-D ones (embeddings included) and the
    3-D experts, which mlxgemma runs quantized. Both give transformers run on the GGUF's dequantized weights."""
    hf, path, names = _write(tmp_path, tokenizer_dir, QUANTIZABLE, types=types)
    model = mlxgemma.load_model(path, dtype="float32")
    bits = {name: m.bits for name, m in model.named_modules() if hasattr(m, "scales")}
    assert set(bits.values()) == ({8} if types == [T.Q8_0] else {4, 5, 8})
    assert "model.embed_tokens_per_layer" in bits and "model.layers.0.self_attn.q_proj" in bits
    assert "model.layers.0.router.proj" not in bits  # the converter keeps the router in F32
    experts = ("model.layers.0.experts.gate_up_proj", "model.layers.6.experts.down_proj")
    assert all(e in bits for e in experts)
    reader = GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors if t.name.endswith("_exps.weight")} <= set(types)
    ref = copy.deepcopy(hf)
    state = {}
    for t in reader.tensors:
        if names[t.name] is not None:
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            state[names[t.name]] = torch.tensor(gq.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    ids = _ids()
    ours, theirs = np.array(model(mx.array(ids))), hf_logits(ref, ids)
    assert max_diff(ours, theirs) <= TOL
    assert max_diff(theirs, hf_logits(hf, ids)) > 10 * TOL  # the file really is quantized


def test_tokenizer_is_the_tokenizer_json(tmp_path, tokenizer_dir):
    """Vocabulary and merges as the converter exported them: the same ids as the tokenizer.json they came
    from (no BOS, as transformers reads these files), control tokens whole, the chat template carried; and
    the same as transformers' own reading of the file."""
    _, path, _ = _write(tmp_path, tokenizer_dir, VARIANTS["dense"])
    _, ours = mlxgemma.load(path)
    original = transformers.AutoTokenizer.from_pretrained(tokenizer_dir[0])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello there", "  two  spaces", "tea at one", "<|turn>user\nhi<turn|>", "ünï <|channel>x"]:
        assert ours.encode(text) == original(text).input_ids == theirs(text).input_ids, text
    messages = [{"role": "user", "content": "hi there"}]
    assert (ours.apply_chat_template(messages, add_generation_prompt=True)
            == original.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ours.eos_token_ids == {1, 5, 6}


def test_convert_writes_a_checkpoint_that_loads(tmp_path, tokenizer_dir):
    """mlxgemma.convert of the GGUF: a config.json in the released form and the same model."""
    hf, path, _ = _write(tmp_path, tokenizer_dir, dict(VARIANTS["E"], **VARIANTS["k_eq_v"]))
    dst = mlxgemma.convert(path, tmp_path / "mlx", dtype="float32")
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["global_head_dim"] == 32
    ids = _ids()
    assert max_diff(np.array(mlxgemma.load_model(dst)(mx.array(ids))), hf_logits(hf, ids)) <= TOL


def test_shared_layers_keys_and_values_are_dropped(tmp_path, tokenizer_dir):
    """A released checkpoint carries k/v projections on its KV-shared layers; the converter keeps them (it
    filters nothing there), transformers and mlxgemma ignore them."""
    extra = {"blk.6.attn_k.weight": np.zeros((32, 32), np.float32), "blk.5.attn_k_norm.weight": np.ones(16, np.float32)}
    hf, path, _ = _write(tmp_path, tokenizer_dir, VARIANTS["E"], replace=extra)
    ids = _ids()
    assert max_diff(np.array(mlxgemma.load_model(path, dtype="float32")(mx.array(ids))), hf_logits(hf, ids)) <= TOL


def _set(key, value):
    def edit(w):
        if value is None:
            w.kv_data[0].pop(f"gemma4.{key}")
        elif isinstance(value, list):
            w.add_array(f"gemma4.{key}", value)
        else:
            w.add_uint32(f"gemma4.{key}", value)
    return edit


UNSUPPORTED = [
    # (variant, edit_metadata, replace, message)
    ("dense", _set("rope.dimension_count_swa", 8), None, "the sliding layers rotate part of their 16-wide heads"),
    ("dense", _set("attention.value_length_swa", 32), None, "differs from the key size"),
    ("dense", _set("attention.sliding_window_pattern", None), None, "expected one boolean per layer"),
    ("dense", _set("attention.head_count_kv", [2, 1, 1, 2, 1]), None, "differs between sliding_attention layers"),
    ("dense", _set("feed_forward_length", [48, 48, 96, 48, 48]), None, "takes one MLP size"),
    ("dense", None, {"rope_freqs.weight": np.array([1, 0.5] + [1e30] * 14, np.float32)},
     "is not llama.cpp's proportional rope"),
    ("moe", _set("expert_used_count", None), None, "expert_used_count missing"),
    ("k_eq_v", None, {"blk.1.attn_v.weight": np.zeros((16, 32), np.float32)}, "some full-attention layers have attn_v"),
    ("dense", _set("block_count", 9), None, "sliding_window_pattern is"),
]


@pytest.mark.parametrize("variant,edit,replace,message", UNSUPPORTED, ids=[m[-1][:40] for m in UNSUPPORTED])
def test_unsupported_files_are_clear_errors(variant, edit, replace, message, tmp_path, tokenizer_dir):
    _, path, _ = _write(tmp_path, tokenizer_dir, VARIANTS[variant], edit_metadata=edit, replace=replace)
    with pytest.raises(MlxGemmaError, match=message):
        mlxgemma.load_model(path)


HOSTILE_KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.key_length_swa",
                "attention.sliding_window_pattern", "attention.shared_kv_layers", "embedding_length_per_layer_input",
                "expert_count", "rope.freq_base", "rope.dimension_count", "attention.sliding_window"]


def test_hostile_metadata_is_a_clear_error(tmp_path):
    """Each key of a complete description replaced by a value of the wrong kind or size: a config or one
    MlxGemmaError, never a traceback (the model is built from what is read)."""
    hf = hf_gemma4(rope_parameters=ROPE)
    hp = converter_hparams(hf, **dict(BASE, rope_parameters=ROPE))
    for key in HOSTILE_KEYS:
        for value in ("x", -1, 2**40, [1.5, 2.5], [True] * 3, 0):
            w = GGUFWriter(str(tmp_path / "h.gguf"), "gemma4")
            _gemma4_metadata(w, hp, ftype=0)
            w.add_token_list(["<pad>", "<eos>", "<bos>"])
            setter = {str: w.add_string, float: w.add_float32, list: w.add_array}.get(type(value), w.add_int64)
            setter(f"gemma4.{key}", value)
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
            try:
                mlxgemma.build_model(read_config(open_gguf(tmp_path / "h.gguf")))
            except MlxGemmaError:
                pass

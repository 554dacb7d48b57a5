"""A corpus of malformed and hostile inputs, across files, the API and the command lines: each is one clear
line (MlxGemmaError in the API, exit 2 on the command line), never a traceback from deep inside, never a
hang, and nothing is lost or left half-written. The readers are also fuzzed (test_fuzz.py)."""

import io
import json
import os
import re
import shutil
import signal
import struct
import sys
import threading
import zlib

import pytest

import mlxgemma
from mlxgemma import MlxGemmaError
from reference import hf_model, save_checkpoint

DROP = object()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(hf_model("gemma3", eos_token_id=1), tmp_path_factory.mktemp("hostile") / "ckpt")


@pytest.fixture
def copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "c")


@pytest.fixture(autouse=True)
def no_hang():
    """A case that would block (a read from a pipe, a runaway loop) fails after 60 s instead of hanging CI."""
    def expire(signum, frame):
        raise TimeoutError("hung")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_line(fn, match):
    with pytest.raises(MlxGemmaError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def edit(path, file="config.json", **changes):
    d = json.loads((path / file).read_text())
    for k, v in changes.items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    (path / file).write_text(json.dumps(d))


# --- config.json values: type and range checked before any arithmetic or MLX call ------------------------

CONFIG_CASES = [
    (dict(model_type=["gemma3_text"]), "model_type must be a string"),
    (dict(model_type=3), "model_type must be a string"),
    (dict(model_type="llama"), "model_type 'llama'; supported"),
    (dict(vocab_size=0), "vocab_size is 0, expected a positive size"),
    (dict(vocab_size=-5), "vocab_size is -5"),
    (dict(hidden_size=0), "hidden_size is 0"),
    (dict(hidden_size=10**30), "hidden_size is 1000000000000000000000000000000, expected a positive size"),
    (dict(hidden_size=2.5), "hidden_size is 2.5, expected an integer"),
    (dict(hidden_size=True), "hidden_size is True, expected an integer"),
    (dict(intermediate_size=float("inf")), "intermediate_size is inf, expected an integer"),
    (dict(num_attention_heads=0), "num_attention_heads is 0"),
    (dict(num_key_value_heads=0), "num_key_value_heads is 0"),
    (dict(num_attention_heads=3), "num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
    (dict(num_hidden_layers=0), "num_hidden_layers is 0"),
    (dict(num_hidden_layers=10**6, layer_types=DROP), "num_hidden_layers 1000000 is more than mlxgemma builds"),
    (dict(head_dim="16"), "head_dim is '16', expected an integer"),
    (dict(head_dim=2**30), "num_attention_heads x head_dim is more than"),
    (dict(sliding_window=0), "sliding_window is 0"),
    (dict(sliding_window=-1), "sliding_window is -1"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps is nan, expected a finite number"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps is -1e-06, expected a positive"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar is 0"),
    (dict(final_logit_softcapping=-3.0), "final_logit_softcapping is -3.0"),
    (dict(max_position_embeddings=0), "max_position_embeddings is 0"),
    (dict(rope_parameters="abc"), "rope_parameters is 'abc', expected an object"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 0},
                           "sliding_attention": {"rope_type": "default"}}), "needs a positive numeric 'factor'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": "x"},
                           "sliding_attention": {"rope_type": "default"}}), "rope_theta is 'x'"),
    (dict(rope_parameters={"full_attention": {"rope_type": ["default"]}}), "rope_type \\['default'\\] is not supported"),
    (dict(rope_scaling="linear"), "rope_scaling is 'linear', expected an object"),
    (dict(rope_local_base_freq="10000"), "rope_local_base_freq is '10000'"),
    (dict(layer_types=DROP, sliding_window_pattern=0), "sliding_window_pattern is 0"),
    (dict(layer_types=DROP, sliding_window_pattern="6"), "sliding_window_pattern is '6'"),
    (dict(layer_types=[1, 2, 3, 4]), "layer_types must be a list of strings"),
    (dict(layer_types="sliding_attention"), "layer_types is 'sliding_attention', expected a list"),
    (dict(architectures="Gemma3ForCausalLM"), "architectures is 'Gemma3ForCausalLM', expected a list"),
    (dict(architectures=[["Gemma3ForCausalLM"]]), "architectures must be a list of strings"),
    (dict(eos_token_id="1"), "eos_token_id is '1', expected a token id or a list"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id is \\[1, 'x'\\]"),
    (dict(eos_token_id=-1), "eos_token_id is -1"),
    (dict(pad_token_id=2**40), "pad_token_id is 1099511627776"),
    (dict(id2label="abc"), "id2label is 'abc', expected an object"),
    (dict(hidden_activation=["gelu"]), "hidden_activation is \\['gelu'\\], expected a string"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings is 'yes', expected true or false"),
    (dict(quantization="4bit"), "quantization is '4bit', expected an object"),
    (dict(quantization={"group_size": 0, "bits": 4}), "quantization.group_size is 0"),
    (dict(quantization={"group_size": 64, "bits": 7}), "quantization.bits is 7"),
    (dict(quantization={"group_size": 64, "bits": 4, "mode": "int4"}), "quantization.mode is 'int4'"),
    (dict(quantization={"group_size": 64, "bits": 4, "model.layers.0.mlp.up_proj": {"group_size": 0, "bits": 4}}),
     "quantization.model.layers.0.mlp.up_proj.group_size is 0"),
]


@pytest.mark.parametrize("changes,match", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_bad_config_values(copy, changes, match):
    edit(copy, **changes)
    one_line(lambda: mlxgemma.load_model(copy), match)


@pytest.mark.parametrize("content,match", [
    (b"", "is not valid JSON"),
    (b"\x89PNG\x00\xff\xfe", "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object, not list"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_type": "gemma3_text"', "is not valid JSON"),
])
def test_unreadable_config_json(copy, content, match):
    (copy / "config.json").write_bytes(content)
    one_line(lambda: mlxgemma.load_model(copy), match)


@pytest.mark.parametrize("d,match", [
    ({"model_type": "gemma3", "text_config": "small"}, "text_config must be an object"),
    ({"model_type": "t5gemma2", "encoder": "x"}, "encoder must be a JSON object"),
    ({"model_type": "t5gemma2", "encoder": {"vision_config": {"patch_size": 0}}}, "patch_size is 0"),
    ({"model_type": "t5gemma2", "encoder": {"mm_tokens_per_image": 0}}, "mm_tokens_per_image is 0"),
    ({"model_type": "t5gemma2", "encoder": {"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}},
     "hidden_size 30 is not a multiple of num_attention_heads 4"),
    ({"model_type": "stablelm", "vocab_size": 9, "hidden_size": 30, "intermediate_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 4, "num_key_value_heads": 4}, "hidden_size 30 is not a multiple"),
    ([], "must be a JSON object"),
])
def test_bad_nested_configs(d, match):
    one_line(lambda: mlxgemma.build_model(d), match)


def test_a_real_eos_list_loads(copy):
    """Released instruction-tuned Gemma 3 configs say "eos_token_id": [1, 106]."""
    edit(copy, eos_token_id=[1, 95])
    _, tokenizer = mlxgemma.load(copy)
    assert {1, 95} <= set(tokenizer.eos_token_ids)


# --- weight files -----------------------------------------------------------------------------------------

def _index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _header(path, header: bytes, tail: bytes = b""):
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + tail)


WEIGHT_CASES = [
    (lambda p: _index(p, {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}), "must be a \\*.safetensors file in"),
    (lambda p: _index(p, {"model.embed_tokens.weight": "/etc/model.safetensors"}), "in the checkpoint folder itself"),
    (lambda p: _index(p, {"model.embed_tokens.weight": "sub/model.safetensors"}), "in the checkpoint folder itself"),
    (lambda p: _index(p, {"model.embed_tokens.weight": "/etc/passwd"}), "'/etc/passwd'"),
    (lambda p: _index(p, {"model.embed_tokens.weight": ["model.safetensors"]}), "weight_map names"),
    (lambda p: _index(p, {"model.embed_tokens.weight": 7}), "weight_map names 7"),
    (lambda p: _index(p, {}), "no weight_map object"),
    (lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": "model.safetensors"}'), "no weight_map"),
    (lambda p: (p / "model.safetensors.index.json").write_bytes(b"\xff\x00"), "is not valid JSON"),
    (lambda p: _index(p, {"model.embed_tokens.weight": "absent.safetensors"}), "names shard\\(s\\) that are not in"),
    (lambda p: _header(p, b"[1, 2, 3]"), "header must be a JSON object, not list"),
    (lambda p: _header(p, b'{"a": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}}', b"\0" * 4), "malformed"),
    (lambda p: _header(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}', b"\0" * 4), "malformed"),
    (lambda p: _header(p, b'{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "malformed"),
    (lambda p: _header(p, b'{"a": 5}'), "malformed header entry"),
    (lambda p: _header(p, b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4), "header lies"),
    (lambda p: _header(p, b"\xff" * 16), "unreadable safetensors header"),
    (lambda p: (p / "model.safetensors").write_bytes(b""), "truncated or not safetensors"),
    (lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 2**60)), "its header claims"),
    (lambda p: ((p / "model.safetensors").unlink(), os.mkfifo(p / "model.safetensors")), "is not a regular file"),
    (lambda p: ((p / "model.safetensors").unlink(), (p / "model.safetensors").mkdir()), "is not a regular file"),
    (lambda p: (p / "config.json").unlink() or os.mkfifo(p / "config.json"), "config.json is not a regular file"),
]


@pytest.mark.parametrize("damage,match", WEIGHT_CASES, ids=[str(i) for i in range(len(WEIGHT_CASES))])
def test_bad_weight_files(copy, damage, match):
    damage(copy)
    one_line(lambda: mlxgemma.load_model(copy), match)


# --- tokenizer and processor files ------------------------------------------------------------------------

@pytest.mark.parametrize("damage,match", [
    (lambda p: (p / "tokenizer.json").write_bytes(b""), "cannot load the tokenizer"),
    (lambda p: (p / "tokenizer.json").write_bytes(os.urandom(256)), "cannot load the tokenizer"),
    (lambda p: (p / "tokenizer_config.json").write_text("{not json"), "tokenizer_config.json is not valid JSON"),
    (lambda p: (p / "special_tokens_map.json").write_text("[]"), "special_tokens_map.json must hold a JSON object"),
    (lambda p: (p / "generation_config.json").write_text('{"eos_token_id": "x"}'),
     "generation_config.json: field eos_token_id is 'x', expected a token id or a list of ids"),
    (lambda p: (p / "generation_config.json").write_text("\x00"), "generation_config.json is not valid JSON"),
    (lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json") if (p / f).exists()],
     "holds no tokenizer"),
])
def test_bad_tokenizer_files(copy, damage, match):
    damage(copy)
    one_line(lambda: mlxgemma.load(copy), match)


@pytest.mark.parametrize("content,match", [
    ("{oops", "preprocessor_config.json is not valid JSON"),
    ('{"image_mean": [0.5, 0.5]}', "image_mean is \\[0.5, 0.5\\]"),
    ('{"image_std": [0, 1, 1]}', "image_std"),
    ('{"size": "large"}', "size is 'large'"),
    ('{"resample": 99}', "resample is 99"),
    ('{"do_normalize": "yes"}', "do_normalize is 'yes'"),
])
def test_bad_preprocessor_config(tmp_path, content, match):
    from mlxgemma.media.processor import T5Gemma2Processor

    (tmp_path / "preprocessor_config.json").write_text(content)
    one_line(lambda: T5Gemma2Processor.from_pretrained(tmp_path, tokenizer=None, config=None), match)


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is one row; Pillow checks the size first)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("make,match", [
    (lambda p: (p / "bomb.png").write_bytes(_png(60_000, 60_000)) and p / "bomb.png", "decompression bomb"),
    (lambda p: p, "is not a regular file"),
    (lambda p: p / "absent.png", "not found"),
    (lambda p: (p / "x.png").write_bytes(b"\x89PNG garbage") and p / "x.png", "not an image file Pillow can read"),
    (lambda p: 42, "an image is a file path or a PIL image, not int"),
])
def test_bad_images(tmp_path, make, match):
    from mlxgemma.media.processor import load_image

    one_line(lambda: load_image(make(tmp_path)), match)


# --- GGUF metadata ----------------------------------------------------------------------------------------

def _gguf(path, arch="gemma3", tokens=True, heads=True):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(48)
    if heads:
        w.add_head_count(4)
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: _gguf(p / "m.gguf", tokens=False), "tokenizer.ggml.tokens is missing"),
    (lambda p: _gguf(p / "m.gguf", heads=False), "gemma3.attention.head_count is missing"),
    (lambda p: _gguf(p / "m.gguf", arch="llama"), "GGUF architecture 'llama' is not supported"),
    (lambda p: (p / "m.gguf").write_bytes(b"GGUF" + os.urandom(64)) and p / "m.gguf", "GGUF"),
    (lambda p: (p / "m.gguf").write_bytes(_gguf(p / "t.gguf").read_bytes()[:40]) and p / "m.gguf", "GGUF"),
])
def test_bad_gguf(tmp_path, make, match):
    one_line(lambda: mlxgemma.load_model(make(tmp_path)), match)


# --- the API ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(ckpt):
    return mlxgemma.load(ckpt)


@pytest.mark.parametrize("prompt,options,match", [
    ([True, 5], {}, "a prompt is text, a list of token ids or a list of chat messages"),
    ([5, "t6"], {}, "a prompt is text"),
    ("t5 \udcff t6", {}, "the prompt is not valid UTF-8 text"),
    ([{"role": "user", "content": "\ud800"}], {}, "a message is not valid UTF-8 text"),
    ([5, 10**9], {}, "token id 1000000000 is outside the vocabulary"),
    ("t5", {"seed": -1}, "--seed must be in 0..2\\^64-1"),
    ("t5", {"seed": 2**64}, "--seed must be in"),
    ("t5", {"max_kv_size": 0}, "--max-kv-size must be positive"),
    ("t5", {"top_k": -1}, "--top-k must be >= 0"),
    ("t5", {"min_p": 2.0}, "--min-p must be in \\[0, 1\\]"),
    ("t5", {"repetition_penalty": 0.0}, "--repetition-penalty must be > 0"),
    ("t5", {"prefill_step_size": 0}, "--prefill-step-size must be positive"),
    ("t5", {"image": "x.png"}, "text-only model: it takes no image"),
])
def test_bad_generation_input(loaded, prompt, options, match):
    model, tokenizer = loaded
    one_line(lambda: mlxgemma.generate(model, tokenizer, prompt, max_tokens=2, chat_template=False, **options), match)


def test_bad_dtype(ckpt):
    one_line(lambda: mlxgemma.load_model(ckpt, dtype="float64"), "dtype 'float64' is not one of auto")


# --- the command lines ------------------------------------------------------------------------------------

def _cli(main, args, capsys, code=2):
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert code != 2 or (err.startswith("error: ") and "\n" not in err and "Traceback" not in err), err
    return err


@pytest.mark.parametrize("args,match", [
    (["--seed", "-1"], "--seed must be in"),
    (["--max-kv-size", "0"], "--max-kv-size must be positive"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--prefill-step-size", "0"], "--prefill-step-size must be positive"),
    (["--prompt", "t5 \udcfe"], "not valid UTF-8 text"),
])
def test_generate_cli_bad_options(ckpt, capsys, args, match):
    from mlxgemma.generate import main

    args = ["--model", str(ckpt), "--ignore-chat-template"] + (args if "--prompt" in args else args + ["--prompt", "t5"])
    assert re.search(match, _cli(main, args, capsys))


@pytest.mark.parametrize("model", ["./typo.gguf", "./nothing-here"])
def test_generate_cli_missing_local_model(capsys, tmp_path, monkeypatch, model):
    """A mistyped local path is one line and exit 2, not a huggingface_hub traceback (exit 1)."""
    from mlxgemma.generate import main

    monkeypatch.chdir(tmp_path)
    assert _cli(main, ["--model", model, "--prompt", "hi"], capsys) == f"error: no such file or directory: {model}"


def test_generate_cli_stdin_not_utf8(ckpt, capsys, monkeypatch):
    from mlxgemma.generate import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"t5 \xff\xfe t6")))
    assert "standard input is not UTF-8 text (byte 3)" in _cli(main, ["--model", str(ckpt), "--prompt", "-"], capsys)


def test_generate_cli_unknown_dtype_is_refused_by_argparse(ckpt, capsys):
    from mlxgemma.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(ckpt), "--prompt", "t5", "--dtype", "float64"])
    assert e.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--temp", "-1"], "--temp must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--top-p", "2"], "--top-p must be in"),
])
def test_chat_refuses_bad_options_before_loading(tmp_path, capsys, monkeypatch, args, match):
    """No model is loaded and no REPL starts: the model path does not even exist."""
    from mlxgemma.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("t5\n"))
    assert re.search(match, _cli(main, ["--model", str(tmp_path / "absent")] + args, capsys))


# --- convert: nothing lost, nothing half-written ----------------------------------------------------------

def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dst,match", [
    (lambda src: src, "overlaps the source"),
    (lambda src: src / "inside", "overlaps the source"),
    (lambda src: src.parent, "overlaps the source"),
])
def test_convert_never_replaces_its_source(copy, capsys, dst, match):
    from mlxgemma.convert import main

    (copy / "notes.txt").write_text("the user's own file")
    before = _snapshot(copy)
    assert re.search(match, _cli(main, ["--hf-path", str(copy), "--mlx-path", str(dst(copy)), "--overwrite"], capsys))
    assert _snapshot(copy) == before


def test_convert_unwritable_targets(copy, tmp_path, capsys):
    from mlxgemma.convert import main

    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "out", "/proc/mlxgemma-out/x"):
        assert "cannot write to" in _cli(main, ["--hf-path", str(copy), "--mlx-path", str(target)], capsys)
    assert (tmp_path / "file").read_text() == "x"


def test_convert_sigterm_leaves_nothing(copy, tmp_path, capsys, monkeypatch):
    """SIGTERM half-way through is handled like Ctrl-C: exit 130, no destination, no hidden .partial folder."""
    import time

    c = sys.modules["mlxgemma.checkpoints.convert"]
    real = c._write_readme

    def slow(*a, **kw):
        real(*a, **kw)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        time.sleep(30)

    monkeypatch.setattr(c, "_write_readme", slow)
    assert sys.modules["mlxgemma.convert"].main(["--hf-path", str(copy), "--mlx-path", str(tmp_path / "out")]) == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_names_from_files_never_break_the_line(copy):
    """A tensor name with line breaks (safetensors keys are arbitrary strings) stays one escaped line."""
    _header(copy, json.dumps({"evil\nname\r": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(),
            b"\0" * 4)
    one_line(lambda: mlxgemma.load_model(copy), r"tensor 'evil\\nname\\r' claims bytes 0..8")
    assert str(MlxGemmaError("a\nb")) == "a\\nb"


@pytest.mark.parametrize("item", [8, 9])  # strings, arrays: the gguf package loops over the count in Python
def test_gguf_count_larger_than_the_file(tmp_path, item):
    """A crafted count (2^60 items of an array) is one clear error at once, not memory filled by the reader."""
    from mlxgemma.checkpoints.gguf_import import open_gguf

    path = tmp_path / "crafted.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
    path.write_bytes(header + struct.pack("<IIQ", 9, item, 2**60) + bytes(64))
    with pytest.raises(MlxGemmaError, match="does not fit"):
        open_gguf(path)

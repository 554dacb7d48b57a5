"""GGUF import: exactly-mapped block types give the GGUF's own weights (the gguf package's dequantization),
the rest are requantized at 8 bits; config, norms and tokenizer read as transformers reads them."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf import quants as gq

import mlxgemma
from gguf_fixture import TYPES, write_gguf
from mlxgemma import MlxGemmaError
from mlxgemma.checkpoints.gguf_import import gguf_family, open_gguf, read_config
from reference import TOL, max_diff

EXACT = [t for t in TYPES if t != T.Q6_K]


def _gguf_reference(path):
    """A float32 model holding the gguf package's own dequantization of every tensor (norms less the 1)."""
    reader = open_gguf(path)
    config = read_config(reader)
    model = mlxgemma.build_model(config)
    weights = {}
    family, _ = gguf_family(reader)
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        value = gq.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        weights[family.gguf_weight_name(t.name)] = mx.array(
            value - 1.0 if t.name.endswith("norm.weight") else value)
    model.load_weights(list(model.sanitize(weights).items()))
    return model


def _ids(n=13, vocab=400):
    return np.random.default_rng(0).integers(3, vocab, (2, n))


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_exact_types_are_the_gguf_weights(family, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", family, types=EXACT)
    model = mlxgemma.load_model(path, dtype="float32")
    quantized = {name: m.bits for name, m in model.named_modules() if hasattr(m, "scales")}
    assert set(quantized.values()) == {4, 5, 8}  # Q4_*, Q5_*, Q8_0 kept as they are, embeddings included
    ids = _ids()
    assert max_diff(np.array(model(mx.array(ids))), np.array(_gguf_reference(path)(mx.array(ids)))) <= TOL


def test_matches_transformers_reading_the_same_file(tmp_path):
    """transformers' own GGUF loader (dequantizing in torch) agrees on Gemma 3: config mapping, norms and
    tensors. (Its Gemma 2 loader ignores the file's softcaps and leaves lm_head untied, so not Gemma 2.)"""
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=EXACT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert max_diff(np.array(mlxgemma.load_model(path)(mx.array(ids))), ref) <= TOL


def test_requantized_types_lose_less_than_their_format(tmp_path):
    """Q6_K (16-wide blocks) does not map: it is requantized at 8 bits in groups of 32. MLX's affine
    rounding errs by at most one 8-bit step of the group's range (it snaps the bias so 0 is exact), and
    that is under half a Q6_K step of the group's coarser sub-block, i.e. under Q6_K's own rounding."""
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=[T.Q6_K])
    model = mlxgemma.load_model(path, dtype="float32")
    reader = open_gguf(path)
    t = next(t for t in reader.tensors if t.tensor_type == T.Q6_K)
    layer = dict(model.named_modules())[gguf_family(reader)[0].gguf_weight_name(t.name).rsplit(".", 1)[0]]
    assert layer.bits == 8 and layer.group_size == 32
    ours = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=8))
    exact = gq.dequantize(t.data, t.tensor_type).reshape(ours.shape)
    err = np.abs(ours - exact).reshape(exact.shape[0], -1, 32).max(-1)
    groups = exact.reshape(exact.shape[0], -1, 32)
    assert np.all(err <= (groups.max(-1) - groups.min(-1)) / 255 * (1 + 1e-4))
    blocks = np.asarray(t.data).reshape(-1, 210)  # Q6_K: ql 128, qh 64, int8 scales 16, fp16 d
    steps = np.abs(blocks[:, 192:208].view(np.int8) * blocks[:, 208:210].copy().view(np.float16).astype(np.float32))
    coarser = steps.reshape(-1, 8, 2).max(-1).reshape(err.shape)
    assert np.all(err <= 0.5 * coarser)


def test_tokenizer_matches_transformers(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=[T.Q8_0])
    _, ours = mlxgemma.load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello there", "  two  spaces", "tea at one", "<start_of_turn>user\nhi<end_of_turn>", "ünï"]:
        assert ours.encode(text) == theirs(text).input_ids, text
    assert ours.eos_token_ids == {1, 5}  # eos and end-of-turn


def test_convert_gguf_keeps_its_size_and_loads_in_mlx_lm(tmp_path):
    import mlx_lm
    from mlx_lm.generate import stream_generate

    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=EXACT, num_hidden_layers=6)  # mlx-lm: 5 to 1
    dst = mlxgemma.convert(path, tmp_path / "mlx")
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and "model.embed_tokens" in config["quantization"]
    gguf_bytes = sum(t.n_bytes for t in open_gguf(path).tensors)
    mlx_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    assert mlx_bytes <= 1.25 * gguf_bytes  # fp16 scale and bias per 32 weights vs GGUF's fp16 d (and min)
    prompt = [2, 40, 41, 42, 43]
    greedy = lambda m, t: [r.token for r in stream_generate(m, t, prompt, max_tokens=8)]  # noqa: E731
    assert greedy(*mlxgemma.load(dst)) == greedy(*mlx_lm.load(str(dst)))


def test_dequantize_and_requantize(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=EXACT)
    dst = mlxgemma.convert(path, tmp_path / "float", dequantize=True, dtype="float32")
    ids = _ids()
    model = mlxgemma.load_model(dst)
    assert not any(hasattr(m, "scales") for _, m in model.named_modules())
    assert max_diff(np.array(model(mx.array(ids))), np.array(_gguf_reference(path)(mx.array(ids)))) <= TOL
    q = mlxgemma.convert(path, tmp_path / "q", quantize=True, q_bits=8, q_group_size=64)
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 8


def test_unsupported_architecture(tmp_path):
    w = GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(MlxGemmaError, match="GGUF architecture 'llama' is not supported \\(supported: gemma"):
        mlxgemma.convert(tmp_path / "llama.gguf", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_unsupported_quant_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=[T.Q8_1])
    with pytest.raises(MlxGemmaError, match="quant type Q8_1, which mlxgemma cannot read"):
        mlxgemma.convert(path, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst.*"))


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(MlxGemmaError, match="is not a readable GGUF file"):
        mlxgemma.load_model(tmp_path / "x.gguf")


def test_no_chat_template_is_invented(tmp_path):
    """A GGUF without tokenizer.chat_template (a pretrained model) gets none: text prompts are fed as written,
    and chat messages are refused, instead of being wrapped in a turn format the model never learned."""
    from mlxgemma.generate import prompt_ids

    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=[T.Q8_0])
    _, tokenizer = mlxgemma.load(path)
    assert not tokenizer.chat_template
    assert tokenizer.decode(prompt_ids(tokenizer, "hi there")) == "<bos>hi there"
    with pytest.raises(MlxGemmaError, match="need a tokenizer with a chat template"):
        prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])


NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # as where torch is not installed
TORCH_NOTICE = "PyTorch was not found"


def _without_torch(code: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])  # this checkout's mlxgemma, not an installed one
    # (mlx-lm and mlx-vlm, once imported here, set TRANSFORMERS_NO_ADVISORY_WARNINGS, and mlx-vlm
    # TRANSFORMERS_VERBOSITY, which would hide the notice there)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + f"sys.path.insert(0, {root!r})\n" + code],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_tokenizer_import_without_torch_notice(tmp_path):
    """transformers logs "PyTorch was not found" when first imported without torch; the GGUF tokenizer (the
    default model's first run) imports it without that notice, which landed inside the progress bar."""
    assert TORCH_NOTICE in _without_torch("import transformers")  # (what a plain import says here)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", types=[T.Q8_0])
    err = _without_torch("from mlxgemma.checkpoints.gguf_import import build_tokenizer, open_gguf\n"
                         f"assert build_tokenizer(open_gguf({str(path)!r})).encode('hi')\n")
    assert TORCH_NOTICE not in err, err

"""Calibrated quantization (calibrate.py, convert --calibrate) on tiny random models of every family: GPTQ with
no correlation between inputs is exactly round-to-nearest (every bit width, MLX's packing); on the calibration
activations the calibrated layers' outputs err less than round-to-nearest at the same bits (measured on the
saved quantized layers, not only the report); token tables are left to -q's search; the checkpoint loads in
mlxgemma and mlx_lm and has the bits per weight asked for (--target-bpw, the budget recipe); every bad input is
one clear error."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.checkpoints import calibrate
from mlxgemma.checkpoints.grids import output_error, pack
from mlxgemma.checkpoints.quantize import layer_specs
from mlxgemma.errors import MlxGemmaError
from reference import hf_model
from structured_util import END_OF_TURN, gemma_like_tokenizer

WIDE = dict(hidden_size=64, intermediate_size=128)  # widths that divide the group size (32)
OPTIONS = dict(quantize=True, q_group_size=32, quant_predicate="uniform", calibrate=True, calibration_seq_len=64,
               calibration_samples=12)


def _checkpoint(family, path, **extra):
    tok = gemma_like_tokenizer()
    if family == "t5gemma2":
        from structured_util import _t5gemma2

        return _t5gemma2(path, 0, text=WIDE)
    overrides = dict(WIDE, vocab_size=len(tok), eos_token_id=[1, END_OF_TURN], **extra)
    if family == "stablelm":
        overrides["head_dim"] = None
    hf_model(family, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_gptq_without_correlation_is_round_to_nearest(bits):
    w = np.random.default_rng(bits).standard_normal((40, 128)).astype(np.float32)
    codes, scales, biases = calibrate.gptq(w, np.eye(128), bits, 64, search=False)
    wq, s, b = mx.quantize(mx.array(w), group_size=64, bits=bits)
    np.testing.assert_array_equal(np.array(pack(mx.array(codes), bits)), np.array(wq))
    np.testing.assert_array_equal(scales, np.array(s))
    np.testing.assert_array_equal(biases, np.array(b))


def _layer_errors(float_model, quantized_model, tokens, paths):
    """Per layer, the summed squared error of its outputs on its own calibration inputs: float weights
    against the saved quantized layer's."""
    H = calibrate.hessians(float_model, tokens, {p: m for p, m in _targets(float_model).items() if p in paths})
    q = dict(quantized_model.named_modules())
    f = dict(float_model.named_modules())
    out = {}
    for p in paths:
        bits, group = q[p].bits, q[p].group_size
        approx = np.array(mx.dequantize(q[p].weight, q[p].scales, q[p].biases, group_size=group, bits=bits))
        out[p] = output_error(np.array(f[p].weight), approx, np.array(H[p]))
    return out


def _targets(model):
    return calibrate.targets(model, layer_specs(model, 4, 32, "uniform"))


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "stablelm", "t5gemma2"])
def test_calibrated_layers_err_less(family, tmp_path):
    src = _checkpoint(family, tmp_path / "src")
    cal = mlxgemma.convert(src, tmp_path / "cal", **dict(OPTIONS, awq=False))  # scaled layers: test_awq.py
    rtn = mlxgemma.convert(src, tmp_path / "rtn", quantize=True, q_group_size=32, quant_predicate="uniform")
    float_model, tok = mlxgemma.load(src)
    tokens = calibrate.calibration_tokens(getattr(tok, "tokenizer", tok), None, 12, 64)
    paths = list(_targets(float_model))
    assert paths and not any("embed" in p for p in paths)  # token tables are -q's
    ours = _layer_errors(float_model, mlxgemma.load_model(cal), tokens, paths)
    plain = _layer_errors(float_model, mlxgemma.load_model(rtn), tokens, paths)
    ratio = sum(ours.values()) / sum(plain.values())
    lower = sum(ours[p] < plain[p] for p in paths)
    assert ratio < 0.85 and lower >= 0.9 * len(paths), (ratio, lower, len(paths))
    config = json.loads((cal / "config.json").read_text())["quantization"]
    if family == "t5gemma2":  # the tower keeps its own setting (8 bits, round-to-nearest; this one's widths: float)
        tower = [v for k, v in config.items() if ".vision_tower." in f".{k}" and isinstance(v, dict)]
        assert all(v["bits"] == 8 for v in tower) and not any(".vision_tower." in p for p in paths)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "stablelm"])
def test_loads_in_mlx_lm_and_meets_the_target(family, tmp_path):
    from mlx_lm.utils import load_model

    extra = dict(num_hidden_layers=6, layer_types=None) if family == "gemma3" else {}
    extra.update(sliding_window=64) if family == "gemma2" else None
    if family != "gemma2":
        extra["tie_word_embeddings"] = False
    src = _checkpoint(family, tmp_path / "src", **extra)
    options = dict(OPTIONS, quant_predicate=None, target_bpw=6.5)  # float32 scales: 4 bits in groups of 32 cost 6
    dst = mlxgemma.convert(src, tmp_path / "q", **options)
    ours, theirs = mlxgemma.load_model(dst), load_model(dst)[0]
    ids = mx.array([[2, 40, 50, 60, 70, 80]])
    tol = 2e-3 if family == "gemma3" else 1e-4  # mlx-lm's Gemma 3 rounds sqrt(hidden_size) to bf16
    assert float(mx.max(mx.abs(ours(ids) - theirs(ids)))) <= tol
    config = json.loads((dst / "config.json").read_text())["quantization"]
    layers = {p: m for p, m in ours.named_modules() if hasattr(m, "scales")}
    spec = {p: config.get(p) or {"bits": config["bits"], "group_size": config["group_size"]} for p in layers}
    assert {v["bits"] for v in spec.values()} >= {4, 5}  # some layers went up
    sizes = {p: m.weight.shape[0] * m.weight.shape[1] * 32 // spec[p]["bits"] for p, m in layers.items()}
    bpw = sum(sizes[p] * (v["bits"] + 2 * 32 / v["group_size"]) for p, v in spec.items()) / sum(sizes.values())
    step = max(sizes.values()) / sum(sizes.values())  # one more layer up a bit would pass the target
    assert 6.5 - step <= bpw <= 6.5 + 1e-9, bpw


def test_builtin_text():
    tok = gemma_like_tokenizer()
    tokens = calibrate.calibration_tokens(tok, "builtin", None, 128)
    assert tokens.shape[0] >= 32 and bool(mx.all(tokens[:, 0] == tok.bos_token_id))
    assert calibrate.BUILTIN.stat().st_size > 20_000


@pytest.mark.parametrize("options, message", [
    (dict(calibrate=True), "add -q"),
    (dict(target_bpw=4.5, quant_predicate=None), "add -q"),
    (dict(quantize=True, target_bpw=4.8), "has its own"),
    (dict(quantize=True, calibration_data="builtin"), "needs --calibrate"),
    (dict(quantize=True, calibrate=True, calibration_samples=0), "must be > 0"),
    (dict(quantize=True, calibrate=True, calibration_seq_len=1), "must be > 0"),
    (dict(quantize=True, calibrate=True, calibration_data="/no/such/file.txt"), "no such file"),
    (dict(quantize=True, calibrate=True, calibration_data="EMPTY"), "fewer than one sample"),
    (dict(quantize=True, calibrate=True, calibration_data="SHORT"), "fewer than one sample"),
    pytest.param(dict(quantize=True, calibrate=True, target_bpw=3.0, quant_predicate=None), "below what",
                 marks=pytest.mark.slow),
])
def test_bad_input(tmp_path, options, message):
    src = _checkpoint("gemma", tmp_path / "src")
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "SHORT").write_text("Hi.")
    if options.get("calibration_data") in ("EMPTY", "SHORT"):
        options = dict(options, calibration_data=str(tmp_path / options["calibration_data"]))
    with pytest.raises(MlxGemmaError, match=message):
        mlxgemma.convert(src, tmp_path / "out", **dict(dict(q_group_size=32, quant_predicate="uniform",
                                                             calibration_seq_len=64), **options))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli(tmp_path, capsys):
    from mlxgemma.convert import main

    src = _checkpoint("gemma3", tmp_path / "src")
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "q"), "-q", "--q-group-size", "32",
                 "--calibrate", "--calibration-samples", "8", "--calibration-seq-len", "64"]) == 0
    assert "round-to-nearest" in capsys.readouterr().err
    mlxgemma.load(tmp_path / "q")
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "r"), "--calibrate"]) == 2
    err = capsys.readouterr().err
    assert "add -q" in err and "Traceback" not in err


@pytest.mark.parametrize("tied", [True, False])
def test_head_hessian_is_of_the_final_hidden_states(tied, tmp_path):
    """The calibration pass never computes logits (a head returns a stand-in, a tied one too), yet an untied
    head's H is that of what it reads: the base model's normed output."""
    src = _checkpoint("gemma3", tmp_path / "src", tie_word_embeddings=tied)
    model, tok = mlxgemma.load(src)
    tokens = calibrate.calibration_tokens(getattr(tok, "tokenizer", tok), None, 3, 64)
    layer = "model.layers.0.mlp.down_proj" if tied else "lm_head"
    H = calibrate.hessians(model, tokens, {layer: dict(model.named_modules())[layer]}, batch_size=2)
    if not tied:
        h = model.model(tokens).reshape(-1, model.config.hidden_size).astype(mx.float32)
        np.testing.assert_allclose(np.array(H[layer]), np.array(h.T @ h), rtol=1e-4, atol=1e-3)
    assert model(tokens[:1]).shape[-1] == model.config.vocab_size  # the model is itself again afterwards

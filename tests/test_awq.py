"""AWQ's input scaling (checkpoints/awq.py, before -q --calibrate's GPTQ): moving any positive channel scales
into the linears and out of the norms (or up_proj's rows) that feed them leaves the float model's logits as
they were, in every family that declares its groups; on a model whose inputs have a few loud channels (as
real Gemma's do) the scales chosen err less than none; --no-awq without --calibrate is one clear error. mlx-lm loading a scaled checkpoint with mlxgemma's logits is
test_calibrate.py's test_loads_in_mlx_lm_and_meets_the_target (scaling is on by default)."""

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.checkpoints import awq, calibrate
from mlxgemma.checkpoints.quantize import layer_specs
from mlxgemma.errors import MlxGemmaError
from test_calibrate import OPTIONS, _checkpoint


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_scaling_keeps_the_float_model(family, tmp_path):
    model = mlxgemma.load_model(_checkpoint(family, tmp_path / "src"), dtype="float32")
    ids = mx.array([[2, 40, 50, 60, 70, 80, 90, 33]])
    before = np.array(model(ids))
    modules, rng = dict(model.named_modules()), np.random.default_rng(0)
    found = awq.groups(model)
    weights = {p: np.array(modules[p].weight) for fold, members in found for p in [fold] + members}
    assert len(found) == 3 * len(model.layers)
    for fold, members in found:
        s = mx.array(np.exp(rng.uniform(-1.5, 1.5, modules[members[0]].weight.shape[1])).astype(np.float32))
        awq.apply(modules, fold, members, s)
    after = np.array(model(ids))
    assert not any(np.allclose(np.array(modules[p].weight), w) for p, w in weights.items())  # every one moved
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()


def _loud(path):
    """A few input channels 16 times louder in every layer's norms, as real Gemma's activations have."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    for k, v in weights.items():
        if k.endswith(("input_layernorm.weight", "pre_feedforward_layernorm.weight")):
            v = v.copy()
            v[[3, 17, 40]] = 15.0  # 1 + w = 16
            weights[k] = v
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_chosen_scales_err_less_than_none(tmp_path):
    """best_scale's promise, on a model with loud channels: for every group, the output error of -q's rounding
    of the scaled weights (what alpha is chosen by) is no more than with no scaling, and less where loud norms
    feed the group. (What it then buys after GPTQ is measured on real weights: docs/convert-and-quantize.md.)"""
    src = _loud(_checkpoint("gemma3", tmp_path / "src"))
    model, tok = mlxgemma.load(src)
    tokens = calibrate.calibration_tokens(tok, None, OPTIONS["calibration_samples"], OPTIONS["calibration_seq_len"])
    specs = layer_specs(model, 4, 32, "uniform")
    H = {p: np.array(h) for p, h in calibrate.hessians(model, tokens, calibrate.targets(model, specs)).items()}
    modules, dtype = dict(model.named_modules()), mx.float32
    for fold, members in awq.groups(model):
        weights = {p: modules[p].weight.astype(mx.float32) for p in members}
        s = awq.best_scale(weights, H, specs, dtype)
        none = sum(awq.rounding_error(w, mx.ones_like(s), H[p], specs[p], dtype) for p, w in weights.items())
        chosen = sum(awq.rounding_error(w, s, H[p], specs[p], dtype) for p, w in weights.items())
        assert chosen <= none
        if fold.endswith("layernorm"):
            assert chosen < 0.95 * none, (fold, chosen, none)


def test_no_awq_needs_calibrate(tmp_path):
    with pytest.raises(MlxGemmaError, match="--no-awq needs --calibrate"):
        mlxgemma.convert(tmp_path / "anything", tmp_path / "out", quantize=True, awq=False)

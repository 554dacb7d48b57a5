"""-q's rounding (grids.py: best_grid, quantize_on, pack): mx.quantize's own grid and packing, bit for bit,
without the search; never more rounding error than round-to-nearest's in any group, and less overall; on
every family the searched checkpoint's layers err less than round-to-nearest's against the float weights
(that mlx-lm loads -q's output and generates our tokens: test_convert); --no-q-search is mlx-lm's
quantize_model bit for bit."""

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.convert import convert
from mlxgemma.checkpoints.grids import best_grid, grid_error, pack, quantize_on
from reference import hf_model, save_checkpoint

CAUSAL = ["gemma", "gemma2", "gemma3", "stablelm"]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_with_nothing_to_search_is_mx_quantize(bits):
    """The grid, the codes on it and their packing are mx.quantize's; pack also against the bit stream
    written out one bit at a time."""
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((16, 128)).astype(np.float32))
    s, b = best_grid(w, mx.ones((128,)), bits, 64, mx.float32, search=False)
    packed, s0, b0 = mx.quantize(w, group_size=64, bits=bits)
    assert mx.array_equal(s, s0) and mx.array_equal(b, b0)
    assert mx.array_equal(quantize_on(w, s, b, bits, 64), packed)
    codes = rng.integers(0, 2 ** bits, (3, 64))
    stream = [(int(c) >> k) & 1 for row in codes for c in row for k in range(bits)]
    words = np.array([sum(bit << k for k, bit in enumerate(stream[i:i + 32])) for i in range(0, len(stream), 32)])
    assert np.array_equal(np.array(pack(mx.array(codes.astype(np.uint32)), bits)).ravel(), words)


def _errors(w, s, b, bits, importance, group_size):
    groups = w.reshape(w.shape[0], -1, group_size)
    return np.array((grid_error(groups, s, b, bits) * importance.reshape(1, -1, group_size)).sum(-1))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_never_worse_than_round_to_nearest(bits):
    """Heavy-tailed weights (a few outliers per group, as trained weights have) and uneven importance."""
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_t(3, (64, 256)).astype(np.float32))
    importance = mx.array(rng.uniform(0.1, 10, 256).astype(np.float32))
    s, b = best_grid(w, importance, bits, 32, mx.float32)
    _, s0, b0 = mx.quantize(w, group_size=32, bits=bits)
    ours, plain = _errors(w, s, b, bits, importance, 32), _errors(w, s0, b0, bits, importance, 32)
    # measured: 0.69x round-to-nearest's error at 3 bits, 0.70x at 4, 0.84x at 8 (before the refits: 0.72, 0.74, 0.91)
    bound = 0.95 if bits == 8 else 0.8
    assert np.all(ours <= plain) and ours.sum() < bound * plain.sum(), ours.sum() / plain.sum()


def _float_and_dequantized(path, float_path):
    floats = dict(mlxgemma.load_model(float_path).named_modules())
    out = {}
    for name, m in mlxgemma.load_model(path).named_modules():
        if hasattr(m, "scales"):
            approx = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            out[name] = float(mx.sum((floats[name].weight.astype(mx.float32) - approx) ** 2))
    return out


@pytest.mark.parametrize("family", CAUSAL)
def test_searched_checkpoint(family, tmp_path):
    from mlx_lm.utils import load_model, quantize_model

    save_checkpoint(hf_model(family, intermediate_size=64), tmp_path / "src")
    float_path = convert(tmp_path / "src", tmp_path / "f")
    options = dict(quantize=True, q_group_size=32, quant_predicate="uniform")
    searched = convert(tmp_path / "src", tmp_path / "s", **options)
    plain = convert(tmp_path / "src", tmp_path / "p", **options, q_search=False)
    ours, rtn = _float_and_dequantized(searched, float_path), _float_and_dequantized(plain, float_path)
    # measured 0.78x round-to-nearest's error on every family, each layer 0.81-0.85x
    assert all(ours[p] <= rtn[p] for p in rtn) and sum(ours.values()) < 0.85 * sum(rtn.values())


    reference, config = load_model(float_path)  # --no-q-search: mlx-lm's own rounding of the same weights
    reference, _ = quantize_model(reference, config, 32, 4)
    mine = dict(mlxgemma.load_model(plain).named_modules())
    for name, m in reference.named_modules():
        if hasattr(m, "scales"):
            for part in ("weight", "scales", "biases"):
                assert mx.array_equal(getattr(mine[name], part), getattr(m, part)), (name, part)

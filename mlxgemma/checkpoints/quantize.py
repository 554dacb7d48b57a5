"""Quantization recipes over mlx-lm's quantize_model (MLX affine groups): "uniform" (every layer at --q-bits)
and mlx-lm's mixed recipes (more bits for v_proj, down_proj and the head in the first, last and every third
layer, llama.cpp Q4_K_M style). At 4 bits the default is mixed_4_6, chosen by measurement on Gemma 3 270M:
perplexity 25.1 at 147 MiB against 28.1 at 144 MiB for uniform 4-bit (README, benchmarks/quality.py). Each
group's grid is then chosen by search (best_grid), not from its min and max: on the 270M, 10% lower
perplexity at the same size (20.41 against 22.65, uniform 4-bit; README)."""

import sys
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# "uniform" and mlx-lm's QUANT_RECIPES (named here, not imported: mlx-lm is imported only when quantizing,
# as importing it imports transformers; a test checks the names against mlx-lm's).
RECIPES = ["uniform", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
# T5Gemma 2's SigLIP tower at 8 bits whatever the language model gets: measured on a random-weight model of
# the real widths (benchmarks/t5gemma2_vision_quant.py, README), 4 bits put 3.3% of error into the image
# features (8 bits: 0.2%) for about 1.5 times the tower's 8-bit saving; 8 bits cost nothing measurable.
VISION_BITS = 8
# best_grid's fractions of a group's min and of its max: 25 grids tried per group.
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)


def default_recipe(bits: int) -> str:
    return "mixed_4_6" if bits == 4 else "uniform"


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, recipe=None,
             vision_bits: Optional[int] = VISION_BITS, overrides: Optional[dict] = None, search: bool = True,
             audio_bits: Optional[int] = VISION_BITS):
    """Quantize in place; returns (model, config with mlx-lm's "quantization" block). Layers whose input
    width does not divide by the group size stay in float, and we say which. A vision tower (T5Gemma 2, Gemma 3)
    is quantized at vision_bits (None: kept in float), an audio tower (Gemma 4 E2B/E4B) at audio_bits, whatever
    the recipe says for the language model; a
    layer the family fixes (model.layer_bits: Gemma 4's router) at its bits. Gemma 4's experts are quantized
    like linears (each projection of every expert, in groups along its input: mixed recipes give down_proj
    their extra bits as they do an MLP's). overrides: {path: {"group_size", "bits", "mode"}} that win over the
    recipe (calibrate.py's choices, which it rounds itself). search: each group's grid by best_grid on the
    weights alone (no calibration), else mlx-lm's round-to-nearest from each group's min and max."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    recipe = recipe or default_recipe(bits)
    view = _LanguageView(model)
    mixed = None if recipe == "uniform" else mixed_quant_predicate_builder(recipe, view, group_size)

    def predicate(path: str, module: nn.Module):
        if overrides and path in overrides:
            return overrides[path]
        if model.in_vision_tower(path):
            tower = audio_bits if model.in_audio_tower(path) else vision_bits
            return False if tower is None else {"group_size": group_size, "bits": tower, "mode": "affine"}
        fixed = model.layer_bits(path, bits)
        if fixed is not None:
            return {"group_size": group_size, "bits": fixed, "mode": "affine"}
        return mixed(view.path(path), module) if mixed else True

    floats = {p: m.weight for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m}
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    if search:
        search_grids(model, {p: w for p, w in floats.items() if p not in (overrides or {})})
    left = [name for name, m in model.named_modules() if hasattr(m, "to_quantized") and not hasattr(m, "scales")
            and not (model.in_vision_tower(name) and (audio_bits if model.in_audio_tower(name) else vision_bits) is None)]
    if left:
        print(f"[mlxgemma] note: {len(left)} layer(s) stay in float (input width not a multiple of "
              f"{group_size}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", file=sys.stderr)
    return model, config


class _LanguageView:
    """What mlx-lm's mixed recipes read of a model (its modules, its layers), without the towers. They take the
    layer index of a module from the place of the first digit in the path of the first down_proj they meet,
    which in a model whose towers come first (EmbeddingGemma 2) is a tower's, at another depth; and they read
    that place in every path, so a module nested as deep outside the layers (EmbeddingGemma 2's
    language_model.ple.per_layer_model_projection) is passed to them by its leaf name, as layer 0."""

    def __init__(self, model):
        self.model, self.layers = model, model.layers
        first = next((n for n, _ in self.named_modules() if "down_proj" in n), "")
        self.at = next((i for i, part in enumerate(first.split(".")) if part.isdigit()), None)

    def named_modules(self):
        return [(n, m) for n, m in self.model.named_modules() if not self.model.in_vision_tower(n)]

    def path(self, path: str) -> str:
        parts = path.split(".")
        if self.at is None or len(parts) <= self.at or parts[self.at].isdigit():
            return path
        return ".".join(parts[: self.at - 1] + parts[-1:])


def best_grid(w: mx.array, importance: mx.array, bits: int, group_size: int, dtype, shrink=SHRINK):
    """Per group of w (out, in): the affine grid (scales, biases (out, in // group_size), in dtype) with the
    least importance-weighted squared rounding error among mx.quantize's own and the grids running from the
    group's min to its max, each end moved toward zero by a fraction in `shrink`. Clipping a group's outliers
    buys resolution for the rest of it (AWQ and llama.cpp's k-quants search their grids the same way); and
    mx.quantize's grid, which moves its scale by up to 1/(2^bits - 1) to put zero on a grid point, is often
    not the best one (on the real 270M, 10% lower perplexity at the same size with every weight alike; with
    calibration's importance and GPTQ, 30%: README, Quality and size). shrink (): mx.quantize's grid."""
    out, n = w.shape
    groups = w.astype(mx.float32).reshape(out, n // group_size, group_size)
    lo, hi = groups.min(-1), groups.max(-1)
    weight = importance.astype(mx.float32).reshape(1, n // group_size, group_size)
    maxq, best = 2 ** bits - 1, None
    grids = [lambda: mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)[1:]]
    grids += [lambda a=a, c=c: (((hi * c - lo * a) / maxq).astype(dtype), (lo * a).astype(dtype))
              for a in shrink for c in shrink]
    for grid in grids:
        s, b = grid()
        err = (_grid_error(groups, s.astype(mx.float32), b.astype(mx.float32), bits) * weight).sum(-1)
        if best is not None:
            better = err < best[0]
            err, s, b = (mx.where(better, new, old) for new, old in zip((err, s, b), best))
        best = (err, s, b)
        mx.eval(best)
    return best[1], best[2]


def _codes(groups: mx.array, s: mx.array, b: mx.array, bits: int) -> mx.array:
    """The nearest codes of groups (out, n_groups, group_size) on the grids b + s * {0 .. 2^bits - 1}."""
    return mx.clip(mx.round((groups - b[..., None]) / mx.where(s == 0, 1.0, s)[..., None]), 0, 2 ** bits - 1)


def _grid_error(groups: mx.array, s: mx.array, b: mx.array, bits: int) -> mx.array:
    """Squared error of rounding groups to those grids."""
    return (_codes(groups, s, b, bits) * s[..., None] + b[..., None] - groups) ** 2


def search_grids(model: nn.Module, floats: Dict[str, mx.array]) -> None:
    """Re-round each quantized (affine) layer of `floats` {path: its float weight} on best_grid's grids,
    every weight counting alike."""
    from tqdm import tqdm

    layers = {p: m for p, m in model.named_modules() if p in floats and getattr(m, "mode", None) == "affine"}
    for p, m in tqdm(layers.items(), desc="[mlxgemma] choosing grids", file=sys.stderr, disable=len(layers) < 8):
        w = floats[p].reshape(-1, floats[p].shape[-1])  # experts (E, out, in): rows of every expert
        s, b = best_grid(w, mx.ones((w.shape[1],)), m.bits, m.group_size, m.scales.dtype)
        codes = _codes(w.astype(mx.float32).reshape(*s.shape, -1), s.astype(mx.float32), b.astype(mx.float32), m.bits)
        packed = pack(np.array(codes.reshape(w.shape).astype(mx.uint32)), m.bits)
        m.weight = mx.array(packed).reshape(m.weight.shape)
        m.scales, m.biases = s.reshape(m.scales.shape), b.reshape(m.biases.shape)
        mx.eval(m.weight, m.scales, m.biases)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(out, in) codes -> MLX's packed (out, in * bits / 32) uint32: each row one little-endian bit stream,
    code i at bits [i * bits, (i + 1) * bits)."""
    out = codes.shape[0]
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(out, -1)
    return np.packbits(stream.reshape(out, -1, 8), axis=-1, bitorder="little").reshape(out, -1).view("<u4")

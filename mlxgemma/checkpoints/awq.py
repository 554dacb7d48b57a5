"""AWQ's input scaling (Lin et al. 2023), before `-q --calibrate`'s GPTQ: the input channels that carry the
most energy on the calibration text get their weight columns multiplied by s > 1 (finer rounding where it
matters most), and whatever feeds those linears divides its outputs by s, so the float model computes the
same function. For each group of linears that read one input (q, k and v after input_layernorm; gate and up
after the MLP's norm; down after up), s = x^alpha with x each channel's RMS on the calibration text, alpha
chosen from ALPHAS by the group's output error after -q's rounding (tr((W - Q) H (W - Q)ᵀ)); alpha 0 is s = 1,
no scaling. Which norm or linear feeds which linears is the family's (a decoder layer's scaling_groups());
families without it (Gemma 3n, Gemma 4, T5Gemma 2, StableLM) are calibrated without scaling.

Ours rather than mlx-lm's `mlx_lm.awq`: its Gemma config feeds activations without Gemma's sqrt(hidden_size)
embedding scale and with no sliding windows, and it runs its own forward per layer. Measured on the real 270M
(docs/convert-and-quantize.md): with GPTQ after it, perplexity 14.75 against 14.78 for GPTQ alone."""

import sys
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .grids import best_grid, codes, output_error

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
FLOOR = 1e-3  # a channel the text never reached is scaled as one at this fraction of the largest's RMS


def scale_inputs(model, H: Dict[str, np.ndarray], specs: Dict[str, dict], dtype):
    """Scale every group of `model`'s calibrated linears (H: their input Hessians, specs: their bits) in
    place; returns ({linear: its scaled weight in float32}, {linear: s}): its columns multiplied by s, so its
    inputs are divided by s and its Hessian is H / (s sᵀ). Round the float32 weights, not the modules' (kept
    in their dtype): the original bf16 weights are exact, W s in bf16 is not, and on the loud channels that
    error, which GPTQ cannot see, outweighs what scaling gains (measured: 15.01 against 14.63)."""
    from tqdm import tqdm

    modules, exact, scaled = dict(model.named_modules()), {}, {}
    for fold, members in tqdm([g for g in groups(model) if all(p in H for p in g[1])],
                              desc="[mlxgemma] AWQ scales", file=sys.stderr):
        weights = {p: exact.get(p, modules[p].weight.astype(mx.float32)) for p in members}
        s = best_scale(weights, H, specs, dtype)
        apply(modules, fold, members, s, exact)
        scaled.update({p: np.array(s) for p in members})
    return {p: np.array(w) for p, w in exact.items()}, scaled


def groups(model) -> list:
    """[(path of what feeds them, [paths of the linears that read it])] over the model's decoder layers."""
    return [(f"{prefix}.{fold}", [f"{prefix}.{m}" for m in members])
            for prefix, layer in model.named_modules() if hasattr(layer, "scaling_groups")
            for fold, members in layer.scaling_groups()]


def apply(modules: dict, fold: str, members: list, s: mx.array, exact: Optional[dict] = None) -> None:
    """Multiply the members' columns by s and divide what feeds them by s: the same function in float.
    exact: {path: float32 weight} kept beside the modules' (in their dtype), updated here."""
    exact = {} if exact is None else exact
    for p in members:
        exact[p] = exact.get(p, modules[p].weight.astype(mx.float32)) * s
        modules[p].weight = exact[p].astype(modules[p].weight.dtype)
    module = modules[fold]
    if hasattr(module, "divide_output"):  # a norm, by its own rule
        module.divide_output(s)
        return
    exact[fold] = exact.get(fold, module.weight.astype(mx.float32)) / s[:, None]  # a linear, by its rows
    module.weight = exact[fold].astype(module.weight.dtype)


def best_scale(weights: Dict[str, mx.array], H: Dict[str, np.ndarray], specs: Dict[str, dict], dtype) -> mx.array:
    """The s = x^alpha (normalised to a geometric mean of its extremes of 1) whose rounding errs least."""
    x = np.sqrt(np.maximum(np.diag(H[next(iter(weights))]), 0.0))
    x = np.maximum(x, FLOOR * x.max()) if x.max() > 0 else np.ones_like(x)
    best = None
    for alpha in ALPHAS:
        s = x ** alpha
        s = mx.array((s / np.sqrt(s.max() * s.min())).astype(np.float32))
        error = sum(rounding_error(w, s, H[p], specs[p], dtype) for p, w in weights.items())
        if best is None or error < best[0]:
            best = (error, s)
    return best[1]


def rounding_error(w: mx.array, s: mx.array, H: np.ndarray, spec: dict, dtype) -> float:
    """The layer's output error on the calibration inputs when W s is rounded by -q's search."""
    bits, group = spec["bits"], spec["group_size"]
    ws = w * s
    scales, biases = (v.astype(mx.float32) for v in best_grid(ws, mx.ones((w.shape[1],)), bits, group, dtype))
    grouped = ws.reshape(w.shape[0], -1, group)
    approx = (codes(grouped, scales, biases, 2**bits - 1) * scales[..., None] + biases[..., None]).reshape(w.shape)
    return output_error(np.array(w), np.array(approx / s), H)

"""Calibrated quantization (`python -m mlxgemma.convert -q --calibrate`): GPTQ's error-compensating rounding
from activations of real text, and a sensitivity-driven choice of which layers get more bits for a target
bits per weight (--target-bpw). The output is plain MLX affine quantization (codes, scales and biases in
groups), which mlx-lm and mlxgemma load as any other quantized checkpoint.

GPTQ (Frantar et al. 2022), as mlx-lm's `mlx_lm.gptq` does it: one float pass over the calibration text
collects H = sum XᵀX of every linear's inputs; then, group by group, each column is rounded to its group's
grid and its error, weighted by the inverse Hessian, is pushed onto the columns not rounded yet, so the
layer's output on those activations moves as little as possible. Each group's grid (scale and bias) is
quantize.best_grid's, the rounding error weighted by the inputs' energy, diag(H), as AWQ weighs its clipping
search (README, Quality and size, for what each part gains). Ours because mlx-lm's GPTQ takes every
linear (a vision tower that text never reaches, layers whose width does not divide the group), packs only
2/4/8 bits, rounds with float32 scales it then saves in another dtype, and leaves the embedding, which Gemma
ties to the head (two thirds of the 270M's weights), at round-to-nearest; here the tied table gets GPTQ as
the head it is, with the Hessian of the final hidden states. mlx-lm's AWQ is not used: it feeds Gemma
activations without the sqrt(hidden_size) embedding scale and with no sliding windows.

Sensitivity: each layer's GPTQ output error on the calibration activations, tr((W - Q) H (W - Q)ᵀ), at the
low and at the high bit width; layers go up by the error they save per extra bit until the target is met.
"""

import sys
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..errors import MlxGemmaError
from .quantize import SHRINK, best_grid, pack

BUILTIN = Path(__file__).parents[1] / "data" / "calibration.txt"  # original text, Apache-2.0 with the package
DAMP = 0.01  # of the Hessian's mean diagonal, as in the paper and mlx-lm


def calibration_tokens(tokenizer, data: Optional[str] = None, samples: Optional[int] = None,
                       seq_len: int = 256) -> mx.array:
    """(samples, seq_len) token ids from the built-in text (data None or "builtin") or a UTF-8 file, each
    row starting with <bos> as the model saw its training text; samples None: as many as the text gives."""
    if (samples is not None and samples <= 0) or seq_len <= 1:
        raise MlxGemmaError(f"--calibration-samples must be > 0 and --calibration-seq-len > 1 "
                            f"(got {samples} and {seq_len})")
    path = BUILTIN if data in (None, "builtin") else Path(data).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxGemmaError(f"cannot read the calibration text {path}: {e}") from None
    ids = [t for t in tokenizer.encode(text, add_special_tokens=False)]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    have = len(ids) // body
    if have == 0:
        raise MlxGemmaError(f"the calibration text {path} has {len(ids)} tokens: fewer than one sample of "
                            f"--calibration-seq-len {seq_len}")
    samples = samples or have
    if have < samples:
        print(f"[mlxgemma] note: the calibration text gives {have} samples of {seq_len} tokens, not {samples}",
              file=sys.stderr)
    rows = [([bos] if bos is not None else []) + ids[i * body:(i + 1) * body] for i in range(min(have, samples))]
    return mx.array(rows)


def targets(model, group_size: int) -> Dict[str, nn.Module]:
    """The layers GPTQ rounds: every float linear of the language model whose input width divides by the
    group size, and a tied embedding (rounded as the head); not a vision tower (text never reaches it)."""
    found = {}
    for path, m in model.named_modules():
        if model.in_vision_tower(path) or not isinstance(m, (nn.Linear, nn.Embedding)) or hasattr(m, "scales"):
            continue
        if m.weight.shape[1] % group_size:
            continue
        if isinstance(m, nn.Embedding) and not model.is_tied_head(path):
            continue
        found[path] = m
    return found


class _Catcher(nn.Module):
    """A linear that adds its inputs' XᵀX (float32) to H, then runs as itself; a vocabulary head returns a
    one-wide stand-in instead (see _cheap)."""

    def __init__(self, module, head: bool = False):
        super().__init__()
        self.module, self.head, self.H = module, head, mx.zeros((module.weight.shape[1],) * 2)

    def __call__(self, x):
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.H = self.H + xf.T @ xf
        return _cheap(x) if self.head else self.module(x)


def _cheap(x):
    """What the calibration pass takes from a vocabulary head is its input: its logits are never read, and
    on Gemma's 262k vocabulary they are over half a forward's work, so the head returns a (..., 1) slice
    (the softcap after it is elementwise)."""
    return x[..., :1]


def hessians(model, tokens: mx.array, layers: Dict[str, nn.Module], batch_size: int = 4) -> Dict[str, mx.array]:
    """H of every layer in `layers` over the calibration tokens, from one float pass."""
    from tqdm import tqdm

    catchers = {p: _Catcher(m, p.endswith(model.lm_head_name)) for p, m in layers.items() if isinstance(m, nn.Linear)}
    heads = {p: m for p, m in layers.items() if isinstance(m, nn.Embedding)}
    head_h = {p: mx.zeros((m.weight.shape[1],) * 2) for p, m in heads.items()}
    for p, m in heads.items():  # the tied head: catch as_linear's input (the table's lookups are not a matmul)
        def as_linear(x, p=p):
            xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            head_h[p] = head_h[p] + xf.T @ xf
            return _cheap(x)
        m.as_linear = as_linear
    model.update_modules(tree_unflatten(list(catchers.items())))
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="[mlxgemma] calibration pass", file=sys.stderr):
            batch = tokens[start:start + batch_size]
            out = model.calibration_forward(batch)
            mx.eval(out, [c.H for c in catchers.values()], list(head_h.values()))
    finally:
        model.update_modules(tree_unflatten([(p, c.module) for p, c in catchers.items()]))
        for m in heads.values():
            del m.as_linear
    return {**{p: c.H for p, c in catchers.items()}, **head_h}


def gptq(weight: np.ndarray, H: np.ndarray, bits: int, group_size: int, dtype=mx.float32, shrink=SHRINK):
    """GPTQ of one (out, in) weight: (codes (out, in) uint32, scales, biases (out, in // group_size)) in MLX's
    affine format (w ≈ scale * code + bias per group). Each group's grid is chosen by best_grid when GPTQ
    reaches it (from the weights as earlier groups' errors left them), rounded to `dtype` (the checkpoint's)
    first, so the saved grid is the one the errors were computed on. With H the identity and shrink ()
    it is exactly round-to-nearest (mx.quantize)."""
    W = weight.astype(np.float32).copy()
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead], W[:, dead] = 1.0, 0.0
    importance = np.diag(H).astype(np.float32)
    H[np.diag_indices_from(H)] += DAMP * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # upper: H⁻¹ = UᵀU
    maxq = 2 ** bits - 1
    out, n = W.shape
    codes = np.zeros((out, n), dtype=np.uint32)
    scales = np.zeros((out, n // group_size), dtype=np.float32)
    biases = np.zeros_like(scales)
    for g, i in enumerate(range(0, n, group_size)):
        j = i + group_size
        grid = best_grid(mx.array(W[:, i:j]), mx.array(importance[i:j]), bits, group_size, dtype, shrink)
        s, b = (np.array(v.astype(mx.float32))[:, 0] for v in grid)
        scales[:, g], biases[:, g] = s, b
        errors = np.zeros((out, group_size), dtype=np.float32)
        safe = np.where(s == 0, 1.0, s)
        for k in range(group_size):
            col = W[:, i + k]
            q = np.clip(np.round((col - b) / safe), 0, maxq)
            codes[:, i + k] = q
            e = (col - (q * s + b)) / U[i + k, i + k]
            W[:, i + k:j] -= np.outer(e, U[i + k, i + k:j])
            errors[:, k] = e
        W[:, j:] -= errors @ U[i:j, j:]
    return codes, scales, biases


def dequantized(codes, scales, biases, group_size: int) -> np.ndarray:
    out, n = codes.shape
    grid = codes.reshape(out, n // group_size, group_size).astype(np.float32)
    return (grid * scales[..., None] + biases[..., None]).reshape(out, n)


def output_error(weight: np.ndarray, approx: np.ndarray, H: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)ᵀ): the squared error of the layer's outputs summed over the calibration inputs."""
    d = (weight.astype(np.float64) - approx)
    return float(np.einsum("oi,ij,oj->", d, H.astype(np.float64), d, optimize=True))


def allocate(sizes: Dict[str, int], saving: Dict[str, float], low: int, high: int, group_size: int,
             scale_bits: int, target_bpw: float, fixed_bits: Dict[str, int]) -> Dict[str, int]:
    """Bits per layer: every calibrated layer at `low`, then up to `high` by error saved per extra bit until
    the whole quantized model (fixed layers included) reaches target_bpw."""
    overhead = 2 * scale_bits / group_size

    def bpw(bits: Dict[str, int]) -> float:
        every = {**{p: fixed_bits[p] for p in fixed_bits}, **bits}
        total = sum(sizes.values())
        return sum(sizes[p] * (b + overhead) for p, b in every.items()) / total

    bits = {p: low for p in saving}
    lowest, highest = bpw(bits), bpw({p: high for p in saving})
    if not lowest - 1e-9 <= target_bpw <= highest + 1e-9:
        raise MlxGemmaError(f"--target-bpw {target_bpw} is outside what {low}/{high}-bit layers in groups of "
                            f"{group_size} reach here ({lowest:.3f} to {highest:.3f})")
    for p in sorted(saving, key=lambda p: -saving[p] / (sizes[p] * (high - low))):
        trial = dict(bits, **{p: high})
        if bpw(trial) > target_bpw + 1e-9:
            continue
        bits = trial
    return bits


def calibrate(model, config: dict, tokenizer, bits: int, group_size: int, recipe: Optional[str],
              vision_bits: Optional[int], data=None, samples: Optional[int] = None, seq_len: int = 256,
              target_bpw: Optional[float] = None, high_bits: Optional[int] = None, search: bool = True,
              audio_bits: Optional[int] = None):
    """Quantize model in place with GPTQ-rounded layers (bits per layer from the recipe, or from sensitivity
    for target_bpw; search False: no grid search, in GPTQ or elsewhere); returns (model, config, report)
    where report maps each layer to (bits, RTN error, GPTQ error) on the calibration activations."""
    from tqdm import tqdm

    from .quantize import quantize

    tokens = calibration_tokens(tokenizer, data, samples, seq_len)
    layers = targets(model, group_size)
    H = {p: np.array(h) for p, h in hessians(model, tokens, layers).items()}
    weights = {p: np.array(m.weight.astype(mx.float32)) for p, m in layers.items()}
    dtype = next(iter(layers.values())).weight.dtype  # the checkpoint's: its scales and biases are stored so
    plan = _recipe_bits(model, bits, group_size, recipe, layers)
    results, report, shrink = {}, {}, SHRINK if search else ()
    if target_bpw is not None:
        high = high_bits or min(bits + 2, 8)
        sizes = {p: int(np.prod(m.weight.shape)) for p, m in _quantized_layers(model, group_size).items()}
        fixed = {p: plan.get(p, bits) for p in sizes if p not in layers}
        saving = {}
        for p in tqdm(layers, desc="[mlxgemma] sensitivity", file=sys.stderr):
            lo, hi = (gptq(weights[p], H[p], b, group_size, dtype, shrink) for b in (bits, high))
            results[p, bits], results[p, high] = lo, hi
            saving[p] = output_error(weights[p], dequantized(*lo, group_size), H[p]) - \
                output_error(weights[p], dequantized(*hi, group_size), H[p])
        scale_bits = 8 * dtype.size
        plan.update(allocate(sizes, saving, bits, high, group_size, scale_bits, target_bpw, fixed))
    for p in tqdm(layers, desc="[mlxgemma] GPTQ", file=sys.stderr):
        b = plan.get(p, bits)
        if (p, b) not in results:
            results[p, b] = gptq(weights[p], H[p], b, group_size, dtype, shrink)
    per_layer = {p: {"group_size": group_size, "bits": plan.get(p, bits), "mode": "affine"} for p in plan}
    model, config = quantize(model, config, bits, group_size, recipe, vision_bits, overrides=per_layer,
                             search=search, audio_bits=audio_bits)
    quantized = dict(model.named_modules())
    for p in layers:
        b = plan.get(p, bits)
        codes, scales, biases = results[p, b]
        q = quantized[p]
        q.weight = mx.array(pack(codes, b))
        q.scales, q.biases = mx.array(scales).astype(q.scales.dtype), mx.array(biases).astype(q.biases.dtype)
        rtn = mx.dequantize(*mx.quantize(mx.array(weights[p]), group_size=group_size, bits=b), group_size=group_size,
                            bits=b)
        report[p] = (b, output_error(weights[p], np.array(rtn), H[p]),
                     output_error(weights[p], dequantized(codes, scales, biases, group_size), H[p]))
    return model, config, report


def _recipe_bits(model, bits: int, group_size: int, recipe: Optional[str], layers) -> Dict[str, int]:
    """The bits the recipe (mixed_4_6 by default at 4 bits) gives each calibrated layer."""
    from .quantize import default_recipe

    recipe = recipe or default_recipe(bits)
    if recipe == "uniform":
        return {p: bits for p in layers}
    from mlx_lm.convert import mixed_quant_predicate_builder

    mixed = mixed_quant_predicate_builder(recipe, model, group_size)
    out = {}
    for p, m in layers.items():
        r = mixed(p, m)
        out[p] = r["bits"] if isinstance(r, dict) else bits
    return out


def _quantized_layers(model, group_size: int) -> Dict[str, nn.Module]:
    """Every layer the recipe quantizes (for bits per weight): linears and embeddings whose width divides."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
            and not model.in_vision_tower(p) and m.weight.shape[1] % group_size == 0}


def summary(report: Dict[str, tuple]) -> List[str]:
    """Lines for stderr: the output error GPTQ left against round-to-nearest, over all calibrated layers."""
    rtn = sum(r[1] for r in report.values())
    ours = sum(r[2] for r in report.values())
    better = sum(r[2] <= r[1] for r in report.values())
    return [f"[mlxgemma] calibrated {len(report)} layers: output error on the calibration text "
            f"{ours / max(rtn, 1e-30):.3f}x round-to-nearest's ({better} of {len(report)} layers lower)"]

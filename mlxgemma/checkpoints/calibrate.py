"""Calibrated quantization (`python -m mlxgemma.convert -q --calibrate`): GPTQ's error-compensating rounding
of the decoder's layers from activations of real text, at the bits the recipe gives them (quantize.py's,
the budget recipe by default), after AWQ's input scaling where the family has it (awq.py). The output is
plain MLX affine quantization (codes, scales and biases in groups), which mlx-lm and mlxgemma load as any
other quantized checkpoint.

GPTQ (Frantar et al. 2022), as mlx-lm's `mlx_lm.gptq` does it: one float pass over the calibration text
collects H = sum XᵀX of every linear's inputs; then, group by group, each column is rounded to its group's
grid and its error, weighted by the inverse Hessian, is pushed onto the columns not rounded yet, so the
layer's output on those activations moves as little as possible. Each group's grid (scale and bias) is
grids.best_grid's, the rounding error weighted by the inputs' energy, diag(H), as AWQ weighs its clipping
search. Ours because mlx-lm's GPTQ takes every linear (a vision tower that text never reaches, layers whose
width does not divide the group), packs only 2/4/8 bits and rounds with float32 scales it then saves in
another dtype; mlx-lm's AWQ feeds Gemma activations without the sqrt(hidden_size) embedding scale and with no
sliding windows.

Token tables are not calibrated: a tied table is both the head and the input embedding, and GPTQ as the head
(with the final hidden states' Hessian) moved it away from what the lookups need: measured on the real 270M,
perplexity 15.45 with the table GPTQ-rounded against 15.08 with it rounded by -q's search like any table
(docs/convert-and-quantize.md). Which layers get more bits is the recipe's: choosing them by each layer's
measured output error instead (the previous --target-bpw) reached 15.15 at the same size, so it went.
"""

import sys
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..errors import MlxGemmaError
from .grids import best_grid, output_error, pack

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


def targets(model, specs: Dict[str, dict]) -> Dict[str, nn.Module]:
    """The layers GPTQ rounds: every float linear of the language model the recipe quantizes (specs, from
    quantize.layer_specs); not a token table (module docstring), not a tower (text never reaches it)."""
    return {p: m for p, m in model.named_modules() if p in specs and isinstance(m, nn.Linear)
            and not hasattr(m, "scales")}


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

    catchers = {p: _Catcher(m, p.endswith(model.lm_head_name)) for p, m in layers.items()}
    tied = [m for p, m in model.named_modules() if isinstance(m, nn.Embedding) and model.is_tied_head(p)]
    for m in tied:  # nothing reads the logits of a tied head either
        m.as_linear = _cheap
    model.update_modules(tree_unflatten(list(catchers.items())))
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="[mlxgemma] calibration pass", file=sys.stderr):
            out = model.calibration_forward(tokens[start:start + batch_size])
            mx.eval(out, [c.H for c in catchers.values()])
    finally:
        model.update_modules(tree_unflatten([(p, c.module) for p, c in catchers.items()]))
        for m in tied:
            del m.as_linear
    return {p: c.H for p, c in catchers.items()}


def gptq(weight: np.ndarray, H: np.ndarray, bits: int, group_size: int, dtype=mx.float32, search: bool = True):
    """GPTQ of one (out, in) weight: (codes (out, in) uint32, scales, biases (out, in // group_size)) in MLX's
    affine format (w ≈ scale * code + bias per group). Each group's grid is chosen by best_grid when GPTQ
    reaches it (from the weights as earlier groups' errors left them), rounded to `dtype` (the checkpoint's)
    first, so the saved grid is the one the errors were computed on. With H the identity and search False
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
        grid = best_grid(mx.array(W[:, i:j]), mx.array(importance[i:j]), bits, group_size, dtype, search)
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


def calibrate(model, config: dict, tokenizer, bits: int, group_size: int, recipe: Optional[str],
              vision_bits: Optional[int], data=None, samples: Optional[int] = None, seq_len: int = 256,
              target_bpw: Optional[float] = None, search: bool = True, audio_bits: Optional[int] = None,
              awq: bool = True):
    """Quantize model in place, the decoder's linears GPTQ-rounded at the recipe's bits (search False: no
    grid search, in GPTQ or elsewhere), after awq.py's input scaling (awq False: none); returns (model,
    config, report) where report maps each calibrated layer to (bits, RTN error, GPTQ error) on the
    calibration activations (of the scaled weights, where scaled)."""
    from tqdm import tqdm

    from .awq import scale_inputs
    from .quantize import layer_specs, quantize

    tokens = calibration_tokens(tokenizer, data, samples, seq_len)
    specs = layer_specs(model, bits, group_size, recipe, target_bpw)
    layers = targets(model, specs)
    H = {p: np.array(h) for p, h in hessians(model, tokens, layers).items()}
    dtype = next(iter(layers.values())).weight.dtype  # the checkpoint's: its scales and biases are stored so
    exact, scales = scale_inputs(model, H, specs, dtype) if awq else ({}, {})
    for p, s in scales.items():
        H[p] = H[p] / np.outer(s, s)
    weights = {p: exact[p] if p in exact else np.array(m.weight.astype(mx.float32)) for p, m in layers.items()}
    results = {p: gptq(weights[p], H[p], specs[p]["bits"], specs[p]["group_size"], dtype, search)
               for p in tqdm(layers, desc="[mlxgemma] GPTQ", file=sys.stderr)}
    model, config = quantize(model, config, bits, group_size, recipe, vision_bits, overrides={p: specs[p] for p in layers},
                             search=search, audio_bits=audio_bits, target_bpw=target_bpw)
    quantized, report = dict(model.named_modules()), {}
    for p, (codes, scales, biases) in results.items():
        q, b, g = quantized[p], specs[p]["bits"], specs[p]["group_size"]
        q.weight = pack(mx.array(codes), b)
        q.scales, q.biases = mx.array(scales).astype(q.scales.dtype), mx.array(biases).astype(q.biases.dtype)
        rtn = mx.dequantize(*mx.quantize(mx.array(weights[p]), group_size=g, bits=b), group_size=g, bits=b)
        report[p] = (b, output_error(weights[p], np.array(rtn), H[p]),
                     output_error(weights[p], dequantized(codes, scales, biases, g), H[p]))
    return model, config, report


def summary(report: Dict[str, tuple]) -> List[str]:
    """Lines for stderr: the output error GPTQ left against round-to-nearest, over all calibrated layers."""
    rtn = sum(r[1] for r in report.values())
    ours = sum(r[2] for r in report.values())
    better = sum(r[2] <= r[1] for r in report.values())
    return [f"[mlxgemma] calibrated {len(report)} layers: output error on the calibration text "
            f"{ours / max(rtn, 1e-30):.3f}x round-to-nearest's ({better} of {len(report)} layers lower)"]

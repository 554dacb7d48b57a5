"""How one layer's weights are rounded to MLX's affine 4-bit (or 2..8-bit) groups: each group's grid (a scale
and a bias, w ≈ scale * code + bias) chosen by search, the codes on it, and MLX's packed layout. All of it in
MLX, whole tensors at a time in row chunks: `-q` rounds every weight of the checkpoint this way, so this is
its cost (the 270M: `-q` in 14.3 s, loading and writing included, on this project's 2-core CPU, against
5.5 s for mlx_lm.convert -q; docs/convert-and-quantize.md).

mx.quantize takes each group's grid from its min and max, moved to put zero on a grid point. best_grid tries
that grid and 25 others running from the group's min to its max with each end pulled toward zero by 0-20%
(clipping outliers buys resolution for the rest of the group, as AWQ's and llama.cpp's k-quant searches do),
keeps each group's best, then refits it by least squares on the codes it gives (the scale and bias that
minimise the error for those codes, llama.cpp's make_qkx refinement), kept where it errs less."""

import functools
from typing import Tuple

import mlx.core as mx
import numpy as np

# best_grid's fractions of a group's min and of its max: 25 grids tried per group, besides mx.quantize's.
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)
# From 5 bits up, 9 grids: measured on the 270M, the 25 take 0.7% more off perplexity for 20% more time.
SHRINK_WIDE = (1.0, 0.9, 0.8)
REFITS = 2  # least-squares refits of each group's best grid: measured, 2 take 1.7% off -q's perplexity, 4 no more
CHUNK = 1 << 22  # elements per batch of candidate grids: bounded memory, and the fastest size measured here


def best_grid(w: mx.array, importance: mx.array, bits: int, group_size: int, dtype,
              search: bool = True) -> Tuple[mx.array, mx.array]:
    """Per group of w (out, in): the affine grid (scales, biases (out, in // group_size), in dtype) with the
    least importance-weighted squared rounding error among mx.quantize's own and the searched ones (module
    docstring); every candidate is rounded to dtype (the checkpoint's) before it is judged, so the saved grid
    is the one judged. search False: mx.quantize's grid."""
    out, n = w.shape
    rows = max(1, CHUNK // (n * (len(_shrink(bits)) ** 2 + 1)))
    weight = importance.astype(mx.float32).reshape(n // group_size, group_size)
    parts = _in_pairs([lambda i=i: _best_rows(w[i:i + rows], weight, bits, group_size, dtype, search)
                       for i in range(0, out, rows)])
    return mx.concatenate([s for s, _ in parts]), mx.concatenate([b for _, b in parts])


def _in_pairs(chunks):
    """Each chunk's arrays built on one of two streams in turn and evaluated two at a time: a device that can
    run two kernels at once does (on this project's 2-core CPU, 1.8x faster; on a GPU, no slower)."""
    streams, done = _streams(), []
    for start in range(0, len(chunks), 2):
        pair = []
        for stream, chunk in zip(streams, chunks[start:start + 2]):
            with mx.stream(stream):
                pair.append(chunk())
        mx.eval(pair)
        done += pair
    return done


@functools.lru_cache(maxsize=None)
def _streams_on(device):
    return mx.default_stream(device), mx.new_stream(device)


def _streams():
    return _streams_on(mx.default_device())


def _best_rows(w, weight, bits, group_size, dtype, search):
    _, s, b = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
    if not search:
        return s, b
    maxq = 2 ** bits - 1
    groups = w.astype(mx.float32).reshape(w.shape[0], -1, group_size)
    lo, hi = groups.min(-1), groups.max(-1)
    k = len(_shrink(bits))
    shrink = mx.array(_shrink(bits), dtype=mx.float32)
    a, c = shrink.reshape(k, 1, 1, 1), shrink.reshape(1, k, 1, 1)
    scales = ((c * hi - a * lo) / maxq).astype(dtype).reshape(k * k, *lo.shape)
    biases = mx.broadcast_to((a * lo).astype(dtype), (k, k, *lo.shape)).reshape(k * k, *lo.shape)
    scales, biases = mx.concatenate([s[None], scales]), mx.concatenate([b[None], biases])
    err = _errors(groups, weight, scales.astype(mx.float32), biases.astype(mx.float32), maxq)
    best = mx.argmin(err, 0, keepdims=True)  # the first of equals: mx.quantize's grid when it ties
    s, b, err = (mx.take_along_axis(x, best, 0)[0] for x in (scales, biases, err))
    for _ in range(REFITS):
        s, b, err = _refit(groups, weight, s, b, err, maxq)
    return s, b


def _shrink(bits):
    return SHRINK if bits <= 4 else SHRINK_WIDE


@mx.compile
def _errors(groups, weight, s, b, maxq):
    """Importance-weighted squared error of rounding groups (..., n_groups, group_size) to the grids (s, b)
    (K, ..., n_groups), per grid and group: one fused pass over the weights per candidate."""
    s, b = s[..., None], b[..., None]
    codes = mx.clip(mx.round((groups - b) / mx.where(s == 0, 1.0, s)), 0, maxq)
    return ((codes * s + b - groups) ** 2 * weight).sum(-1)


def _refit(groups, weight, s, b, err, maxq):
    """The least-squares scale and bias for the codes (s, b) gives each group (rounded to their dtype),
    where they err less than (s, b)."""
    q = codes(groups, s.astype(mx.float32), b.astype(mx.float32), maxq)
    n, sq, sqq = weight.sum(-1), (weight * q).sum(-1), (weight * q * q).sum(-1)
    sw, sqw = (weight * groups).sum(-1), (weight * q * groups).sum(-1)
    det = sqq * n - sq * sq
    solvable = det > 1e-12 * mx.maximum(sqq * n, 1e-30)  # all codes equal: nothing to fit
    det = mx.where(solvable, det, 1.0)
    s2 = mx.where(solvable, (sqw * n - sq * sw) / det, s.astype(mx.float32)).astype(s.dtype)
    b2 = mx.where(solvable, (sqq * sw - sq * sqw) / det, b.astype(mx.float32)).astype(b.dtype)
    s2 = mx.where(s2 == 0, s, s2)
    err2 = _errors(groups, weight, s2[None].astype(mx.float32), b2[None].astype(mx.float32), maxq)[0]
    better = err2 < err
    return mx.where(better, s2, s), mx.where(better, b2, b), mx.where(better, err2, err)


def codes(groups: mx.array, s: mx.array, b: mx.array, maxq: int) -> mx.array:
    """The nearest codes of groups (..., n_groups, group_size) on the grids b + s * {0 .. maxq}."""
    return mx.clip(mx.round((groups - b[..., None]) / mx.where(s == 0, 1.0, s)[..., None]), 0, maxq)


def grid_error(groups: mx.array, s: mx.array, b: mx.array, bits: int) -> mx.array:
    """Squared error of rounding each weight of groups to those grids."""
    return (codes(groups, s, b, 2 ** bits - 1) * s[..., None] + b[..., None] - groups) ** 2


def quantize_on(w: mx.array, s: mx.array, b: mx.array, bits: int, group_size: int) -> mx.array:
    """w (out, in) rounded to the grids (s, b) and packed as MLX stores it, in row chunks."""
    out, n = w.shape
    rows = max(1, CHUNK // n)

    def chunk(i):
        groups = w[i:i + rows].astype(mx.float32).reshape(-1, n // group_size, group_size)
        q = codes(groups, s[i:i + rows].astype(mx.float32), b[i:i + rows].astype(mx.float32), 2 ** bits - 1)
        return pack(q.reshape(-1, n).astype(mx.uint32), bits)

    return mx.concatenate(_in_pairs([lambda i=i: chunk(i) for i in range(0, out, rows)]))


def pack(codes: mx.array, bits: int) -> mx.array:
    """(out, in) codes -> MLX's packed (out, in * bits / 32) uint32: each row one little-endian bit stream,
    code i at bits [i * bits, (i + 1) * bits). Every 32 codes fill `bits` words exactly."""
    out, n = codes.shape
    block = mx.array(codes).astype(mx.uint32).reshape(out, n // 32, 32)
    words = [None] * bits
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        code = block[..., i]
        words[word] = code << shift if words[word] is None else words[word] | (code << shift)
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[word + 1] = code >> (32 - shift)
    return mx.stack(words, -1).reshape(out, n * bits // 32)


def output_error(weight: np.ndarray, approx: np.ndarray, H: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)ᵀ): the squared error of a layer's outputs summed over inputs whose XᵀX is H (the
    calibration's measure, for GPTQ's report and AWQ's choice of scales)."""
    d = (weight.astype(np.float64) - approx)
    return float(np.einsum("oi,ij,oj->", d, H.astype(np.float64), d, optimize=True))

"""Quantized KV caches (--kv-bits): keys and values stored as MLX affine groups along the head dimension
(at 4 bits the keys keep 8: see KEY_BITS),
(packed, scales, biases) triples, which attention reads with quantized matmuls (common.attention) rather
than through a dequantized copy.

QuantizedKVCache is the full layers' cache, quantized; QuantizedRotatingKVCache the sliding layers' ring,
quantized, with its exact window, its padding record and its journal for speculative rollback unchanged.
mlx-lm's QuantizedKVCache is not used: mlx-lm has no quantized rotating cache (its --kv-bits fails on
Gemma 2 and 3), and its full one lacks the padding record batches need. The generation loop converts a float
cache to these with `to_quantized` once it holds --quantized-kv-start tokens, as mlx-lm's does.
"""

import mlx.core as mx

from ..errors import MlxGemmaError
from .cache import KVCache, RotatingKVCache


# At --kv-bits 4 the keys keep 8 bits and the values get 4. Measured on the real Gemma 3 270M (teacher-forced over
# 768 tokens of text, the first 256 in float, then read from the quantized cache; benchmarks/kv_memory.py has the
# full run): keys and values at 4 bits in groups of 64 cost +23.8% perplexity, in groups of 32 +8.1%; 8-bit keys
# with 4-bit values +1.1%, for 0.22x the float cache's bytes (4-bit both: 0.16x; 8-bit both: 0.28x). The scores
# q.k are what 4-bit keys spoil (a few channels of Gemma's keys carry most of their range); values are averaged.
KEY_BITS = {4: 8}


def key_bits(bits: int) -> int:
    return KEY_BITS.get(bits, bits)


def quantize(x: mx.array, group_size: int, bits: int) -> tuple:
    if x.shape[-1] % group_size:
        raise MlxGemmaError(f"--kv-group-size {group_size} does not divide the head size {x.shape[-1]}")
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


def quantize_kv(keys: mx.array, values: mx.array, group_size: int, bits: int) -> tuple:
    """(keys, values) as stored at --kv-bits `bits`: the keys at key_bits(bits), the values at bits."""
    return quantize(keys, group_size, key_bits(bits)), quantize(values, group_size, bits)


def check_kv_options(bits, group_size) -> None:
    if bits is not None and bits not in (4, 8):
        raise MlxGemmaError(f"--kv-bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise MlxGemmaError(f"--kv-group-size must be 32, 64 or 128, got {group_size}")


class QuantizedKVCache(KVCache):
    """KVCache with quantized storage: grown in steps, written in place, padding recorded, trimmed exactly."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__()
        self.group_size, self.bits = group_size, bits

    @classmethod
    def from_cache(cls, cache: KVCache, group_size: int, bits: int) -> "QuantizedKVCache":
        q = cls(group_size, bits)
        q.offset, q.key_valid = cache.offset, cache.key_valid
        if cache.keys is not None:
            q.keys, q.values = quantize_kv(cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :],
                                           group_size, bits)
        return q

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        new_k, new_v = quantize_kv(keys, values, self.group_size, self.bits)
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            grow = (self.step + L - 1) // self.step * self.step

            def grown(old, new):
                room = tuple(mx.zeros((*n.shape[:2], grow, n.shape[3]), n.dtype) for n in new)
                if old is None:
                    return room
                return tuple(mx.concatenate([o[..., :prev, :], r], axis=2) for o, r in zip(old, room))
            self.keys, self.values = grown(self.keys, new_k), grown(self.values, new_v)
        self.offset += L
        for buf, new in ((self.keys, new_k), (self.values, new_v)):
            for b, n in zip(buf, new):
                b[..., prev : self.offset, :] = n
        return (tuple(b[..., : self.offset, :] for b in self.keys),
                tuple(b[..., : self.offset, :] for b in self.values))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in self.keys + self.values)

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        return self


class QuantizedRotatingKVCache(RotatingKVCache):
    """RotatingKVCache whose ring holds quantized triples (each slot's keys quantized once, when written)."""

    def __init__(self, max_size: int, group_size: int = 64, bits: int = 8):
        super().__init__(max_size)
        self.group_size, self.bits = group_size, bits

    @classmethod
    def from_cache(cls, cache: RotatingKVCache, group_size: int, bits: int) -> "QuantizedRotatingKVCache":
        q = cls(cache.max_size, group_size, bits)
        q.offset, q.key_valid = cache.offset, cache.key_valid
        if cache.keys is not None:
            q.keys, q.values = quantize_kv(cache.keys, cache.values, group_size, bits)
        return q

    def encode(self, x: mx.array, key: bool = False):
        return quantize(x, self.group_size, key_bits(self.bits) if key else self.bits)

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        return self


def quantize_cache(cache: list, start: int, group_size: int, bits) -> None:
    """In place: every float cache holding at least `start` tokens becomes its quantized twin (mlx-lm's
    maybe_quantize_kv_cache, for the loops that are not mlx-lm's)."""
    if bits is None:
        return
    for i, c in enumerate(cache):
        if hasattr(c, "to_quantized") and c.offset >= start:
            cache[i] = c.to_quantized(group_size=group_size, bits=bits)

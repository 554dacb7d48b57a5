"""T5Gemma 2's caches and masks: the encoder's bidirectional window, the decoder's mask merged over its own keys
and the encoder's (one softmax over both), and the decoder's cache with the cross keys and values computed
once per request."""

from typing import Optional

import mlx.core as mx

from .cache import causal_mask

def encoder_mask(L: int, valid: Optional[mx.array], window: Optional[int]):
    """Bidirectional, minus padded keys; on sliding layers query i sees keys [i - ((W+1)//2 - 1), i + W//2]."""
    if window is None or L <= (window + 1) // 2:
        if valid is None:
            return None
        allowed = mx.ones((L, L), dtype=mx.bool_)
    else:
        d = mx.arange(L)[None] - mx.arange(L)[:, None]  # key - query
        allowed = (d >= 1 - (window + 1) // 2) & (d <= window // 2)
    if valid is not None:  # a query always sees itself, so no row is empty (its output is never read)
        allowed = (allowed[None, None] & valid[:, None, None, :]) | mx.eye(L, dtype=mx.bool_)
    return allowed


def merged_mask(self_mask, encoder_valid, L: int, S_self: int, S_enc: int, offset: int):
    """[self part ; encoder part] for one softmax over both key sets: the self part as the cache gave it
    (None = all, "causal" = keys 0..offset+L-1), the encoder part all keys minus encoder padding."""
    if self_mask is None and encoder_valid is None:
        return None
    if isinstance(self_mask, str):
        self_mask = causal_mask(offset, L, 0, S_self)
    elif self_mask is None:
        self_mask = mx.ones((L, S_self), dtype=mx.bool_)
    cross = (mx.ones((1, 1, L, S_enc), dtype=mx.bool_) if encoder_valid is None
             else mx.broadcast_to(encoder_valid[:, None, None, :], (encoder_valid.shape[0], 1, L, S_enc)))
    B = cross.shape[0] if self_mask.ndim == 2 else self_mask.shape[0]
    self_mask = mx.broadcast_to(self_mask if self_mask.ndim == 4 else self_mask[None, None], (B, 1, L, S_self))
    return mx.concatenate([self_mask, mx.broadcast_to(cross, (B, 1, L, S_enc))], axis=-1)


class EncoderDecoderCache(list):
    """The decoder's self-attention caches (a window on sliding layers), with every layer's encoder keys and
    values computed once (`cross`) and the encoder padding."""

    def __init__(self, self_caches: list, cross: list, encoder_valid: Optional[mx.array]):
        super().__init__(self_caches)
        self.cross, self.encoder_valid = cross, encoder_valid

    def quantized_cross(self) -> list:
        """The cross keys and values, quantized once (like the self caches) when those have been (--kv-bits):
        one softmax reads both, so both are stored alike."""
        first = self[0] if len(self) else None
        if getattr(first, "bits", None) and self.cross and not isinstance(self.cross[0][0], tuple):
            from .quantized_cache import quantize_kv

            self.cross = [quantize_kv(k, v, first.group_size, first.bits) for k, v in self.cross]
        return self.cross

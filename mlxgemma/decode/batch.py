"""A batch of live sequences: prefill one, add it, step every row together, drop the finished ones.

The server's continuous batching runs on this; nothing here knows about HTTP. A sequence is prefilled alone
with the model's own single-sequence caches, exactly as mlx-lm's generate_step does (the prompt but its
last token in chunks that only fill the caches, then the last token alone gives the first logits), and
joins the batch after that. Each decode step is one forward of (rows, 1) tokens over per-row caches
(models/batch_cache.py), so a row's logits equal its logits alone, whatever else is in the batch.

Sampling is per row (rows have their own temperature, top-p/top-k/min-p and random key, so a seed
reproduces a row's output under any load); the filters are mlx-lm's.
"""

import random
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx

from ..models import is_encoder_decoder
from ..models.batch_cache import BatchEncoderDecoderCache, merge_caches


def forward(model, tokens: mx.array, cache) -> mx.array:
    """Logits (B, L, vocab) for decoder tokens: a decoder-only model, or T5Gemma 2's decoder on its cache."""
    if is_encoder_decoder(model):
        return model.decode_step(tokens, cache=cache)
    return model(tokens, cache=cache)


def cache_state(cache) -> list:
    return [(c.keys, c.values) for c in cache if c.keys is not None]


def fill(model, cache, ids: List[int], step: int = 2048) -> None:
    """Feed ids into cache in chunks of `step`, evaluating only the cache (no logits)."""
    for start in range(0, len(ids), step):
        forward(model, mx.array(ids[start : start + step])[None], cache)
        mx.eval(cache_state(cache))


def prefill(model, cache, ids: List[int], step: int = 2048) -> mx.array:
    """Feed ids into cache; returns the log-probabilities (vocab,) that follow the last id."""
    fill(model, cache, ids[:-1], step)
    logits = forward(model, mx.array(ids[-1:])[None], cache)[0, -1].astype(mx.float32)
    return logits - mx.logsumexp(logits)


@dataclass
class Sampling:
    """One row's sampler: greedy at temp 0, else mlx-lm's filters then a draw with the row's own key."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    key: mx.array = field(default=None, repr=False)

    def __post_init__(self):
        if self.key is None:
            # Not MLX's global generator: its state may be a lazy array of another thread's stream.
            self.key = mx.random.key(self.seed if self.seed is not None else random.getrandbits(63))

    def draw(self, logprobs: mx.array) -> mx.array:
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(filtered(logprobs, self.top_p, self.min_p, self.top_k) * (1.0 / self.temp),
                                     key=sub)


def filtered(logprobs: mx.array, top_p: float, min_p: float, top_k: int) -> mx.array:
    """mlx-lm's top-p, min-p and top-k filters, in its order."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < top_p < 1:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p > 0:
        logprobs = apply_min_p(logprobs, min_p)
    if top_k > 0:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def sample(logprobs: mx.array, samplers: List[Sampling]) -> mx.array:
    """The next token of every row (B,), from (B, vocab) log-probabilities."""
    if all(s.temp == 0 for s in samplers):
        return mx.argmax(logprobs, axis=-1)
    return mx.stack([s.draw(logprobs[i]) for i, s in enumerate(samplers)])


class Batch:
    """Rows decoding together. `add` takes a prefilled cache and the row's next input token; `step` returns
    every row's next log-probabilities (B, vocab); `keep` drops rows; `extract` copies one row's cache out."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.tokens: Optional[mx.array] = None  # (B,) each row's next input

    def __len__(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[0]

    def add(self, cache, token: int) -> None:
        parts = [cache] if self.cache is None else [self.cache, cache]
        if is_encoder_decoder(self.model):
            self.cache = BatchEncoderDecoderCache.merge(parts)
        else:
            self.cache = merge_caches(parts)
        new = mx.array([token], dtype=mx.int32)
        self.tokens = new if self.tokens is None else mx.concatenate([self.tokens, new])

    def step(self) -> mx.array:
        logits = forward(self.model, self.tokens[:, None], self.cache)[:, -1].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def keep(self, rows: List[int]) -> None:
        if not rows:
            self.cache, self.tokens = None, None
            return
        if isinstance(self.cache, BatchEncoderDecoderCache):
            self.cache.keep(rows)
        else:
            for c in self.cache:
                c.keep(rows)
        self.tokens = self.tokens[mx.array(rows, dtype=mx.int32)]

    def extract(self, b: int):
        if isinstance(self.cache, BatchEncoderDecoderCache):
            return self.cache.extract(b)
        return [c.extract(b) for c in self.cache]

"""Sampling: the options of one request, checked once, and the sampler of one row with its own random key.

Every caller (generate, chat, the server's batch, speculative acceptance) draws through `Sampler`, so a seed
gives the same tokens whichever path and whatever else is decoding: a row never reads MLX's global random
state (which another thread's stream may hold lazily), it splits its own key once per draw. The filters are
mlx-lm's (top-p, min-p, top-k, in its order, then temperature), as is the repetition penalty.
"""

import random
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..errors import MlxGemmaError


@dataclass(frozen=True)
class SamplingOptions:
    """How a request samples. Checked when made: a bad value is one MlxGemmaError naming its flag."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        for ok, message in [
            (self.temp >= 0, f"--temp must be >= 0, got {self.temp}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty is None or self.repetition_penalty > 0,
             f"--repetition-penalty must be > 0, got {self.repetition_penalty}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"--seed must be in 0..2^64-1, got {self.seed}"),
        ]:
            if not ok:
                raise MlxGemmaError(message)

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def sampler(self, index: int = 0) -> "Sampler":
        """The sampler of choice `index` of a request (n > 1: each choice its own stream, seed + index)."""
        return Sampler(self, None if self.seed is None else (self.seed + index) % 2**64)


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


def normalize(logits: mx.array) -> mx.array:
    """Log-probabilities in float32 from logits (..., vocab)."""
    if logits.dtype != mx.float32:  # (no cast op where there is nothing to cast: one op less a step)
        logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class Sampler:
    """One row's sampler: greedy at temp 0, else the filters, temperature and a draw with the row's own key."""

    def __init__(self, options: SamplingOptions, seed: Optional[int] = None):
        self.options = options
        # Not MLX's global generator: its state may be a lazy array of another thread's stream.
        self.key = mx.random.key(seed if seed is not None else random.getrandbits(63))

    @property
    def greedy(self) -> bool:
        return self.options.temp == 0

    def _split(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def penalized(self, logits: mx.array, history) -> mx.array:
        """mlx-lm's repetition penalty on (L, vocab) logits over the last 20 tokens of history (no-op
        without one)."""
        penalty = self.options.repetition_penalty
        if not penalty or not len(history):
            return logits
        from mlx_lm.sample_utils import make_repetition_penalty

        return make_repetition_penalty(penalty)(mx.array(list(history)[-20:]), logits)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution a token is drawn from (temp > 0): the filters, then the temperature."""
        o = self.options
        return mx.softmax(filtered(logprobs, o.top_p, o.min_p, o.top_k) * (1.0 / o.temp), axis=-1)

    def draw(self, logprobs: mx.array) -> mx.array:
        """The next token (a scalar array, lazy) from (vocab,) log-probabilities."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        o = self.options
        return mx.random.categorical(filtered(logprobs, o.top_p, o.min_p, o.top_k) * (1.0 / o.temp), key=self._split())

    def draw_from(self, probs: mx.array) -> int:
        """A token from a distribution (speculation's residual)."""
        return int(mx.random.categorical(mx.log(probs), key=self._split()).item())

    def uniform(self) -> float:
        return mx.random.uniform(key=self._split()).item()


def sample(logprobs: mx.array, samplers) -> mx.array:
    """The next token of every row (B,), from (B, vocab) log-probabilities."""
    if all(s.greedy for s in samplers):
        return mx.argmax(logprobs, axis=-1)
    return mx.stack([s.draw(logprobs[i]) for i, s in enumerate(samplers)])

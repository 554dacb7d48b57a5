"""The one decoding loop: rows decoding together, one forward per step for all of them.

generate, chat and the server's scheduler all step a Decoder: a batch of one (the model's own single-sequence
caches, as fast as mlx-lm's loop) or of many (per-row caches merged, models/batch_cache.py, so each row's
logits equal its logits alone). A row joins with a prefilled cache and its next input token; each step the
decoder applies the row's repetition penalty and constraint mask, samples with the row's own key (sampling.py)
and hands back the tokens. With a proposer (proposers.py: a draft model or prompt lookup) a step instead
checks every row's proposed tokens in one forward and keeps, per row, the accepted ones and one more:

- greedy rows keep proposals while they equal the target's argmax, so the output is plain greedy's, token
  for token;
- sampled rows use the standard acceptance rule (accept a token with probability min(1, p/q), else sample
  max(0, p - q) renormalised), which keeps the target's distribution; prompt lookup proposes with certainty
  (q is one token).

Before a checking step every cache is marked, and each row is rolled back past its first rejection, exactly,
past the sliding window too (see models/cache.py and models/batch_cache.py). The target's cache lags the
row's tokens by one (the last one is the next input); the draft's by two (see proposers.py). Gemma 4's
assistant keeps no cache: it reads the target's caches and the hidden states of each forward (`hidden`).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..models import is_encoder_decoder
from ..models.batch_cache import BatchEncoderDecoderCache, merge_caches
from .constrained import masked_logprobs
from .sampling import Sampler, normalize, sample


def forward(model, tokens: mx.array, cache, hidden: bool = False):
    """Logits (B, L, vocab) for decoder tokens: a decoder-only model, or T5Gemma 2's decoder on its cache.
    hidden: (logits, the last hidden states), for a proposer that reads them (Gemma 4's assistant)."""
    if is_encoder_decoder(model):
        return model.decode_step(tokens, cache=cache)
    return model(tokens, cache=cache, return_hidden=True) if hidden else model(tokens, cache=cache)


def reads_target(proposer) -> bool:
    """Whether a proposer drafts from the target's hidden states and caches (Gemma 4's assistant)."""
    return bool(getattr(proposer, "reads_target", False))


def last_prompt_step(model, tokens: mx.array, cache, proposer=None) -> tuple:
    """Feed the prompt's last token(s) (1, L): (the logits (vocab,) that follow, what a proposer that reads the
    target starts the row from (its hidden state there, (1, D)), else None)."""
    if not reads_target(proposer):
        return forward(model, tokens, cache)[0, -1], None
    logits, h = forward(model, tokens, cache, hidden=True)
    return logits[0, -1], h[:, -1]


def cache_state(cache) -> list:
    return [(c.keys, c.values) for c in cache if c.keys is not None]


def fill(model, cache, ids: List[int], step: int = 2048) -> None:
    """Feed ids into cache in chunks of `step`, evaluating only the cache (no logits)."""
    for start in range(0, len(ids), step):
        forward(model, mx.array(ids[start : start + step])[None], cache)
        mx.eval(cache_state(cache))


def prefill_logits(model, cache, ids: List[int], step: int = 2048) -> mx.array:
    """Feed ids into cache; returns the logits (vocab,) that follow the last id."""
    fill(model, cache, ids[:-1], step)
    return forward(model, mx.array(ids[-1:])[None], cache)[0, -1]


def prefill(model, cache, ids: List[int], step: int = 2048) -> mx.array:
    """Feed ids into cache; returns the log-probabilities (vocab,) that follow the last id."""
    return normalize(prefill_logits(model, cache, ids, step))


def with_row(model, batch, cache):
    """The caches of a batch (None: empty) with one more row's caches after its rows. A batch of one keeps the
    single-sequence caches as they are."""
    if batch is None:
        return cache
    if is_encoder_decoder(model):
        return BatchEncoderDecoderCache.merge([batch, cache])
    return merge_caches([batch, cache])


def keep_rows(batch, indices: List[int]) -> None:
    """Only these rows of a batch's caches stay, in this order (a batch of one on its own caches: as it is)."""
    if isinstance(batch, BatchEncoderDecoderCache):
        batch.keep(indices)
    elif hasattr(batch[0], "keep"):
        for c in batch:
            c.keep(indices)


@dataclass
class Row:
    """One sequence being decoded. `seq`: every token of it (prompt and output; the last one is the next
    input), `prompt` how many of them the caller gave; `room` how many tokens it may still emit (a proposal
    never goes past it); `tag` is the caller's."""

    sampler: Sampler
    seq: List[int]
    room: int
    constraint: Optional[object] = None  # constrained.Constraint
    sources: tuple = ()  # more token lists for prompt lookup (T5Gemma 2: the encoder's ids)
    tag: object = None
    prompt: int = 0
    proposed: int = 0
    accepted: int = 0
    probs: list = field(default_factory=list)  # the draft's distribution of each proposal (sampled rows)


@dataclass
class Emitted:
    token: int
    logprob: float
    step: mx.array  # the step's log-probabilities, (B, vocab) or (vocab,)
    row: Optional[int] = None  # this token's row of them
    from_draft: bool = False

    @property
    def logprobs(self) -> mx.array:
        """(vocab,), for top logprobs (sliced only when asked: most callers never are)."""
        return self.step if self.row is None else self.step[self.row]


class Decoder:
    def __init__(self, model, proposer=None, num_draft: int = 3, kv: tuple = (None, 64, 0)):
        """kv: (bits, group size, start) of --kv-bits: a single-sequence cache is quantized once it holds
        `start` tokens (batch caches are quantized from the start by whoever made them)."""
        self.model, self.proposer, self.num_draft, self.kv = model, proposer, num_draft, kv
        self.reads_target = reads_target(proposer)
        self.rows: List[Row] = []
        self.cache = None
        self.inflight = None  # a queued plain step: (logprobs, tokens, chosen)

    def __len__(self) -> int:
        return len(self.rows)

    # Rows in and out

    def add(self, row: Row, cache, draft_cache=None) -> None:
        """A row whose cache holds row.seq but its last token (with a draft model's cache: but its last two;
        for Gemma 4's assistant, draft_cache is the target's hidden state before the last token, from
        last_prompt_step). A batch of one keeps the single-sequence caches as they are. A queued step must have been
        taken first (its tokens were sampled: dropping it would change the rows' random streams)."""
        assert self.inflight is None, "take the queued step before adding a row"
        self.cache = with_row(self.model, self.cache, cache)
        self.rows.append(row)
        if self.proposer is not None:
            self.proposer.add(draft_cache)

    def keep(self, indices: List[int]) -> None:
        """Only these rows stay, in this order."""
        self.rows = [self.rows[i] for i in indices]
        if self.proposer is not None:
            self.proposer.keep(indices)
        if not indices:
            self.cache, self.inflight = None, None
            return
        if self.inflight is not None:
            index = mx.array(indices, dtype=mx.int32)
            self.inflight = tuple(x[index] for x in self.inflight)
        keep_rows(self.cache, indices)

    def extract(self, b: int):
        """Row b's cache as single-sequence caches (copied: the batch may change afterwards). It holds the
        row's tokens but the last, or all of them while a queued step has fed it (see `held`)."""
        if isinstance(self.cache, BatchEncoderDecoderCache):
            return self.cache.extract(b)
        if not hasattr(self.cache[0], "extract"):
            return self.cache  # a batch of one on its own caches
        return [c.extract(b) for c in self.cache]

    def held(self, b: int) -> int:
        """How many of row b's tokens its cache holds."""
        return len(self.rows[b].seq) - (0 if self.inflight is not None else 1)

    def start(self, row: Row, logits: mx.array) -> Emitted:
        """The row's first token, from the prefill's logits (vocab,), by the same rules as every step; the
        caller then adds the row unless that token ended it."""
        self.rows.append(row)
        try:
            logprobs = self._processed(logits[None, None], [[]], [row])[0, 0]
        finally:
            self.rows.pop()
        token = int(row.sampler.draw(logprobs).item())
        self._advance(row, [token])
        return Emitted(token, logprobs[token].item(), logprobs)

    # Steps

    def step(self, ahead: bool = False) -> List[List[Emitted]]:
        """One step of every row: the tokens each emits. ahead: queue the next plain step before returning
        (its forward runs while the caller streams these tokens); not where a row is constrained or a proposer
        may propose."""
        if self.proposer is not None:
            self._quantize()  # before the proposer marks its cache
            proposals = self.proposer.propose(self.rows, self.num_draft, self.cache)
            if any(proposals):
                return self._check(proposals)
            ahead = False  # the next step may check proposals: nothing is queued ahead of it
        return self._plain(ahead)

    def _launch(self, inputs: Optional[mx.array] = None):
        """One plain step of every row, queued (mx.async_eval): log-probabilities, tokens, their logprobs.
        inputs: each row's next token as a lazy array (the step before's, not yet on the host)."""
        rows = self.rows
        if inputs is None:
            inputs = mx.array([row.seq[-1] for row in rows], dtype=mx.int32)
        logits = forward(self.model, inputs[:, None], self.cache, hidden=self.reads_target)
        if self.reads_target:  # (never queued ahead: a proposer may propose at the next step)
            logits, self.hidden = logits
        self._quantize()
        logprobs = self._processed(logits, [[] for _ in rows], rows)[:, 0]
        tokens = sample(logprobs, [row.sampler for row in rows])
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        mx.async_eval(tokens, chosen)
        return logprobs, tokens, chosen

    def _plain(self, ahead: bool) -> List[List[Emitted]]:
        logprobs, tokens, chosen = self.inflight or self._launch()
        self.inflight = None
        # The next step is queued on these tokens before they reach the host (as mlx-lm's loop does), unless a
        # row's mask or penalty needs them there first.
        if ahead and all(row.constraint is None and not row.sampler.options.repetition_penalty for row in self.rows):
            self.inflight = self._launch(tokens)
        tokens, chosen_list = tokens.tolist(), chosen.tolist()
        for row, token in zip(self.rows, tokens):
            self._advance(row, [token])
        if self.reads_target:
            self.proposer.settle([0] * len(tokens), 0, self.hidden)
        return [[Emitted(t, lp, logprobs, b)] for b, (t, lp) in enumerate(zip(tokens, chosen_list))]

    def _quantize(self) -> None:
        from ..models.quantized_cache import quantize_cache

        bits, group_size, start = self.kv
        if bits is not None and isinstance(self.cache, list):
            quantize_cache(self.cache, start, group_size, bits)
            if self.proposer is not None and getattr(self.proposer, "cache", None) is not None:
                quantize_cache(self.proposer.cache, start, group_size, bits)

    def _advance(self, row: Row, tokens: List[int]) -> None:
        row.seq += tokens
        row.room -= len(tokens)
        if row.constraint is not None:
            for token in tokens:
                row.constraint.consume(token)

    @staticmethod
    def _processed(logits: mx.array, proposals: List[List[int]], rows: List[Row]) -> mx.array:
        """Log-probabilities (B, L, vocab) from logits, with each row's repetition penalty (mlx-lm's, on the
        logits; plain steps) and its constraint's masks along its proposal applied. The forward is queued
        first: the masks are computed while it runs."""
        if any(row.sampler.options.repetition_penalty for row in rows):
            logits = mx.stack([row.sampler.penalized(logits[b], row.seq) for b, row in enumerate(rows)])
        logprobs = normalize(logits)
        if all(row.constraint is None for row in rows):
            return logprobs
        mx.async_eval(logprobs)
        L = logprobs.shape[1]
        words = next(row.constraint for row in rows if row.constraint is not None).bitmask.shape[1]
        bitmask = np.full((len(rows), L, words), -1, dtype=np.int32)
        for b, row in enumerate(rows):
            if row.constraint is not None:
                masks = row.constraint.masks_along(proposals[b])
                bitmask[b] = np.concatenate([masks, np.repeat(masks[-1:], L - len(masks), axis=0)])
        return masked_logprobs(logprobs, bitmask)

    def _check(self, proposals: List[List[int]]) -> List[List[Emitted]]:
        """Verify every row's proposals in one forward; roll each row back past its first rejection."""
        rows, K = self.rows, max(len(p) for p in proposals)
        inputs = [[row.seq[-1]] + p + [row.seq[-1]] * (K - len(p)) for row, p in zip(rows, proposals)]
        for c in self.cache:  # (step() quantized the caches before the proposer ran: marks see final objects)
            c.mark()
        logits = forward(self.model, mx.array(inputs, dtype=mx.int32), self.cache, hidden=self.reads_target)
        logits, hidden = logits if self.reads_target else (logits, None)
        logprobs = self._processed(logits, proposals, rows)
        mx.eval(logprobs, cache_state(self.cache))
        kept, finals, out = [], [], []
        for b, (row, proposal) in enumerate(zip(rows, proposals)):
            k, final = self._accept(row, logprobs[b], proposal)
            kept.append(k)
            finals.append(final)
            emitted = proposal[:k] + [final]
            chosen = mx.take_along_axis(logprobs[b, : len(emitted)], mx.array(emitted)[:, None], axis=-1)[:, 0].tolist()
            out.append([Emitted(t, lp, logprobs[b, i], from_draft=i < k)
                        for i, (t, lp) in enumerate(zip(emitted, chosen))])
            row.proposed, row.accepted = row.proposed + len(proposal), row.accepted + k
        for c in self.cache:  # (still marked: a caller that stops mid-way rolls back what it did not take)
            c.rollback([K - k for k in kept])
        self.proposer.settle(kept, K, hidden)
        for row, k, final, proposal in zip(rows, kept, finals, proposals):
            self._advance(row, proposal[:k] + [final])
            row.probs = []
        return out

    @staticmethod
    def _accept(row: Row, logprobs: mx.array, proposal: List[int]):
        """(how many proposals the target keeps, the token after them) from (1 + K, vocab) logprobs."""
        sampler = row.sampler
        if sampler.greedy:
            best = mx.argmax(logprobs[: len(proposal) + 1], axis=-1).tolist()
            kept = next((i for i, t in enumerate(proposal) if best[i] != t), len(proposal))
            return kept, best[kept]
        p = sampler.probs(logprobs[: len(proposal) + 1])
        for i, token in enumerate(proposal):
            q = row.probs[i] if row.probs else None
            q_token = q[token].item() if q is not None else 1.0
            if sampler.uniform() < min(1.0, p[i, token].item() / max(q_token, 1e-30)):
                continue
            residual = mx.maximum(p[i] - (q if q is not None else _one_hot(token, p.shape[-1])), 0)
            total = residual.sum().item()
            return i, sampler.draw_from(residual / total) if total > 0 else int(mx.argmax(p[i]).item())
        return len(proposal), sampler.draw_from(p[len(proposal)])


def _one_hot(token: int, n: int) -> mx.array:
    return (mx.arange(n) == token).astype(mx.float32)

"""Speculative decoding: a draft model, or prompt lookup (n-gram matching), proposes tokens; the target checks
them all in one forward; every cache rolls back past the first rejection.

Exact, past the window too: before each check every rotating cache is marked (models/cache.py), so rolling
back the rejected tokens restores what the check overwrote in the ring. (mlx-lm's speculative loop trims its
rotating caches, which cannot be trimmed once they wrap: its output leaves plain greedy's after the window.)
Greedy output is plain greedy's token for token; with sampling, the standard acceptance rule (accept a
proposed token with probability min(1, p/q), else sample max(0, p - q) renormalised) keeps the target's
distribution. Prompt lookup proposes with certainty (q is one token), so its rule is: accept with probability
p, else sample p without that token.

This module is the decode loop only; generate.py prepares prompts and caches and turns the steps into text.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import mlx.core as mx

from .batch import cache_state, fill, filtered
from .constrained import masked_logprobs
from ..errors import MlxGemmaError
from ..models.quantized_cache import quantize_cache


@dataclass
class Step:
    """One emitted token, its log-probabilities (vocab,), whether a proposal gave it, and the totals so far."""

    token: int
    logprobs: mx.array
    from_draft: bool
    proposed: int
    accepted: int


@dataclass
class Sampler:
    """The target's and the draft's per-position distribution: temperature, then mlx-lm's filters."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def logprobs(self, logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution a token is drawn from (temp > 0): the batch sampler's filters, then temperature."""
        return mx.softmax(filtered(logprobs, self.top_p, self.min_p, self.top_k) * (1.0 / self.temp), axis=-1)

    def draw(self, logprobs: mx.array) -> int:
        if self.temp == 0:
            return int(mx.argmax(logprobs, axis=-1).item())
        return int(mx.random.categorical(mx.log(self.probs(logprobs))).item())


def lookup(seq: List[int], ngram: int, n: int, sources=()) -> List[int]:
    """Prompt lookup: the n tokens that followed the latest earlier occurrence of the last `ngram` tokens of
    seq, searched in seq, then in `sources` (T5Gemma 2: the encoder's ids); [] when there is none."""
    if n <= 0 or len(seq) < ngram:
        return []
    tail = seq[-ngram:]
    for hay, last in [(seq, len(seq) - ngram - 1)] + [(src, len(src) - ngram) for src in sources]:
        for start in range(last, -1, -1):
            if hay[start:start + ngram] == tail and start + ngram < len(hay):
                return hay[start + ngram:start + ngram + n]
    return []


@dataclass
class Draft:
    """A draft model proposing with its own caches; `pending` are the tokens it has not fed yet."""

    model: object
    cache: list
    sampler: Sampler
    pending: List[int] = field(default_factory=list)
    probs: List[mx.array] = field(default_factory=list)  # q of each proposal (sampling)

    def propose(self, seq: List[int], n: int, constraint=None) -> List[int]:
        """n tokens, drawn one at a time (inside the constraint, when there is one: more of them are then
        accepted); the draft feeds all but the last (kept for the next round)."""
        tokens, self.probs = [], []
        if n == 0:
            return tokens
        mark(self.cache)
        feed, consumed = self.pending, 0
        for _ in range(n):
            logprobs = self.sampler.logprobs(self.model(mx.array([feed]), cache=self.cache)[0, -1])
            if constraint is not None:
                logprobs = masked_logprobs(logprobs, constraint.mask())
            token = self.sampler.draw(logprobs)
            if self.sampler.temp > 0:
                self.probs.append(self.sampler.probs(logprobs))
            tokens.append(token)
            feed = [token]
            if constraint is not None:
                consumed += constraint.consume(token)
        if constraint is not None:
            constraint.rollback(consumed)
        self.pending = []
        return tokens

    def settle(self, proposal: List[int], kept: int, final: int) -> None:
        """After the check: the draft keeps what the target kept."""
        if not proposal:
            self.pending = self.pending + [final]
        elif kept < len(proposal):
            rewind(self.cache, len(proposal) - 1 - kept)
            self.pending = [final]
        else:
            self.pending = [proposal[-1], final]


def mark(cache) -> None:
    for c in cache:
        if hasattr(c, "mark"):
            c.mark()


def unmark(cache) -> None:
    """End the journals (what they hold is released): for a cache that is kept, not checked again."""
    for c in cache:
        if hasattr(c, "unmark"):
            c.unmark()


def rewind(cache, n: int) -> None:
    if n > 0 and not all(c.trim(n) == n for c in cache):
        raise MlxGemmaError(f"a cache could not roll back {n} tokens exactly")  # never happens once marked


def steps(model, ids: List[int], cache, *, sampler: Sampler, draft: Optional[Draft] = None,
          ngram: int = 0, num_draft: int = 3, max_tokens: int = 256, prefill_step_size: int = 2048,
          history: List[int] = (), sources: tuple = (), kv: tuple = (None, 64, 0),
          constraint=None) -> Iterator[Step]:
    """Yield the tokens after ids, proposed by `draft` or by prompt lookup over the last `ngram` tokens.
    The cache holds `history` and gets ids but the last prefilled here; the draft's cache, fresh, gets
    both. When the caller stops, the cache is left holding history, ids and the tokens yielded (the last
    one possibly not yet fed), as mlx-lm's loop leaves it. kv: (bits, group size, start) of --kv-bits.
    constraint (constrained.Constraint): the target's distributions are masked at every checked position (a
    proposal the constraint refuses is then rejected by the rule itself) and the draft proposes inside it."""
    bits, group_size, start = kv
    seq = list(history) + list(ids)
    fill(model, cache, list(ids[:-1]), prefill_step_size)
    if draft is not None:
        fill(draft.model, draft.cache, seq[:-1], prefill_step_size)
        draft.pending = [seq[-1]]
        def propose(seq, n):
            return draft.propose(seq, n, constraint)
    else:
        def propose(seq, n):
            return lookup(seq, ngram, n, sources)
    y = seq[-1]
    proposed_total = accepted_total = emitted = 0
    extra = 0  # tokens the cache holds beyond those yielded
    try:
        while emitted < max_tokens:
            quantize_cache(cache, start, group_size, bits)
            if draft is not None:
                quantize_cache(draft.cache, start, group_size, bits)
            proposal = propose(seq, min(num_draft, max_tokens - emitted - 1))
            mark(cache)
            logprobs = sampler.logprobs(model(mx.array([[y] + proposal]), cache=cache)[0])
            if constraint is not None:
                mx.async_eval(logprobs)  # the masks are computed while the check runs
                logprobs = masked_logprobs(logprobs, constraint.masks_along(proposal))
            mx.eval(logprobs, cache_state(cache))
            kept, final = _accept(sampler, logprobs, proposal, draft.probs if draft is not None else None)
            for token in (proposal[:kept] + [final]) if constraint is not None else ():
                constraint.consume(token)
            rewind(cache, len(proposal) - kept)
            if draft is not None:
                draft.settle(proposal, kept, final)
            proposed_total, accepted_total = proposed_total + len(proposal), accepted_total + kept
            for i, token in enumerate(proposal[:kept] + [final]):
                extra = kept - i - 1
                emitted += 1
                yield Step(token, logprobs[i], i < kept, proposed_total, accepted_total)
                if emitted >= max_tokens:
                    return
            seq += proposal[:kept] + [final]
            y, extra = final, 0
    finally:
        rewind(cache, extra)


def _accept(sampler: Sampler, logprobs: mx.array, proposal: List[int], q: Optional[List[mx.array]]):
    """(how many proposals the target keeps, the token after them)."""
    if sampler.temp == 0:
        best = mx.argmax(logprobs, axis=-1).tolist()
        kept = next((i for i, t in enumerate(proposal) if best[i] != t), len(proposal))
        return kept, best[kept]
    p = sampler.probs(logprobs)
    for i, token in enumerate(proposal):
        q_token = q[i][token] if q else mx.array(1.0)
        if mx.random.uniform().item() < min(1.0, (p[i, token] / q_token).item()):
            continue
        residual = mx.maximum(p[i] - (q[i] if q else _one_hot(token, p.shape[-1])), 0)
        return i, int(mx.random.categorical(mx.log(residual / residual.sum())).item())
    return len(proposal), int(mx.random.categorical(mx.log(p[len(proposal)])).item())


def _one_hot(token: int, n: int) -> mx.array:
    return (mx.arange(n) == token).astype(mx.float32)


@dataclass
class Response:
    """What mlx-lm's stream_generate yields (its GenerationResponse fields that generate.py reads), plus
    the proposals so far: `proposed` draft tokens, `accepted` of them."""

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str]
    proposed: int = 0
    accepted: int = 0


def stream(model, tokenizer, ids: List[int], cache, *, max_tokens: int = 256, **options) -> Iterator[Response]:
    """steps() as mlx-lm's stream_generate streams its loop: text through the streaming detokenizer, stop at
    an eos id (finish "stop") or after max_tokens ("length")."""
    detokenizer, eos = tokenizer.detokenizer, set(tokenizer.eos_token_ids)
    detokenizer.reset()
    tic = time.perf_counter()
    prompt_tps, n, step = 0.0, 0, None
    for n, step in enumerate(steps(model, ids, cache, max_tokens=max_tokens, **options)):
        if n == 0:
            prompt_tps, tic = len(ids) / (time.perf_counter() - tic), time.perf_counter()
        done = "stop" if step.token in eos else "length" if n + 1 == max_tokens else None
        if done == "stop":
            break
        detokenizer.add_token(step.token)
        if done:
            break
        yield _response(detokenizer.last_segment, step, len(ids), prompt_tps, n, tic, None)
    detokenizer.finalize()
    yield _response(detokenizer.last_segment, step, len(ids), prompt_tps, n, tic, "stop" if step.token in eos else
                    "length")


def _response(text, step: Step, prompt_tokens, prompt_tps, n, tic, finish) -> Response:
    return Response(text, step.token, step.logprobs, step.from_draft, prompt_tokens, prompt_tps, n + 1,
                    (n + 1) / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9, finish,
                    step.proposed, step.accepted)

"""What proposes tokens for the decoder to check (speculative decoding): prompt lookup, or a draft model.

A proposer sees the decoder's rows, in the decoder's order, and proposes at most `n` tokens for each (never
more than the row's room less the one token a check always adds). After the check it hears how many of
each row's proposals were kept (`settle`), so that its own state follows the rows.
"""

from typing import List

import mlx.core as mx

from .decoder import fill, forward, keep_rows, with_row
from .sampling import normalize


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


class PromptLookup:
    """Proposes what followed the row's last `ngram` tokens where they occurred before. Stateless."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def add(self, cache) -> None:
        pass

    def keep(self, indices) -> None:
        pass

    def propose(self, rows, n: int) -> List[List[int]]:
        return [lookup(row.seq, self.ngram, min(n, row.room - 1), row.sources) for row in rows]

    def settle(self, kept, proposed: int) -> None:
        pass


class DraftModel:
    """A smaller model of the same tokenizer proposing for every row, drawn one token at a time with the
    row's own sampler (inside the row's constraint, when it has one: more proposals are then accepted).
    Its caches lag each row's tokens by two: each round feeds the last two tokens in one forward (the
    first of them again after a round that rejected, since it was rolled back; a round that kept every
    proposal left exactly these two to feed), so every row of the batch feeds alike."""

    def __init__(self, model):
        self.model = model
        self.cache = None

    def prepare(self, ids: List[int], max_kv_size=None, step: int = 2048, cache=None):
        """A draft cache for a row whose tokens are ids plus the first generated one: it holds ids but the
        last (the row's tokens but the last two). cache: a prepared one (T5Gemma 2: its encoder's)."""
        cache = cache if cache is not None else self.model.make_cache(max_kv_size=max_kv_size)
        # A one-token prompt is fed as it is, so that no draft cache is empty in a batch: the draft then sees
        # it twice, which changes only what it proposes (the check keeps the output exact).
        fill(self.model, cache, ids[:-1] if len(ids) > 1 else ids, step)
        return cache

    def add(self, cache) -> None:
        self.cache = with_row(self.model, self.cache, cache)

    def keep(self, indices) -> None:
        if not indices:
            self.cache = None
        else:
            keep_rows(self.cache, indices)

    def propose(self, rows, n: int) -> List[List[int]]:
        n = min(n, max(row.room - 1 for row in rows))
        if n <= 0:
            return [[] for _ in rows]
        for c in self.cache:
            c.mark()
        feed = mx.array([row.seq[-2:] for row in rows], dtype=mx.int32)
        # A row draws only its own proposals (its room), whatever the others need: its random stream must
        # not depend on what else is in the batch. Past its room it follows the argmax, which is discarded.
        limits = [min(n, row.room - 1) for row in rows]
        drawn, consumed = [], [0] * len(rows)
        for i in range(n):
            logprobs = normalize(forward(self.model, feed, self.cache)[:, -1])
            if any(row.constraint is not None for row in rows):
                from .constrained import masked_logprobs

                logprobs = mx.stack([lp if row.constraint is None or i >= limits[b] else
                                     masked_logprobs(lp, row.constraint.mask()) for b, (lp, row) in
                                     enumerate(zip(logprobs, rows))])
            best = mx.argmax(logprobs, axis=-1)
            drawing = [i < limits[b] and not row.sampler.greedy for b, row in enumerate(rows)]
            tokens = (mx.stack([row.sampler.draw(logprobs[b]) if d else best[b] for b, (row, d) in
                                enumerate(zip(rows, drawing))]) if any(drawing) else best).tolist()
            for b, row in enumerate(rows):
                if i >= limits[b]:
                    continue
                if not row.sampler.greedy:
                    row.probs.append(row.sampler.probs(logprobs[b]))
                if row.constraint is not None:
                    consumed[b] += row.constraint.consume(tokens[b])
            drawn.append(tokens)
            feed = mx.array(tokens, dtype=mx.int32)[:, None]
        for row, c in zip(rows, consumed):
            if row.constraint is not None:
                row.constraint.rollback(c)
        return [[drawn[i][b] for i in range(limits[b])] for b in range(len(rows))]

    def settle(self, kept, proposed: int) -> None:
        """The draft fed the last two tokens and proposed - 1 proposals: keep those the target kept."""
        for c in self.cache:
            c.rollback([proposed - k for k in kept])
            c.unmark()

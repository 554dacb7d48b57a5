"""What proposes tokens for the decoder to check (speculative decoding): prompt lookup, a draft model, or
Gemma 4's assistant drafter.

A proposer sees the decoder's rows, in the decoder's order (and the target's caches), and proposes at most
`n` tokens for each (never more than the row's room less the one token a check always adds). After the
check it hears how many of each row's proposals were kept (`settle`, with the target's hidden states of the
check for a proposer that reads them), so that its own state follows the rows.
"""

from typing import List

import mlx.core as mx

from ..errors import MlxGemmaError
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

    def propose(self, rows, n: int, target_cache=None) -> List[List[int]]:
        return [lookup(row.seq, self.ngram, min(n, row.room - 1), row.sources) for row in rows]

    def settle(self, kept, proposed: int, hidden=None) -> None:
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

    def propose(self, rows, n: int, target_cache=None) -> List[List[int]]:
        n = min(n, max(row.room - 1 for row in rows))
        if n <= 0:
            return [[] for _ in rows]
        for c in self.cache:
            c.mark()
        feed = mx.array([row.seq[-2:] for row in rows], dtype=mx.int32)

        def step(tokens):
            return forward(self.model, feed if tokens is None else tokens, self.cache)[:, -1]
        return draw_proposals(rows, n, step)

    def settle(self, kept, proposed: int, hidden=None) -> None:
        """The draft fed the last two tokens and proposed - 1 proposals: keep those the target kept."""
        for c in self.cache:
            c.rollback([proposed - k for k in kept])
            c.unmark()


class Assistant:
    """Gemma 4's assistant drafter (models/gemma4_assistant.py) proposing for every row from the target's own
    state: the target's keys (read from the target's caches, which hold each row's tokens but the last) and,
    per row, the target's hidden state at the token before the last (from the prefill's last step, then from
    each check: the state of the last kept position). Drawn as DraftModel draws. No cache of its own."""

    reads_target = True

    def __init__(self, model, target):
        from ..models.distributed import world

        model.check_target(target)
        if world().size() > 1:
            raise MlxGemmaError("a Gemma 4 assistant drafts on one process: it cannot read keys split across the "
                                "ranks of mlx.launch (leave --draft-model out there, or use --prompt-lookup-ngram)")
        self.model, self.target, self.state = model, target, None  # state: (B, D), a row each

    def add(self, state) -> None:
        self.state = state if self.state is None else mx.concatenate([self.state, state], axis=0)

    def keep(self, indices) -> None:
        self.state = self.state[mx.array(indices, dtype=mx.int32)] if indices else None

    def propose(self, rows, n: int, target_cache=None) -> List[List[int]]:
        n = min(n, max(row.room - 1 for row in rows))
        if n <= 0:
            return [[] for _ in rows]
        tokens = mx.array([[row.seq[-1]] for row in rows], dtype=mx.int32)
        shared, offset = self.model.target_states(self.target, target_cache)  # positions stay within a round
        state = self.state[:, None]

        def step(drawn):
            nonlocal state
            inputs = self.model.inputs(self.target, tokens if drawn is None else drawn, state)
            logits, state = self.model(inputs, shared, offset)
            return logits[:, -1]
        return draw_proposals(rows, n, step)

    def settle(self, kept, proposed: int, hidden=None) -> None:
        """The target's state at each row's last kept position of the check (kept[b]: the one that gave the
        token after the kept proposals)."""
        self.state = hidden[mx.arange(hidden.shape[0]), mx.array(kept, dtype=mx.int32)]


def draw_proposals(rows, n: int, step) -> List[List[int]]:
    """n rounds of drafting: step(None), then step(the tokens just drawn, (B, 1)), gives each round's logits
    (B, vocab). Each row draws with its own sampler inside its constraint, only its own proposals (its room):
    its random stream must not depend on what else is in the batch; past its room it follows the argmax,
    which is discarded. Sampled rows keep each proposal's distribution (row.probs) for the acceptance rule."""
    limits = [min(n, row.room - 1) for row in rows]
    drawn, consumed, tokens = [], [0] * len(rows), None
    for i in range(n):
        logprobs = normalize(step(tokens))
        if any(row.constraint is not None for row in rows):
            from .constrained import masked_logprobs

            logprobs = mx.stack([lp if row.constraint is None or i >= limits[b] else
                                 masked_logprobs(lp, row.constraint.mask()) for b, (lp, row) in
                                 enumerate(zip(logprobs, rows))])
        best = mx.argmax(logprobs, axis=-1)
        drawing = [i < limits[b] and not row.sampler.greedy for b, row in enumerate(rows)]
        chosen = (mx.stack([row.sampler.draw(logprobs[b]) if d else best[b] for b, (row, d) in
                            enumerate(zip(rows, drawing))]) if any(drawing) else best).tolist()
        for b, row in enumerate(rows):
            if i >= limits[b]:
                continue
            if not row.sampler.greedy:
                row.probs.append(row.sampler.probs(logprobs[b]))
            if row.constraint is not None:
                consumed[b] += row.constraint.consume(chosen[b])
        drawn.append(chosen)
        tokens = mx.array(chosen, dtype=mx.int32)[:, None]
    for row, c in zip(rows, consumed):
        if row.constraint is not None:
            row.constraint.rollback(c)
    return [[drawn[i][b] for i in range(limits[b])] for b in range(len(rows))]

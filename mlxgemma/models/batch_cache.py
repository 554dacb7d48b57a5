"""Caches for a batch of independent sequences decoding together (the server's continuous batching).

Each row keeps its own position: row b's next token sits at position `offset[b]` (an array, so RoPE rotates
every row at its own position), its token at position p lives in slot p of a full layer's buffer and in
slot p % window of a sliding layer's, exactly as in the single-sequence caches of cache.py. So a row is
moved in (`merge`) and out (`extract`) without reordering anything, and rows of any lengths, some far
past the window, attend exactly as they would alone: the mask hides only the slots a row has not filled.

Rows are prefilled one request at a time with the single-sequence caches (the same code path as
generation), then merged; the batch only ever takes one token per row per step. mlx-lm's BatchKVCache /
BatchRotatingKVCache are not used: they left-pad rows to a shared write index and cannot hand back an
exact per-row rotating cache once it has wrapped (what the prompt cache keeps).
"""

from typing import List, Optional

import mlx.core as mx

from .cache import from_state
from .encoder_decoder_cache import EncoderDecoderCache

STEP = 256  # buffers grow in steps, as mlx-lm's


def _pad_to(x, size: int):
    """Zero slots appended along axis 2 up to `size` (of an array, or of each array of a quantized triple)."""
    if isinstance(x, tuple):
        return tuple(_pad_to(a, size) for a in x)
    if x.shape[2] >= size:
        return x[..., :size, :]
    return mx.concatenate([x, mx.zeros((*x.shape[:2], size - x.shape[2], x.shape[3]), x.dtype)], axis=2)


def _stack(blocks: list, size: int):
    if isinstance(blocks[0], tuple):
        return tuple(_stack([b[i] for b in blocks], size) for i in range(len(blocks[0])))
    return mx.concatenate([_pad_to(b, size) for b in blocks], axis=0)


def _map(fn, x):
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def _leaves(x) -> list:
    return list(x) if isinstance(x, tuple) else [x]


def _map2(fn, x, y):
    return tuple(fn(a, b) for a, b in zip(x, y)) if isinstance(x, tuple) else fn(x, y)


def _rolled(slot: int, new: int, old: int, window: int) -> bool:
    """Whether a ring slot was written by a position in [new, old) (what a rollback to `new` undoes)."""
    first = new + (slot - new) % window  # the first position >= new that lives in this slot
    return first < old


def _parts(c) -> dict:
    """What a merge takes of a cache: a batch's own fields, or a single cache's state and description."""
    if isinstance(c, _BatchCache):
        return dict(lengths=c.lengths, window=c.window, quantized=c.quantized, keys=c.keys, values=c.values)
    meta, state = c.meta_state, c.state
    if len(state) % 2:
        raise ValueError("a cache with padding cannot join a batch")
    n = len(state) // 2
    group = lambda xs: tuple(xs) if n > 1 else xs[0]  # noqa: E731  (a quantized cache's triples)
    quantized = (meta["group_size"], meta["bits"]) if meta.get("bits") else None
    return dict(lengths=[meta["offset"]], window=meta.get("max_size"), quantized=quantized,
                keys=group(state[:n]), values=group(state[n:]))


class _BatchCache:
    """Shared by both kinds: per-row offsets (an array for RoPE and masks, a list for sizes) and buffers."""

    window: Optional[int] = None
    quantized: Optional[tuple] = None  # (group size, bits) of quantized rows (--kv-bits)
    journal: Optional[tuple] = None  # the buffers at mark(), for rollback

    def __init__(self, keys, values, lengths: List[int]):
        self.keys, self.values, self.lengths = keys, values, list(lengths)
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    def _slots(self, longest: int) -> int:
        return longest if self.window is None else min(longest, self.window)

    def _slot(self) -> mx.array:
        return self.offset if self.window is None else self.offset % self.window

    @classmethod
    def merge(cls, caches: list):
        """One batch from single-sequence caches (B=1 each: read through their state) or batches of this kind,
        rows in order."""
        parts = [_parts(c) for c in caches]
        lengths = [n for p in parts for n in p["lengths"]]
        self = cls.__new__(cls)
        self.window = next((p["window"] for p in parts if p["window"] is not None), None)
        self.quantized = parts[0]["quantized"]
        size = self._slots(max(lengths))
        _BatchCache.__init__(self, _stack([p["keys"] for p in parts], size), _stack([p["values"] for p in parts], size),
                             lengths)
        return self

    def extract(self, b: int):
        """Row b as a single-sequence cache (its slots copied out, so the batch can change afterwards)."""
        n = self.lengths[b]
        take = lambda a: mx.contiguous(a[b : b + 1, :, : self._slots(n)])  # noqa: E731
        meta = {"kind": "full", "offset": n} if self.window is None else {"kind": "rotating", "offset": n,
                                                                          "max_size": self.window}
        if self.quantized:
            meta.update(group_size=self.quantized[0], bits=self.quantized[1])
        return from_state([take(a) for x in (self.keys, self.values) for a in _leaves(x)], meta)

    def keep(self, rows: List[int]) -> None:
        """Only these rows stay, in this order; buffers shrink to what the longest remaining row needs."""
        self.journal = None
        self.lengths = [self.lengths[i] for i in rows]
        index = mx.array(rows, dtype=mx.int32)
        size = self._slots(max(self.lengths))
        self.keys, self.values = (_map(lambda a: a[index, :, :size], x) for x in (self.keys, self.values))
        self.offset = self.offset[index]

    def mask(self, L: int, valid=None) -> mx.array:
        """Which keys each row's queries (at positions offset[b] + i) see. One token: a full layer the slots
        0..offset[b]; a sliding layer every filled slot (all lie inside the window). Several (speculative
        verification): a full layer the slots up to each query's position; a sliding layer the ring as it was
        before this step, by the position each slot holds, followed by the new keys causally."""
        if valid is not None:
            raise ValueError("a batch cache takes unpadded tokens")
        if L == 1:
            filled = self.offset + 1 if self.window is None else mx.minimum(self.offset + 1, self.window)
            size = self._slots(max(self.lengths) + 1)
            return (mx.arange(size)[None] < filled[:, None])[:, None, None, :]
        query = self.offset[:, None] + mx.arange(L)[None]  # (B, L)
        if self.window is None:
            size = max(self.lengths) + L
            return (mx.arange(size)[None, None] <= query[:, :, None])[:, None]
        W, held = self.window, self._slots(max(self.lengths))
        before = self.offset[:, None] - 1
        position = before - (before - mx.arange(held)[None]) % W  # (B, held): what each slot holds
        old = (position[:, None] >= 0) & (position[:, None] > query[:, :, None] - W)
        new = mx.broadcast_to(mx.tril(mx.ones((L, L), dtype=mx.bool_))[None], (old.shape[0], L, L))
        return mx.concatenate([old, new], axis=2)[:, None]

    def record_padding(self, L: int, valid=None) -> None:
        pass

    def peek(self) -> tuple:
        """(keys, values, mask (B, 1, 1, S)) of every token each row holds (see KVCache.peek): the filled slots."""
        size = self._slots(max(self.lengths))
        filled = self.offset if self.window is None else mx.minimum(self.offset, self.window)
        cut = lambda x: _map(lambda a: a[..., :size, :], x)  # noqa: E731
        return cut(self.keys), cut(self.values), (mx.arange(size)[None] < filled[:, None])[:, None, None, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write each row's L new tokens at its own slots; returns what attention reads (see mask)."""
        if self.quantized:
            from .quantized_cache import quantize_kv

            keys, values = quantize_kv(keys, values, *self.quantized)
        L = (keys[0] if isinstance(keys, tuple) else keys).shape[2]
        if self.window is not None and L > self.window:
            raise ValueError(f"a batch cache takes at most its window ({self.window}) tokens a step")
        longest = max(self.lengths)
        if L > 1 and self.window is not None:  # several tokens on a sliding layer read the ring as it was
            ring = self._slots(longest)
            before = (_map(lambda a: a[..., :ring, :], self.keys), _map(lambda a: a[..., :ring, :], self.values))
        size = self._slots(longest + L)
        held = (self.keys[0] if isinstance(self.keys, tuple) else self.keys).shape[2]
        if size > held:
            grown = max(held + STEP, size)
            grown = grown if self.window is None else min(grown, self.window)
            self.keys, self.values = _pad_to(self.keys, grown), _pad_to(self.values, grown)
        slots = self.offset[:, None] + mx.arange(L)[None]
        slots = slots if self.window is None else slots % self.window

        def put(buf, new):
            return mx.put_along_axis(buf, mx.broadcast_to(slots[:, None, :, None], new.shape), new, axis=2)
        if self.quantized:
            self.keys = tuple(put(b, n) for b, n in zip(self.keys, keys))
            self.values = tuple(put(b, n) for b, n in zip(self.values, values))
        else:
            self.keys, self.values = put(self.keys, keys), put(self.values, values)
        self.offset = self.offset + L
        self.lengths = [n + L for n in self.lengths]
        if L > 1 and self.window is not None:  # the ring before this step, then the new keys
            join = lambda old, new: _map2(lambda o, n: mx.concatenate([o, n], axis=2), old, new)  # noqa: E731
            return join(before[0], keys), join(before[1], values)
        return (_map(lambda a: a[..., :size, :], self.keys), _map(lambda a: a[..., :size, :], self.values))

    # Speculative verification: mark before a step of several tokens, then roll each row back by its own count.

    def mark(self) -> None:
        """Remember the buffers (updates are not in place, so they stay as they are) for rollback."""
        self.journal = (self.keys, self.values)

    def unmark(self) -> None:
        self.journal = None

    def rollback(self, counts) -> None:
        """Drop the newest counts[b] tokens of each row b (not before the mark): offsets go back and, on a
        sliding layer, the ring slots those tokens overwrote get back what they held."""
        counts = [int(c) for c in counts]
        if not any(counts):
            return
        lengths = [n - c for n, c in zip(self.lengths, counts)]
        # Without a mark only the last token can go: its slot is written again before anything reads it.
        if self.window is not None and self.journal is None and max(counts) > 1:
            raise ValueError("a sliding batch cache rolls back more than one token only to a mark")
        if self.window is not None and self.journal is not None:
            keys, values = self.journal[:2]
            size = (self.keys[0] if isinstance(self.keys, tuple) else self.keys).shape[2]
            restore = mx.array([[_rolled(s, n, old, self.window) for s in range(size)]
                                for n, old in zip(lengths, self.lengths)])[:, None, :, None]
            self.keys = _map2(lambda cur, prev: mx.where(restore, _pad_to(prev, size), cur), self.keys, keys)
            self.values = _map2(lambda cur, prev: mx.where(restore, _pad_to(prev, size), cur), self.values, values)
        self.lengths = lengths
        self.offset = mx.array(lengths, dtype=mx.int32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for x in (self.keys, self.values) for a in (x if isinstance(x, tuple) else (x,)))


def merge_caches(rows: list) -> list:
    """Per layer, one batch cache from each row's list of layer caches (single or batch)."""
    return [_BatchCache.merge(list(layer)) for layer in zip(*rows)]


class BatchEncoderDecoderCache(list):
    """T5Gemma 2's decoder rows batched: self-attention batch caches, and each layer's encoder keys and
    values padded to the longest encoder output, with the padding masked out (`encoder_valid`)."""

    def __init__(self, self_caches: list, cross: list, encoder_valid: mx.array):
        super().__init__(self_caches)
        self.cross, self.encoder_valid = cross, encoder_valid

    @classmethod
    def merge(cls, caches: list):
        parts = [(c.cross, c.encoder_valid if c.encoder_valid is not None
                  else mx.ones((1, c.cross[0][0].shape[2]), dtype=mx.bool_)) for c in caches]
        size = max(valid.shape[1] for _, valid in parts)
        cross = [(_stack([p[0][i][0] for p in parts], size), _stack([p[0][i][1] for p in parts], size))
                 for i in range(len(parts[0][0]))]
        valid = mx.concatenate([mx.pad(v, [(0, 0), (0, size - v.shape[1])]) for _, v in parts], axis=0)
        return cls(merge_caches([list(c) for c in caches]), cross, valid)

    def quantized_cross(self) -> list:
        return self.cross  # (batches are not quantized: the server keeps float caches)

    def keep(self, rows: List[int]) -> None:
        index = mx.array(rows, dtype=mx.int32)
        for c in self:
            c.keep(rows)
        self.cross = [(k[index], v[index]) for k, v in self.cross]
        self.encoder_valid = self.encoder_valid[index]

    def extract(self, b: int) -> EncoderDecoderCache:
        return EncoderDecoderCache([c.extract(b) for c in self], [(k[b : b + 1], v[b : b + 1]) for k, v in self.cross],
                                   self.encoder_valid[b : b + 1])

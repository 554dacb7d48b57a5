"""KV caches and the attention masks they imply.

Every cache is asked, before a forward adds L tokens, for the mask those L queries need (`mask`), is told
which of the L tokens are padding (`record_padding`), and then stores the new keys (`update_and_fetch`).
Positions are absolute: query i sits at `offset + i`.

Full-attention layers use a growing cache (mlx-lm's KVCache, restated here: it grows in steps of 256 and
writes in place) plus a record of which keys were padding, so a left-padded batch keeps masking its pads
while it decodes. It is restated rather than imported because importing any part of mlx-lm runs its
package __init__, which imports transformers (and torch, where installed): seconds of start-up for
`import mlxgemma` and for users who only run models.

Sliding layers use our RotatingKVCache rather than mlx-lm's: theirs keeps up to max_size + L - 1 keys after
a multi-token update and cannot be trimmed once it wraps. Ours keeps exactly the last `window` tokens, the
token at position p in slot p % window, so memory stops growing at the window, a decode step writes one slot
in place and may attend to every slot (all of them lie inside its window), and trimming stays exact.
"""

from typing import Optional

import mlx.core as mx


def causal_mask(q_start: int, L: int, k_start: int, S: int, window: Optional[int] = None,
                key_valid: Optional[mx.array] = None, bidirectional: bool = False) -> mx.array:
    """Boolean 'may attend' for queries at positions q_start.. and keys at k_start..: (L, S), or
    (B, 1, L, S) with key_valid (B, S). Causal means j <= i; a window means i - j < window (transformers'
    strict bound: W keys including itself); bidirectional means |i - j| < window (or everything).
    A padded query would have nothing to attend to (NaN in a softmax on some backends), so every query
    may always see itself; its output is never read."""
    q = mx.arange(q_start, q_start + L)[:, None]
    k = mx.arange(k_start, k_start + S)[None]
    if bidirectional:
        allowed = mx.abs(q - k) < window if window else mx.ones((L, S), dtype=mx.bool_)
    else:
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
    if key_valid is not None:
        allowed = (allowed[None, None] & key_valid[:, None, None, :]) | (k == q)
    return allowed


def uncached_mask(L: int, valid: Optional[mx.array], window: Optional[int], bidirectional: bool = False):
    """The mask of a forward without a cache; None or "causal" where the fused kernel needs no array."""
    if valid is None:
        if bidirectional and window is None:
            return None
        if not bidirectional and (L == 1 or window is None or L <= window):
            return "causal" if L > 1 else None
    return causal_mask(0, L, 0, L, window, valid, bidirectional)


def _new_valid(L: int, valid: Optional[mx.array], batch: int) -> mx.array:
    return valid if valid is not None else mx.ones((batch, L), dtype=mx.bool_)


class KVCache:
    """The growing cache of full-attention layers (mlx-lm's KVCache: grown in steps, written in place, the
    same state layout), plus which cached keys are padding."""

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0
        self.key_valid = None  # (B, offset) bool, None while no padding was seen

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        keys, values = self.encode(keys, True), self.encode(values)
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            grow = (self.step + L - 1) // self.step * self.step
            new_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        if self.offset == self.keys.shape[2]:
            return self.keys, self.values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def encode(self, x: mx.array, key: bool = False) -> mx.array:
        """How keys and values are stored (as given; a test's fake quantization overrides this)."""
        return x

    # The cache's state (cache files, the prompt cache and batches use only this): the arrays it holds, what
    # they mean, and a cache rebuilt from them.
    @property
    def state(self) -> list:
        """The arrays held: keys then values (one array each, or a quantized triple each) up to the offset,
        then the padding record when there is one."""
        if self.keys is None:
            return []
        cut = [a[..., : self.offset, :] for a in _leaves(self.keys) + _leaves(self.values)]
        return cut + ([self.key_valid] if self.key_valid is not None else [])

    @property
    def meta_state(self) -> dict:
        """What the arrays are: the kind, the tokens held, and the quantization (JSON-ready)."""
        meta = {"kind": "full", "offset": self.offset}
        if getattr(self, "bits", None):
            meta.update(bits=self.bits, group_size=self.group_size)
        return meta

    def copy(self):
        """The same state in a new cache (no array is copied: updates write new buffers or in place into
        this one's, never into the copy's)."""
        return from_state([a[...] for a in self.state], self.meta_state)

    windowed = False  # holds only the last tokens (a sliding window): going back needs a snapshot

    def can_cut(self, position: int) -> bool:
        return position <= self.offset

    def cut(self, position: int):
        """A new cache holding the first `position` tokens of this one."""
        new = self.copy()
        new.trim(self.offset - position)
        return new

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    # Speculative verification (the decoder's interface, shared with the batch caches): mark before a step
    # of several tokens, roll back the rejected ones. A full cache is cut back at any time.
    def mark(self) -> None:
        pass

    def unmark(self) -> None:
        pass

    def rollback(self, counts) -> None:
        """Drop the newest counts[0] tokens (one row: a list, as for a batch), exactly, or fail."""
        _rollback(self, counts)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        """The same tokens, stored quantized (mlx-lm's generate loop calls this for --kv-bits)."""
        from .quantized_cache import QuantizedKVCache

        return QuantizedKVCache.from_cache(self, group_size, bits)

    def mask(self, L: int, valid: Optional[mx.array] = None):
        if valid is None and self.key_valid is None:
            return "causal" if L > 1 else None
        return causal_mask(self.offset, L, 0, self.offset + L, None, self._valid_with(L, valid))

    def record_padding(self, L: int, valid: Optional[mx.array]) -> None:
        if valid is not None or self.key_valid is not None:
            self.key_valid = self._valid_with(L, valid)

    def peek(self) -> tuple:
        """(keys, values, mask) of every token held, for a reader that adds none of its own and sees them all
        (Gemma 4's assistant drafter): mask None, or (B, 1, 1, S) where padding is hidden."""
        cut = lambda x: _tree(lambda a: a[..., : self.offset, :], x)  # noqa: E731
        mask = None if self.key_valid is None else self.key_valid[:, None, None, : self.offset]
        return cut(self.keys), cut(self.values), mask

    def _valid_with(self, L, valid):
        batch = (valid if valid is not None else self.key_valid).shape[0]
        old = self.key_valid[:, : self.offset] if self.key_valid is not None else (
            mx.ones((batch, self.offset), dtype=mx.bool_))
        return mx.concatenate([old, _new_valid(L, valid, batch)], axis=1)


def _ring_update(buf: Optional[mx.array], x: mx.array, offset: int, window: int, step: int = 256):
    """Add x (B, H, L, D), the tokens at positions offset.., to a ring buffer that holds position p in
    slot p % window. Returns (buffer, what attention sees): for one token the filled slots (slot order, all
    inside the window), for several the held tokens oldest first followed by x (the mask does the rest)."""
    L = x.shape[2]
    if L == 1:
        slot = offset % window
        if buf is None or slot >= buf.shape[2]:  # still filling up: grow in steps, up to the window
            grow = min(step, window - (0 if buf is None else buf.shape[2]))
            new = mx.zeros((*x.shape[:2], grow, x.shape[3]), dtype=x.dtype)
            buf = new if buf is None else mx.concatenate([buf, new], axis=2)
        buf[..., slot : slot + 1, :] = x
        held = min(offset + 1, window)
        return buf, (buf if held == buf.shape[2] else buf[..., :held, :])
    seen = x if buf is None else mx.concatenate([_oldest_first(buf, offset, window), x], axis=2)
    end = offset + L
    tail = seen[..., -min(end, window):, :]
    shift = end % window if end > window else 0  # slot of the oldest kept token
    # A slice shares its parent's buffer: copy it, or a long prefill's keys all stay allocated.
    return (mx.roll(tail, shift, axis=2) if shift else mx.contiguous(tail)), seen


def _rollback(cache, counts) -> None:
    n = int(counts[0]) if isinstance(counts, (list, tuple)) else int(counts)
    if n > 0 and cache.trim(n) != n:
        from ..errors import MlxGemmaError

        raise MlxGemmaError(f"a cache could not roll back {n} tokens exactly")  # never happens once marked


def _tree(fn, x):
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def _oldest_first(buf: mx.array, offset: int, window: int) -> mx.array:
    if offset <= window:
        return buf[..., :offset, :]
    return mx.roll(buf, -(offset % window), axis=2)


class RotatingKVCache:
    """Window-bounded cache for sliding-window layers: holds exactly the last `max_size` tokens.

    Speculative decoding rolls back tokens the target rejected, after the ring may have wrapped over the
    tokens it needs back. `mark()` starts a journal: each update since keeps what it replaced (the previous
    buffers, left untouched because journaled writes are not in place, and the update's own keys), so
    `trim` can go back to any position since the mark exactly."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.keys = self.values = None
        self.offset = 0
        self.key_valid = None  # (B, 1, slots, 1) bool in the key slots' layout; None while no padding
        self.journal = None  # since mark(): [(offset, keys, values, key_valid, new keys, new values)]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.journal is not None:
            self.journal.append((self.offset, self.keys, self.values, self.key_valid, keys, values))
            if keys.shape[2] == 1 and self.keys is not None:  # a one-token write would be in place
                self.keys, self.values = _tree(mx.array, self.keys), _tree(mx.array, self.values)
        self.keys, k = self._ring(self.keys, self.encode(keys, True))
        self.values, v = self._ring(self.values, self.encode(values))
        self.offset += keys.shape[2]
        return k, v

    def encode(self, x: mx.array, key: bool = False):
        """How keys and values are stored (QuantizedRotatingKVCache quantizes them)."""
        return x

    def _ring(self, buf, x):
        """_ring_update on an array or on each array of a quantized triple."""
        if not isinstance(x, tuple):
            return _ring_update(buf, x, self.offset, self.max_size)
        parts = [_ring_update(None if buf is None else b, p, self.offset, self.max_size) for b, p in
                 zip(buf or (None,) * len(x), x)]
        return tuple(p[0] for p in parts), tuple(p[1] for p in parts)

    def mark(self) -> None:
        """Start (or restart) the journal that makes trim exact back to this point."""
        self.journal = []

    def unmark(self) -> None:
        self.journal = None

    def mask(self, L: int, valid: Optional[mx.array] = None):
        W = self.max_size  # the window (smaller under max_kv_size)
        held = min(self.offset, W)
        if valid is None and self.key_valid is None:
            if L == 1:
                return None
            if self.offset + L <= W:
                return "causal"
            return causal_mask(self.offset, L, self.offset - held, held + L, W)
        old = self._held_valid(valid)
        new = _new_valid(L, valid, old.shape[0])
        if L > 1:
            return causal_mask(self.offset, L, self.offset - held, held + L, W,
                               mx.concatenate([_oldest_first(old, self.offset, W)[:, 0, :, 0], new], 1))
        slot = self.offset % W
        if self.offset < W:
            kv = mx.concatenate([old[:, 0, : self.offset, 0], new], axis=1)
        else:
            kv = mx.where(mx.arange(W) == slot, new, old[:, 0, :W, 0])
        return (kv | (mx.arange(kv.shape[1]) == slot))[:, None, None, :]

    def record_padding(self, L: int, valid: Optional[mx.array]) -> None:
        if valid is None and self.key_valid is None:
            return
        old = self._held_valid(valid)
        new = _new_valid(L, valid, old.shape[0])[:, None, :, None]
        self.key_valid, _ = _ring_update(old, new, self.offset, self.max_size)

    def peek(self) -> tuple:
        """As KVCache.peek: the ring's tokens in slot order (a reader that adds no key sees all of them: they are
        the last `max_size` tokens)."""
        held = min(self.offset, self.max_size)
        cut = lambda x: _tree(lambda a: a[..., :held, :], x)  # noqa: E731
        mask = None if self.key_valid is None else self.key_valid[:, 0, :held, 0][:, None, None, :]
        return cut(self.keys), cut(self.values), mask

    def _held_valid(self, valid):
        if self.key_valid is not None:
            return self.key_valid
        held = min(self.offset, self.max_size)
        return mx.ones((valid.shape[0], 1, held, 1), dtype=mx.bool_)

    # The cache's state, as KVCache's: the ring in its slot layout.
    @property
    def state(self) -> list:
        if self.keys is None:
            return []
        return _leaves(self.keys) + _leaves(self.values) + ([self.key_valid] if self.key_valid is not None else [])

    @property
    def meta_state(self) -> dict:
        meta = {"kind": "rotating", "max_size": self.max_size, "offset": self.offset}
        if getattr(self, "bits", None):
            meta.update(bits=self.bits, group_size=self.group_size)
        return meta

    def copy(self):
        return from_state([a[...] for a in self.state], self.meta_state)

    windowed = True

    def can_cut(self, position: int) -> bool:
        """Exactly back to `position`: anywhere until the ring has wrapped, after that one token back."""
        return position <= self.offset and (self.offset <= self.max_size or position >= self.offset - 1)

    def cut(self, position: int):
        if not self.can_cut(position):
            raise ValueError(f"a window of {self.max_size} that holds {self.offset} tokens cannot go back to {position}")
        new = self.copy()
        new.trim(self.offset - position)
        return new

    def size(self) -> int:
        return min(self.offset, self.max_size)

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def rollback(self, counts) -> None:
        """Drop the newest counts[0] tokens exactly (back to the mark, past the window too), or fail."""
        _rollback(self, counts)

    def trim(self, n: int) -> int:
        """Drop the newest n tokens, as far as it stays exact: all of them until the buffer has wrapped,
        after that one (the tokens before it have been overwritten), or back to the mark when journaled."""
        if self.journal is not None and self.offset > self.max_size and self.key_valid is None:  # (no padding)
            return self._rewind(n)
        n = min(n, self.offset if self.offset <= self.max_size else 1)
        self.offset -= n
        return n

    def _rewind(self, n: int) -> int:
        """Back to position offset - n (not before the mark): the state before the update that wrote it,
        plus that update's first tokens again."""
        if not self.journal:
            return 0
        target = max(self.offset - n, self.journal[0][0])
        while self.journal and self.journal[-1][0] > target:
            self.journal.pop()
        if not self.journal:
            return 0
        offset, keys, values, valid, new_k, new_v = self.journal.pop()
        done = self.offset - target
        self.keys, self.values, self.key_valid, self.offset = keys, values, valid, offset
        if target > offset:  # re-apply the kept part of that update (journaled: it can still be undone)
            self.update_and_fetch(new_k[..., : target - offset, :], new_v[..., : target - offset, :])
        return done

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in _leaves(self.keys) + _leaves(self.values))

    def to_quantized(self, group_size: int = 64, bits: int = 8):
        """The same window, stored quantized (mlx-lm's generate loop calls this for --kv-bits)."""
        from .quantized_cache import QuantizedRotatingKVCache

        return QuantizedRotatingKVCache.from_cache(self, group_size, bits)


def _leaves(x) -> list:
    return list(x) if isinstance(x, tuple) else [x]


def from_state(state: list, meta: dict):
    """The cache a state and meta_state describe (a full or rotating cache, float or quantized); a state
    that does not fit its description is a ValueError saying what is wrong."""
    kind, offset = meta.get("kind"), meta.get("offset")
    if kind not in ("full", "rotating") or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"not a cache description: {meta}")
    quantized = meta.get("bits") is not None
    if quantized:
        from .quantized_cache import QuantizedKVCache, QuantizedRotatingKVCache

        bits, group = meta.get("bits"), meta.get("group_size")
        if bits not in (4, 8) or group not in (32, 64, 128):
            raise ValueError(f"not a quantized cache: bits {bits}, group size {group}")
        cache = QuantizedKVCache(group, bits) if kind == "full" else QuantizedRotatingKVCache(meta["max_size"], group, bits)
    else:
        cache = KVCache() if kind == "full" else RotatingKVCache(meta["max_size"])
    cache.offset = offset
    parts = 3 if quantized else 1
    if not state:
        if offset:
            raise ValueError(f"a cache of {offset} tokens holds no keys")
        return cache
    if len(state) not in (2 * parts, 2 * parts + 1):
        raise ValueError(f"a cache state has {len(state)} arrays, expected {2 * parts} (+1 for padding)")
    held = offset if kind == "full" else min(offset, cache.max_size)
    shapes = [tuple(a.shape) for a in state[: 2 * parts]]
    if any(len(s) != 4 or s[2] < held or s[:3] != shapes[0][:3] for s in shapes):
        raise ValueError(f"a cache's keys and values are misshapen: {shapes}")
    keys, values = state[:parts], state[parts:2 * parts]
    cache.keys, cache.values = (tuple(keys), tuple(values)) if quantized else (keys[0], values[0])
    cache.key_valid = state[2 * parts] if len(state) > 2 * parts else None
    return cache

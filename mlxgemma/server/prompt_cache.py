"""The server's prompt cache: the caches of recent sequences, so that a request sharing a prefix with one of
them prefills only the rest (the next turn of a conversation prefills just the new message).

A kept entry is a sequence of token ids with its single-sequence caches at its end, plus snapshots of its
sliding-window caches at earlier points: each prompt it grew from, less that prompt's last token (where a
request repeating the prompt, a regenerated reply, restarts), and the end of the entry it extended. Reuse must never change an
output, so a request reuses exactly what can be restored: full-attention caches are cut back to any
point; a window-bounded cache holds only the last `window` tokens, so once it has wrapped it can go back at
most one token, and further back only to a snapshot (earlier tokens are gone from it). At least one token
of every request is left to prefill, for its first logits.

Bounded by entries and bytes, least recently used out; a sequence that extends a kept one replaces it (the
new entry keeps the old end as a snapshot, so it can serve everything the old one could).
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np


MAX_SNAPSHOTS = 4  # per entry: the ends of its last few prompts


@dataclass
class Snapshot:
    position: int
    states: list  # per layer: a copy of a sliding layer's cache there, None for a full one (it is cut instead)


@dataclass
class Entry:
    tokens: List[int]
    caches: list
    snapshots: List[Snapshot] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches) + sum(c.nbytes for s in self.snapshots for c in s.states if c)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def snapshot(caches: list, position: int) -> Snapshot:
    """The sliding layers' state at `position` (copies: the caches go on changing)."""
    return Snapshot(position, [c.copy() if c.windowed else None for c in caches])


def _reach(entry: Entry, c: int) -> Tuple[int, Optional[Snapshot]]:
    """How far (<= c tokens) entry can be restored to exactly, and the snapshot that takes (None: its end)."""
    if all(x.can_cut(c) for x in entry.caches):
        return c, None
    best = max((s for s in entry.snapshots if s.position <= c), key=lambda s: s.position, default=None)
    return (best.position, best) if best else (0, None)


def restore(entry: Entry, position: int, snap: Optional[Snapshot]) -> list:
    """New caches holding entry's first `position` tokens: a sliding layer from the snapshot there (when one
    is used), every other layer cut back."""
    return [snap.states[i].copy() if snap is not None and snap.states[i] is not None else c.cut(position)
            for i, c in enumerate(entry.caches)]


class PromptCache:
    def __init__(self, max_size: int = 10, max_bytes: Optional[int] = None):
        self.max_size, self.max_bytes = max_size, max_bytes
        self.entries: "OrderedDict[int, Entry]" = OrderedDict()
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def fetch(self, tokens: List[int]) -> Tuple[int, Optional[list], List[Snapshot]]:
        """(reused tokens, caches holding them or None, snapshots a new entry inherits) for a request."""
        best, best_key = (0, None), None
        for key, entry in self.entries.items():
            reach = _reach(entry, common_prefix(entry.tokens, tokens[:-1]))
            if reach[0] > best[0]:
                best, best_key = reach, key
        if best_key is None:
            return 0, None, []
        entry = self.entries[best_key]
        self.entries.move_to_end(best_key)
        position, snap = best
        inherited = [s for s in entry.snapshots if s.position <= position]
        if snap is None and position == len(entry.tokens):
            inherited.append(snapshot(entry.caches, position))
        return position, restore(entry, position, snap), inherited

    def insert(self, tokens: List[int], caches: list, snapshots: List[Snapshot]) -> None:
        if self.max_size <= 0 or not tokens:
            return
        for key in [k for k, e in self.entries.items() if common_prefix(e.tokens, tokens) == len(e.tokens)]:
            del self.entries[key]  # a prefix of the new sequence: the new entry serves all it could
        self.entries[self._next] = Entry(list(tokens), caches, snapshots[-MAX_SNAPSHOTS:])
        self._next += 1
        while self.entries and (len(self.entries) > self.max_size or
                                (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            self.entries.popitem(last=False)

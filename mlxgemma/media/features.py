"""Media in a decoder's prompt (Gemma 3's images; Gemma 4's images, audio and video frames): encoding with a
per-process feature cache, and the prefill that keeps each media block whole.

A block is a run of placeholder tokens (the model's `media_token_ids`) that the encoded features replace, one
row per token; `features` below are always those rows for a prompt's blocks in order, (slots, D). Image
blocks attend within themselves, future tokens included, so a prefill chunk may not end inside a block:
chunks grow to the end of the block they would cut (audio blocks are kept whole too: it costs nothing).
Encoded items are kept by the digest of their processed inputs (so the same bytes under the same settings,
crops and budget included, hit), a bounded number of them, so a chat turn or a server conversation that sends
its photo or clip again is not encoded again."""

import hashlib
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import MlxGemmaError


def listed(items) -> list:
    """None, one item (a path, bytes, an image, an array) or a list of them -> a list."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, Path)) or not isinstance(items, Sequence):
        return [items]
    return list(items)


def media_tokens(model) -> dict:
    """The model's placeholder ids -> their token type (Gemma 3: its image token, type 1)."""
    tokens = getattr(model, "media_token_ids", None)
    return dict(tokens) if tokens is not None else {model.config.image_token_index: 1}


def digest(item: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(item):
        value = item[key]
        if isinstance(value, str):
            h.update(f"{key}={value};".encode())
            continue
        a = np.ascontiguousarray(np.asarray(value))
        h.update(f"{key}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class FeatureCache:
    """Each item's features, least recently used out past `max_items`."""

    def __init__(self, max_items: int = 64):
        self.max_items = max_items
        self.entries = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, pixel_values) -> mx.array:
        """Gemma 3: (N, 3, S, S) pixel values -> (N * tokens, hidden), the images' slots in order."""
        pixels = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        return self.encode_items(model, [{"pixel_values": p[None]} for p in pixels])

    def encode_items(self, model, items: List[dict]) -> mx.array:
        """Processed items (a processor's `prepare`) -> their features, concatenated in order (slots, D);
        only the items not seen are encoded (model.encode_media, in one call)."""
        keys = [(id(model), digest(i)) for i in items]
        # (an entry also holds a weak reference to its model: a new model may be given a freed one's id)
        new = [i for i, k in enumerate(keys) if k not in self.entries or self.entries[k][0]() is not model]
        new = list(dict((keys[i], i) for i in new).values())  # (the same item twice is encoded once)
        self.hits, self.misses = self.hits + len(keys) - len(new), self.misses + len(new)
        if new:
            features = model.encode_media([items[i] for i in new])
            mx.eval(features)
            for i, f in zip(new, features):
                self.entries[keys[i]] = (weakref.ref(model), f)
        out = mx.concatenate([self.entries[k][1] for k in keys])
        for k in keys:
            self.entries.move_to_end(k)
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
        return out


FEATURES = FeatureCache()


def chunks(ids: List[int], tokens, step: int) -> List[tuple]:
    """[(start, end)] covering ids in steps of at most `step`, except that no chunk ends inside a block."""
    out, start = [], 0
    while start < len(ids):
        end = block_end(ids, min(start + step, len(ids)), tokens)
        out.append((start, end))
        start = end
    return out


def block_end(ids: List[int], n: int, tokens) -> int:
    """n, moved on to the end of the block it would cut."""
    while 0 < n < len(ids) and ids[n - 1] in tokens and ids[n] in tokens:
        n += 1
    return n


def block_start(ids: List[int], n: int, tokens) -> int:
    """n, moved back to the start of the block it would cut (a reusable cache prefix ends there)."""
    while 0 < n < len(ids) and ids[n] in tokens and ids[n - 1] in tokens:
        n -= 1
    return n


def slots(ids: List[int], tokens) -> int:
    """How many placeholder tokens ids hold (the feature rows they take)."""
    return int(np.isin(np.asarray(ids, dtype=np.int64), list(tokens)).sum()) if len(ids) else 0


def prefill(model, cache, ids: List[int], features: Optional[mx.array] = None, step: int = 2048,
            progress: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """Run `ids` (blocks already expanded) through the model into `cache`, the features spliced in and each
    image block attending within itself. Returns the last chunk's logits, unevaluated (only the caches are
    evaluated: a chunk's logits over a 262k vocabulary would be gigabytes nobody reads)."""
    types_of = media_tokens(model)
    tokens = set(types_of)
    if features is not None and features.ndim == 3:  # (items, tokens, D): Gemma 3's get_image_features
        features = features.reshape(-1, features.shape[-1])
    need, given = slots(ids, tokens), 0 if features is None else features.shape[0]
    if need != given:
        raise MlxGemmaError(f"the prompt holds {need} media placeholder token(s) but the media give {given} "
                            "soft token(s): prepare text and media together with the model's processor")
    types = np.zeros(len(ids), dtype=np.int32)
    for token, kind in types_of.items():
        types[np.asarray(ids) == token] = kind
    done, logits = 0, None
    for start, end in chunks(ids, tokens, step):
        k = int((types[start:end] > 0).sum())
        inputs = model.media_inputs(features[done:done + k], types[None, start:end]) if k else {}
        logits = model(mx.array([ids[start:end]]), cache=cache, **inputs)
        mx.eval([c.state for c in cache])
        done += k
        if progress is not None:
            progress(end, len(ids))
    return logits


def encode_prompt(model, processor, text: str, images=(), audio=(), videos=(), **options):
    """(ids with every placeholder expanded, the media's features or None) of a text and its media;
    options go to the processor (Gemma 3: pan-and-scan, add_special_tokens; Gemma 4: max_soft_tokens)."""
    inputs, items = processor.prepare(text, images, audio, videos, **options)
    features = FEATURES.encode_items(model, items) if items else None
    return inputs["input_ids"][0].tolist(), features


def media_key(ids: List[int], items: List[dict], tokens) -> List[int]:
    """The prompt cache matches token ids, and every image's tokens are the same id: in the key each block's
    tokens become a negative number from the digest of its item (and the block's place in it: a video has a
    block per frame), so a cached prefix is reused only for the same media."""
    blocks = (-1 - int(hashlib.sha256(f"{digest(item)}:{b}".encode()).hexdigest()[:15], 16)
              for item in items for b in range(int(item.get("blocks", 1))))
    key, current = [], None
    for i, t in enumerate(ids):
        if t in tokens:
            current = next(blocks) if i == 0 or ids[i - 1] not in tokens else current
            key.append(current)
        else:
            key.append(t)
    return key


def media_from(ids: List[int], features: Optional[mx.array], start: int, tokens):
    """The features of the blocks at or after `start` (what a prefill of ids[start:] needs; start is not
    inside a block)."""
    if features is None:
        return None
    before = slots(ids[:start], tokens)
    return features[before:] if before < features.shape[0] else None

"""Images for decoder-only models (Gemma 3 with its tower): encoding with a per-process feature cache, and the
prefill that keeps each image block whole.

The block mask lets an image's tokens see each other, future ones included, so a prefill chunk may not end
inside an image: chunks grow to the end of the block they would cut. Encoded images are kept by the digest
of their pixel values (so the same bytes under the same preprocessing, crops included, hit), a bounded
number of them, so a chat turn or a server conversation that sends its photo again is not encoded again."""

import hashlib
import weakref
from collections import OrderedDict
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from ..errors import MlxGemmaError


class FeatureCache:
    """The projector's output per image, least recently used out past `max_images`."""

    def __init__(self, max_images: int = 64):
        self.max_images = max_images
        self.entries = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, pixel_values) -> mx.array:
        """(N, 3, S, S) pixel values -> (N, tokens, hidden) features; only the images not seen are encoded."""
        pixels = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        keys = [(id(model), hashlib.sha256(p.tobytes()).hexdigest()) for p in pixels]
        # (an entry also holds a weak reference to its model: a new model may be given a freed one's id)
        new = [i for i, k in enumerate(keys) if k not in self.entries or self.entries[k][0]() is not model]
        self.hits, self.misses = self.hits + len(keys) - len(new), self.misses + len(new)
        if new:
            features = model.get_image_features(pixels[new])
            mx.eval(features)
            for i, f in zip(new, features):
                self.entries[keys[i]] = (weakref.ref(model), f)
        out = mx.stack([self.entries[k][1] for k in keys])
        for k in keys:
            self.entries.move_to_end(k)
        while len(self.entries) > self.max_images:
            self.entries.popitem(last=False)
        return out


FEATURES = FeatureCache()


def chunks(ids: List[int], image_token: int, step: int) -> List[tuple]:
    """[(start, end)] covering ids in steps of at most `step`, except that no chunk ends inside an image."""
    out, start = [], 0
    while start < len(ids):
        end = block_end(ids, min(start + step, len(ids)), image_token)
        out.append((start, end))
        start = end
    return out


def block_end(ids: List[int], n: int, image_token: int) -> int:
    """n, moved on to the end of the image block it would cut."""
    while 0 < n < len(ids) and ids[n - 1] == image_token and ids[n] == image_token:
        n += 1
    return n


def count_images(ids: List[int], image_token: int) -> int:
    """How many image blocks begin in ids."""
    return sum(1 for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token))


def prefill(model, cache, ids: List[int], features: Optional[mx.array] = None, step: int = 2048,
            progress: Optional[Callable[[int, int], None]] = None) -> mx.array:
    """Run `ids` (image blocks already expanded) through the model into `cache`, image features spliced in
    and each image block attending within itself. Returns the last chunk's logits, unevaluated (only the
    caches are evaluated: a chunk's logits over a 262k vocabulary would be gigabytes nobody reads)."""
    image_token = model.config.image_token_index
    n_images, given = count_images(ids, image_token), 0 if features is None else features.shape[0]
    if n_images != given:
        raise MlxGemmaError(f"the prompt holds {n_images} image block(s) but {given} image(s) were given")
    types = np.asarray(ids) == image_token
    image, logits = 0, None
    for start, end in chunks(ids, image_token, step):
        k = count_images(ids[start:end], image_token)
        inputs = dict(image_features=features[image:image + k], token_type_ids=types[None, start:end]) if k else {}
        logits = model(mx.array([ids[start:end]]), cache=cache, **inputs)
        mx.eval([c.state for c in cache])
        image += k
        if progress is not None:
            progress(end, len(ids))
    return logits


def encode_prompt(model, processor, text: str, images, **options):
    """(ids with every image placeholder expanded, the images' features or None) of a text and its images;
    options go to the processor (pan-and-scan, add_special_tokens)."""
    inputs = processor(text, images or None, **options)
    features = FEATURES.encode(model, inputs["pixel_values"]) if "pixel_values" in inputs else None
    return inputs["input_ids"][0].tolist(), features


def images_from(ids: List[int], features: Optional[mx.array], start: int, image_token: int):
    """The features of the images whose blocks begin at or after `start` (what a prefill of ids[start:] needs)."""
    if features is None:
        return None
    before = count_images(ids[:start], image_token)
    return features[before:] if before < features.shape[0] else None


def block_start(ids: List[int], n: int, image_token: int) -> int:
    """n, moved back to the start of the image block it would cut (a reusable cache prefix ends there)."""
    while 0 < n < len(ids) and ids[n] == image_token and ids[n - 1] == image_token:
        n -= 1
    return n

"""Prompt-cache files: a prefilled prompt's caches as safetensors, so a long prefix (a document, a system
prompt) is prefilled once and every later run prefills only what it adds.

One file holds, per layer, the cache's state (its arrays, as the cache gives them: models/cache.py) and, in
the metadata, each cache's description (meta_state), the token ids the caches hold, and the model's identity: a digest of its config and of every weight's
name, shape, dtype and first values, so a file made with another model or a changed checkpoint is refused,
never continued with wrong output. A file is written atomically; a truncated or edited one is one clear error.

mlx-lm's save/load_prompt_cache are not used: they rebuild mlx-lm's cache classes by name, and ours differ
(models/cache.py says why).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MlxGemmaError
from ..models.cache import KVCache, RotatingKVCache, from_state

FORMAT = "mlxgemma-prompt-cache/2"  # /1 (before the caches described themselves) is refused: made again


def identity(model) -> str:
    """A digest of the model: its config and, for every weight, name, shape, dtype and first 16 values."""
    h = hashlib.sha256(repr(getattr(model, "config", None)).encode())
    for name, w in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
        h.update(np.array(w.reshape(-1)[:16].astype(mx.float32)).tobytes())
    return h.hexdigest()


def save(path, model, cache: list, tokens: List[int]) -> Path:
    """Write the caches (holding `tokens`) of `model` to path, atomically."""
    if not all(isinstance(c, (KVCache, RotatingKVCache)) for c in cache):
        raise MlxGemmaError("a prompt-cache file holds a decoder-only model's caches (T5Gemma 2 encodes each "
                            "request afresh)")
    if cache[0].offset != len(tokens):
        raise MlxGemmaError(f"the caches hold {cache[0].offset} tokens but {len(tokens)} token ids were given")
    arrays = {f"{i}.{j}": a for i, c in enumerate(cache) for j, a in enumerate(c.state)}
    kinds = [c.meta_state for c in cache]
    meta = {"format": FORMAT, "model": identity(model), "tokens": json.dumps(tokens), "caches": json.dumps(kinds)}
    path = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MlxGemmaError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        mx.save_safetensors(tmp, arrays, metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise MlxGemmaError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path, model, max_kv_size=None) -> Tuple[list, List[int]]:
    """(caches, the token ids they hold) from a file made for this model, or one clear error."""
    from .loading import check_safetensors

    path = Path(path).expanduser()
    check_safetensors(path)  # exists, a regular file, a header that matches the file
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise MlxGemmaError(f"cannot read the prompt-cache file {path}: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        old = str(meta.get("format", "")).startswith("mlxgemma-prompt-cache/")
        raise MlxGemmaError(f"{path} was made by an older mlxgemma: make it again with python -m mlxgemma.cache_prompt"
                            if old else f"{path} is not an mlxgemma prompt-cache file")
    if meta.get("model") != identity(model):
        raise MlxGemmaError(f"{path} was made with another model (or another --dtype, or the checkpoint changed "
                            "since): make it again with this model")
    try:
        tokens, kinds = json.loads(meta["tokens"]), json.loads(meta["caches"])
    except (KeyError, json.JSONDecodeError):
        raise MlxGemmaError(f"{path}: its metadata is damaged") from None
    fresh = model.make_cache(max_kv_size=max_kv_size)
    if len(kinds) != len(fresh) or not all(isinstance(t, int) for t in tokens):
        raise MlxGemmaError(f"{path}: its caches do not fit this model's layers")
    return [_restore(c, kind, arrays, i, len(tokens), path) for i, (c, kind) in enumerate(zip(fresh, kinds))], tokens


def _restore(fresh, kind, arrays: dict, i: int, n_tokens: int, path: Path):
    """Layer i's cache from the file, if it is of the kind this model makes (the window, --max-kv-size)."""
    expected = {k: v for k, v in fresh.meta_state.items() if k in ("kind", "max_size")}
    if (not isinstance(kind, dict) or {k: kind.get(k) for k in expected} != expected
            or kind.get("offset") != n_tokens):
        raise MlxGemmaError(f"{path}: layer {i}'s cache is {kind}, this model's is {expected} over {n_tokens} "
                            "tokens (another --max-kv-size, or a damaged file)")
    state, j = [], 0
    while f"{i}.{j}" in arrays:
        state.append(arrays[f"{i}.{j}"])
        j += 1
    try:
        return from_state(state, kind)
    except ValueError as e:
        raise MlxGemmaError(f"{path}: layer {i}: {e}") from None

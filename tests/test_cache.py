"""Window-bounded caches: memory stops at the window, trimming stays exact, mlx-lm drives our models."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlxgemma.models.cache import KVCache, RotatingKVCache
from reference import TOL, WINDOW, hf_logits, hf_model, max_diff, random_ids, save_and_load, tiny_tokenizer


def test_sliding_cache_holds_one_window(tmp_path):
    """After 3 windows of tokens a sliding layer's cache holds exactly the window; full layers grow."""
    model, _ = save_and_load(hf_model("gemma3"), tmp_path)
    cache = model.make_cache()
    ids = random_ids(1, 3 * WINDOW)
    model(mx.array(ids[:, :5]), cache=cache)
    sizes = []
    for t in range(5, ids.shape[1]):
        model(mx.array(ids[:, t : t + 1]), cache=cache)
        sizes.append([c.keys.shape[2] if isinstance(c, RotatingKVCache) else c.offset for c in cache])
    types = model.model.config.layer_types
    for i, t in enumerate(types):
        if t == "sliding_attention":
            assert isinstance(cache[i], RotatingKVCache)
            assert max(s[i] for s in sizes) == WINDOW and cache[i].keys.shape[2] == WINDOW
        else:
            assert isinstance(cache[i], KVCache) and cache[i].offset == 3 * WINDOW
    # a long prefill also leaves exactly one window behind
    cache = model.make_cache()
    model(mx.array(random_ids(1, 3 * WINDOW)), cache=cache)
    assert all(c.keys.shape[2] == WINDOW for c in cache if isinstance(c, RotatingKVCache))


@pytest.mark.parametrize("prefix,trim", [(4, 2), (2 * WINDOW + 1, 1)])
def test_trim_is_exact(prefix, trim, tmp_path):
    """Trimming the newest tokens (all of them before the ring wraps, one after) then going on with other
    tokens gives the logits of a fresh run on the edited sequence."""
    hf = hf_model("gemma2")
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(1, prefix + 2 * WINDOW)
    cache = model.make_cache()
    model(mx.array(ids[:, :prefix]), cache=cache)
    assert all(c.trim(trim) == trim for c in cache)
    edited = np.concatenate([ids[:, : prefix - trim], random_ids(1, 2 * WINDOW, seed=42)], axis=1)
    out = [np.array(model(mx.array(edited[:, t : t + 1]), cache=cache)) for t in range(prefix - trim, edited.shape[1])]
    assert max_diff(np.concatenate(out, 1), hf_logits(hf, edited)[:, prefix - trim :]) <= TOL


def test_trim_after_wrap_refuses_more_than_exact():
    cache = RotatingKVCache(4)
    for _ in range(9):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 2)), mx.zeros((1, 1, 1, 2)))
    assert cache.trim(3) == 1 and cache.offset == 8


@pytest.mark.parametrize("back", [1, 2, 4, 6, 7, 9])
def test_journaled_trim_is_exact_after_the_wrap(back):
    """Past the wrap, after mark(), a multi-token update and single-token ones roll back to any position
    since the mark: the ring then holds what a cache fed only up to there holds."""
    W, rng = 4, np.random.default_rng(back)
    tokens = [mx.array(rng.standard_normal((1, 1, 1, 2)).astype(np.float32)) for _ in range(20)]

    def feed(cache, start, end, step):
        for i in range(start, end, step):
            k = mx.concatenate(tokens[i:min(i + step, end)], axis=2)
            cache.update_and_fetch(k, k * 2)

    cache = RotatingKVCache(W)
    feed(cache, 0, 9, 3)
    cache.mark()
    feed(cache, 9, 14, 5)  # a verification of 5 tokens
    feed(cache, 14, 18, 1)  # then drafted ones, one at a time
    assert cache.trim(back) == back and cache.offset == 18 - back
    reference = RotatingKVCache(W)
    feed(reference, 0, 18 - back, 1)
    for ours, ref in zip((cache.keys, cache.values), (reference.keys, reference.values)):
        assert np.array_equal(np.array(ours), np.array(ref))
    cache.trim(100)  # never before the mark
    assert cache.offset == 9


def _tiny_tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(tiny_tokenizer())


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "stablelm"])
def test_mlx_lm_stream_generate(family, tmp_path):
    """mlx_lm.stream_generate runs our causal LMs, greedy tokens equal to transformers' generate."""
    from mlx_lm.generate import stream_generate

    hf = hf_model(family, eos_token_id=1, tie_word_embeddings=False)  # untied: random tied models echo one token
    model, _ = save_and_load(hf, tmp_path)
    prompt = random_ids(1, WINDOW + 2)[0].tolist()
    ours = [r.token for r in stream_generate(model, _tiny_tokenizer(), prompt, max_tokens=2 * WINDOW)]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=2 * WINDOW, do_sample=False, eos_token_id=1,
                          pad_token_id=0)[0, len(prompt) :].tolist()
    assert ours == ref


def test_long_prefill_frees_what_the_window_drops():
    """After one prefill of 4 windows, a sliding cache keeps one window allocated, not a view into all 4."""
    import gc

    from mlxgemma.models.cache import RotatingKVCache

    caches = [RotatingKVCache(WINDOW) for _ in range(8)]
    base = mx.get_active_memory()
    for c in caches:
        k, v = mx.random.normal((1, 2, 4 * WINDOW, 256)), mx.random.normal((1, 2, 4 * WINDOW, 256))
        c.update_and_fetch(k, v)
        mx.eval(c.keys, c.values)
        del k, v
    gc.collect()
    held = sum(c.nbytes for c in caches)
    assert held == 8 * 2 * (2 * WINDOW * 256 * 4)
    assert mx.get_active_memory() - base <= 1.5 * held

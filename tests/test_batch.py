"""Continuous batching and the prompt cache, below HTTP: a row's logits in a changing batch equal its logits
alone (the plain single-request generation path), for every decoder family and for T5Gemma 2; caches
restored from the prompt cache give the logits of a fresh prefill, past the window too."""

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from decode_util import GreedyBatch
from mlxgemma.decode.decoder import fill, prefill
from mlxgemma.decode.sampling import SamplingOptions, sample
from mlxgemma.server.prompt_cache import PromptCache, snapshot
from reference import (TOL, WINDOW, hf_model, hf_t5gemma2, image_prompt, max_diff, random_ids, random_pixels,
                       save_and_load, tiny_tokenizer)

STEPS = 2 * WINDOW + 2
LENGTHS = [1, 3, 5, WINDOW, WINDOW + 1, 2 * WINDOW, 2 * WINDOW + 3, 3 * WINDOW + 1]  # 8 rows, most past the window


def _prompts():
    return [[int(t) for t in random_ids(1, n, seed=n)[0]] for n in LENGTHS]


def _alone(model, prompt, steps):
    """Greedy tokens and their log-probabilities through mlxgemma's single-request path (no eos: every
    row runs its full length)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = TokenizerWrapper(tiny_tokenizer())
    tokenizer.eos_token_ids = []
    chunks = list(mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=steps))
    return [c.token for c in chunks], [c.logprob for c in chunks]


def _batched(model, prompts, steps, make_cache=None, first_inputs=None):
    """Rows join two steps apart and leave when done; returns each row's tokens and chosen logprobs, and the
    largest difference of a row's full log-probabilities from its own prefill path run alone."""
    make_cache = make_cache or (lambda i: model.make_cache())
    batch, rows, waiting, turn = GreedyBatch(model), [], list(range(len(prompts))), 0
    results = {}
    while waiting or rows:
        if waiting and turn % 2 == 0:
            i = waiting.pop(0)
            lp = batch.add(make_cache(i), prompts[i])
            tok = int(mx.argmax(lp))
            rows.append([i, [tok], [lp[tok].item()]])
        turn += 1
        if not rows:
            continue
        lps = batch.step()
        for r, (row, t) in enumerate(zip(rows, batch.last)):
            row[1].append(t)
            row[2].append(lps[r, t].item())
        done = [r for r, row in enumerate(rows) if len(row[1]) >= steps]
        for r in done:
            results[rows[r][0]] = rows[r][1:]
        keep = [r for r in range(len(rows)) if r not in done]
        rows = [rows[r] for r in keep]
        batch.keep(keep)
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "stablelm"])
def test_batch_rows_equal_single_requests(family, tmp_path):
    model, _ = save_and_load(hf_model(family), tmp_path)
    prompts = _prompts()
    for (tokens, logprobs), prompt in zip(_batched(model, prompts, STEPS), prompts):
        ref_tokens, ref_logprobs = _alone(model, prompt, STEPS)
        assert tokens == ref_tokens
        assert max_diff(logprobs, ref_logprobs) <= TOL


def test_batch_full_logits_equal_alone(tmp_path):
    """Every vocabulary entry, not just the chosen token's: Gemma 2 (softcaps, windows) with 8 rows."""
    model, _ = save_and_load(hf_model("gemma2"), tmp_path)
    prompts = _prompts()
    alone = []
    for p in prompts:
        cache = model.make_cache()
        out = [prefill(model, cache, p)]
        for _ in range(STEPS - 1):
            tok = int(mx.argmax(out[-1]))
            out.append(prefill(model, cache, [tok]))
        alone.append(mx.stack(out))
    batch = GreedyBatch(model)
    for p in prompts:
        batch.add(model.make_cache(), p)
    worst = 0.0
    for step in range(1, STEPS):
        lps = batch.step()
        worst = max(worst, max_diff(lps, mx.stack([a[step] for a in alone])))
    assert worst <= TOL


def test_t5gemma2_decoder_rows_batched(tmp_path):
    """Encoder once per request (different lengths, with and without images), decoder rows batched."""
    model, _ = save_and_load(hf_t5gemma2(), tmp_path)
    inputs = [(image_prompt(1, 5, seed=0), random_pixels(1, seed=0)), (image_prompt(0, 12, seed=1), None),
              (image_prompt(2, 3, seed=2), random_pixels(2, seed=2)), (image_prompt(0, 2, seed=3), None)]
    bos = model.config.decoder.bos_token_id

    def cache_for(i):
        ids, pixels = inputs[i]
        return model.make_cache(model.encode(mx.array([ids]), pixel_values=pixels))

    batched = _batched(model, [[bos]] * len(inputs), STEPS, make_cache=cache_for)
    for i, (tokens, logprobs) in enumerate(batched):
        cache = cache_for(i)
        ref = [prefill(model, cache, [bos])]
        for _ in range(STEPS - 1):
            ref.append(prefill(model, cache, [int(mx.argmax(ref[-1]))]))
        assert tokens == [int(mx.argmax(r)) for r in ref]
        assert max_diff(logprobs, [r[t].item() for r, t in zip(ref, tokens)]) <= TOL


def test_seeded_sampling_is_per_row():
    logprobs = mx.log(mx.softmax(mx.random.normal((3, 50), key=mx.random.key(0)), axis=-1))
    draw = lambda seeds: [sample(logprobs, [SamplingOptions(temp=1.0, seed=s).sampler() for s in seeds]).tolist()
                          for _ in range(1)]
    assert draw([1, 2, 3]) == draw([1, 2, 3])
    alone = sample(logprobs[1:2], [SamplingOptions(temp=1.0, seed=2).sampler()]).tolist()
    assert draw([1, 2, 3])[0][1] == alone[0]


# The prompt cache


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    model, _ = save_and_load(hf_model("gemma3"), tmp_path_factory.mktemp("pc"))
    return model


def _fresh_logprobs(model, ids):
    return prefill(model, model.make_cache(), ids)


def _kept(model, cache_store, ids, snapshots_at=()):
    """Prefill ids, snapshotting at the given positions, and keep the sequence."""
    cache, snaps, done = model.make_cache(), [], 0
    for p in sorted(snapshots_at) + [len(ids)]:
        fill(model, cache, ids[done:p])
        done = p
        if p < len(ids):
            snaps.append(snapshot(cache, p))
    cache_store.insert(ids, cache, snaps)


@pytest.mark.parametrize("case", ["extend", "extend_past_window", "edit_before_window", "edit_at_snapshot",
                                  "edit_without_snapshot", "one_back_after_wrap"])
def test_restored_caches_give_fresh_logits(gemma3, case):
    rng = np.random.default_rng(3)
    base = [int(t) for t in rng.integers(3, 96, 4 * WINDOW)]
    other = [int(t) for t in rng.integers(3, 96, 5)]
    kept, request, snaps, expect = {
        # kept sequence, request, snapshot positions, tokens reused
        "extend": (base[:4], base[:4] + other, (), 4),
        "extend_past_window": (base, base + other, (), len(base)),
        "edit_before_window": (base[:5], base[:3] + other, (), 3),  # not wrapped: cut back freely
        "edit_at_snapshot": (base, base[:2 * WINDOW + 1] + other, (WINDOW + 2, 2 * WINDOW), 2 * WINDOW),
        "edit_without_snapshot": (base, base[: 3 * WINDOW] + other, (), 0),
        "one_back_after_wrap": (base, base[:-1] + other, (), len(base) - 1),
    }[case]
    store = PromptCache()
    _kept(gemma3, store, kept, snaps)
    reused, caches, _ = store.fetch(request)
    assert reused == expect
    caches = caches if caches is not None else gemma3.make_cache()
    restored = prefill(gemma3, caches, request[reused:])
    assert max_diff(restored, _fresh_logprobs(gemma3, request)) <= TOL
    # the kept entry is untouched by the restored cache's updates: it serves again, exactly
    reused2, caches2, _ = store.fetch(request)
    assert reused2 == expect
    again = prefill(gemma3, caches2 if caches2 is not None else gemma3.make_cache(), request[reused2:])
    assert max_diff(again, restored) <= TOL


def test_prompt_cache_bounds_and_prefix_replacement(gemma3):
    store = PromptCache(max_size=2)
    a = list(range(10, 20))
    _kept(gemma3, store, a)
    _kept(gemma3, store, a + [30, 31])  # extends a: replaces it
    assert [e.tokens for e in store.entries.values()] == [a + [30, 31]]
    _kept(gemma3, store, [40, 41, 42])
    _kept(gemma3, store, [50, 51, 52])
    assert len(store.entries) == 2 and [50, 51, 52] in [e.tokens for e in store.entries.values()]
    one = next(iter(store.entries.values())).nbytes
    small = PromptCache(max_size=10, max_bytes=one + 1)
    _kept(gemma3, small, [40, 41, 42])
    _kept(gemma3, small, [50, 51, 52])
    assert len(small.entries) == 1
    assert PromptCache(max_size=0).fetch([1, 2, 3])[0] == 0

"""Logit parity with transformers for every family: prefill, long prompts, cached decoding across the
window boundary, padded batches."""

import mlx.core as mx
import numpy as np
import pytest

from reference import FAMILIES, TOL, WINDOW, hf_logits, hf_model, max_diff, random_ids, save_and_load

ALL = list(FAMILIES)


@pytest.mark.parametrize("family", ALL)
def test_prefill_long_prompt(family, tmp_path):
    """A prompt 2.5 windows long in one forward."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(2, int(2.5 * WINDOW))
    assert max_diff(np.array(model(mx.array(ids))), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("family", ALL)
def test_cached_decoding_across_window(family, tmp_path):
    """Prefill, then two windows of one-token steps with the cache == one full forward at every position."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(1, WINDOW + 1 + 2 * WINDOW)
    ref = hf_logits(hf, ids)
    cache = model.make_cache()
    prompt = WINDOW + 1
    out = [np.array(model(mx.array(ids[:, :prompt]), cache=cache))]
    for t in range(prompt, ids.shape[1]):
        out.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert max_diff(np.concatenate(out, axis=1), ref) <= TOL


@pytest.mark.parametrize("family", ALL)
def test_chunked_prefill(family, tmp_path):
    """Prefill in uneven chunks (some longer than the window) == one full forward."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(1, 5 * WINDOW)
    cache = model.make_cache()
    out, start = [], 0
    for size in (3, WINDOW + 2, 1, 2 * WINDOW, 1):
        out.append(np.array(model(mx.array(ids[:, start : start + size]), cache=cache)))
        start += size
    out.append(np.array(model(mx.array(ids[:, start:]), cache=cache)))
    assert max_diff(np.concatenate(out, axis=1), hf_logits(hf, ids)) <= TOL


def _padded(lengths, total, side, pad=0, seed=3):
    ids = np.full((len(lengths), total), pad)
    mask = np.zeros((len(lengths), total), dtype=np.int64)
    rows = []
    for b, n in enumerate(lengths):
        row = random_ids(1, n, seed=seed + b)[0]
        rows.append(row)
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
    return ids, mask, rows


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(family, side, tmp_path):
    """A padded batch: equal to transformers' padded forward and, at real positions, to each row alone;
    finite everywhere (pads included)."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    total = 2 * WINDOW + 3
    ids, mask, rows = _padded([total, 5, WINDOW + 2], total, side)
    ours = np.array(model(mx.array(ids), attention_mask=mx.array(mask)))
    assert np.isfinite(ours).all()
    real = mask.astype(bool)
    assert max_diff(ours[real], hf_logits(hf, ids, mask)[real]) <= TOL
    for b, row in enumerate(rows):
        alone = np.array(model(mx.array(row[None])))[0]
        assert max_diff(ours[b][real[b]], alone) <= TOL


@pytest.mark.parametrize("family", ALL)
def test_left_padded_batch_decoding(family, tmp_path):
    """A left-padded batch prefilled, then decoded a token at a time across the window: each row's
    logits equal those of the row run alone without cache."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    total = WINDOW + 2
    ids, mask, rows = _padded([total, 3], total, "left")
    steps = random_ids(2, 2 * WINDOW, seed=9)
    cache = model.make_cache()
    outs = [np.array(model(mx.array(ids), attention_mask=mx.array(mask), cache=cache))[:, -1:]]
    for t in range(steps.shape[1]):
        outs.append(np.array(model(mx.array(steps[:, t : t + 1]), cache=cache)))
    ours = np.concatenate(outs, axis=1)
    assert np.isfinite(ours).all()
    for b, row in enumerate(rows):
        full = np.concatenate([row, steps[b]])[None]
        alone = np.array(model(mx.array(full)))[0, len(row) - 1 :]
        assert max_diff(ours[b], alone) <= TOL

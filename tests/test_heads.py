"""Every head of every family, and the losses, against transformers."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlxgemma
from reference import TOL, WINDOW, hf_model, max_diff, random_ids, save_and_load

SEQ_CLS = ["gemma", "gemma2", "gemma3", "stablelm"]
TOK_CLS = ["gemma", "gemma2", "stablelm"]


def _hf(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), **{k: torch.tensor(v) for k, v in kw.items()})


def _pad_rows(ids, side, pad):
    ids = ids.copy()
    if side == "left":
        ids[0, :4] = pad
    else:
        ids[0, -4:] = pad
    return ids, (ids != pad).astype(np.int64)


@pytest.mark.parametrize("family", SEQ_CLS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification(family, side, tmp_path):
    pad = 0 if family != "stablelm" else 1
    hf = hf_model(family, "ForSequenceClassification", num_labels=3, pad_token_id=pad)
    model, _ = save_and_load(hf, tmp_path)
    ids, mask = _pad_rows(random_ids(3, 2 * WINDOW), side, pad)
    ours = model(mx.array(ids), attention_mask=mx.array(mask))
    assert ours.shape == (3, 3)
    ref = _hf(hf, ids, attention_mask=mask)
    assert max_diff(np.array(ours), ref.logits.numpy()) <= TOL
    labels = np.array([0, 2, 1])
    loss = model.loss(mx.array(ids), mx.array(labels), attention_mask=mx.array(mask))
    ref = _hf(hf, ids, attention_mask=mask, labels=labels)
    assert abs(loss.item() - ref.loss.item()) <= TOL


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_sequence_classification_losses(problem, tmp_path):
    num_labels = 1 if problem == "regression" else 3
    hf = hf_model("gemma", "ForSequenceClassification", num_labels=num_labels)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(2, 7)
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(2,)) if problem == "regression" else (rng.random((2, 3)) > 0.5)
    labels = labels.astype(np.float32)
    ref = _hf(hf, ids, labels=labels)
    assert hf.config.problem_type == problem
    assert abs(model.loss(mx.array(ids), mx.array(labels)).item() - ref.loss.item()) <= TOL


def test_sequence_classification_without_pad_id(tmp_path):
    """transformers' rule: no pad id means batch 1 only (pooled at the last token) and an error beyond."""
    hf = hf_model("stablelm", "ForSequenceClassification", num_labels=2)
    assert hf.config.pad_token_id is None
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(1, 9)
    assert max_diff(np.array(model(mx.array(ids))), _hf(hf, ids).logits.numpy()) <= TOL
    with pytest.raises(mlxgemma.MlxGemmaError, match="Cannot handle batch sizes > 1"):
        model(mx.array(random_ids(2, 9)))


@pytest.mark.parametrize("family", TOK_CLS)
def test_token_classification(family, tmp_path):
    hf = hf_model(family, "ForTokenClassification", num_labels=5)
    model, _ = save_and_load(hf, tmp_path)
    ids, mask = _pad_rows(random_ids(2, 2 * WINDOW + 1), "right", 0)
    ours = model(mx.array(ids), attention_mask=mx.array(mask))
    assert ours.shape == (2, ids.shape[1], 5)
    ref = _hf(hf, ids, attention_mask=mask)
    real = mask.astype(bool)
    assert max_diff(np.array(ours)[real], ref.logits.numpy()[real]) <= TOL
    labels = np.random.default_rng(0).integers(0, 5, ids.shape)
    labels[~real] = -100
    ref = _hf(hf, ids, attention_mask=mask, labels=labels)
    assert abs(model.loss(mx.array(ids), mx.array(labels), attention_mask=mx.array(mask)).item()
               - ref.loss.item()) <= TOL


@pytest.mark.parametrize("family", SEQ_CLS)
def test_base_model_hidden_states(family, tmp_path):
    """The bare *Model returns the final-norm hidden states (B, L, D) as transformers' last_hidden_state."""
    hf = hf_model(family, "Model")
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(2, 2 * WINDOW)
    ref = _hf(hf, ids).last_hidden_state.numpy()
    assert max_diff(np.array(model(mx.array(ids))), ref) <= TOL


@pytest.mark.parametrize("family", SEQ_CLS)
def test_causal_lm_loss(family, tmp_path):
    """Shifted inside, -100 ignored, softcapped logits for Gemma 2; also sum / num_items_in_batch."""
    hf = hf_model(family)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(2, 11)
    labels = ids.copy()
    labels[0, :3] = -100
    ref = _hf(hf, ids, labels=labels)
    assert abs(model.loss(mx.array(ids), mx.array(labels)).item() - ref.loss.item()) <= TOL
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels), num_items_in_batch=torch.tensor(30))
    ours = model.loss(mx.array(ids), mx.array(labels), num_items_in_batch=30)
    assert abs(ours.item() - ref.loss.item()) <= TOL

"""Gemma 3 with images against transformers' Gemma3ForConditionalGeneration (float32, eager, every weight
randomised): logits for 0, 1 and 2 images, a padded batch with different image counts, a prompt longer than
the window around an image, the block mask (checked to matter), cached greedy decoding == generate, the
classification head and both losses, both checkpoint layouts."""

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from mlxgemma.models.gemma3_vision import Gemma3ForConditionalGeneration
from reference import (BOI, EOI, IMAGE, T5_IMAGE, T5_TOKENS, T5_VISION, TOL, max_diff, random_ids, random_pixels,
                       randomize, save_and_load)

# Window 3 < the 4-token image blocks: the sliding layers' window cuts into a block.
WINDOW = 3
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def hf_gemma3_vision(head="ForConditionalGeneration", seed=0, text=None, vision=None, **overrides):
    config = transformers.Gemma3Config(text_config=dict(TEXT, **(text or {})), vision_config=dict(T5_VISION, **(vision or {})),
                                       mm_tokens_per_image=T5_TOKENS, boi_token_index=BOI, eoi_token_index=EOI,
                                       image_token_index=IMAGE, attn_implementation="eager", **overrides)
    return randomize(getattr(transformers, "Gemma3" + head)(config), seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_gemma3_vision()
    model, _ = save_and_load(hf, tmp_path_factory.mktemp("g3v"))
    return hf, model


def prompt(images: int, text: int = 5, seed: int = 0, tail: int = 3) -> list:
    """bos, text, per image boi + image tokens + eoi (as the processor expands one), more text."""
    words = random_ids(1, text + tail, seed=seed, high=BOI)[0].tolist()
    ids = [2] + words[:text]
    for _ in range(images):
        ids += [BOI] + [IMAGE] * T5_TOKENS + [EOI]
    return ids + words[text:]


def types_of(ids) -> np.ndarray:
    return (np.asarray(ids) == IMAGE).astype(np.int64)


def hf_logits(hf, ids, pixels=None, mask=None, types=True):
    kw = dict(input_ids=torch.tensor(np.asarray(ids)))
    if pixels is not None:
        kw["pixel_values"] = torch.tensor(pixels)
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask))
    if types:
        kw["token_type_ids"] = torch.tensor(types_of(ids))
    with torch.no_grad():
        return hf(**kw).logits.numpy()


def ours(model, ids, pixels=None, mask=None, types=True, **kw):
    return np.array(model(mx.array(np.asarray(ids)), attention_mask=None if mask is None else mx.array(mask),
                          pixel_values=pixels, token_type_ids=types_of(ids) if types else None, **kw))


def test_tower_and_projector(pair):
    hf, model = pair
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.tensor(pixels), return_dict=True).pooler_output.numpy()
    assert max_diff(np.array(model.get_image_features(pixels)), ref) <= TOL


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits(pair, n_images):
    hf, model = pair
    ids = [prompt(n_images)]
    pixels = random_pixels(n_images, seed=n_images) if n_images else None
    assert len(ids[0]) > 2 * WINDOW
    assert max_diff(ours(model, ids, pixels), hf_logits(hf, ids, pixels)) <= TOL


def test_block_mask_matters_and_matches(pair):
    """Without token_type_ids both sides are causal inside images; with them, image tokens see their whole
    image: different logits, each equal to transformers'."""
    hf, model = pair
    ids, pixels = [prompt(1)], random_pixels(1, seed=3)
    causal, blocks = ours(model, ids, pixels, types=False), ours(model, ids, pixels)
    assert max_diff(causal, hf_logits(hf, ids, pixels, types=False)) <= TOL
    assert max_diff(blocks, hf_logits(hf, ids, pixels)) <= TOL
    assert max_diff(causal, blocks) > 100 * TOL


def test_padded_batch_with_different_image_counts(pair):
    hf, model = pair
    rows = [prompt(2, seed=1), prompt(0, text=4, seed=2), prompt(1, text=2, seed=3)]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])  # left padding, as Gemma's tokenizer pads
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = random_pixels(3, seed=4)
    ref, out = hf_logits(hf, ids, pixels, mask), ours(model, ids, pixels, mask)
    real = mask.astype(bool)
    assert max_diff(out[real], ref[real]) <= TOL


def test_features_stand_in_for_pixels(pair):
    _, model = pair
    ids, pixels = [prompt(2)], random_pixels(2, seed=6)
    features = model.get_image_features(pixels)
    assert max_diff(ours(model, ids, image_features=features), ours(model, ids, pixels)) == 0


def test_cached_greedy_decoding_equals_generate(pair):
    """Prefilled in chunks that end inside no image block, then decoded token by token."""
    hf, model = pair
    ids, pixels = prompt(2, text=6, seed=7), random_pixels(2, seed=7)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pixels),
                          token_type_ids=torch.tensor(types_of([ids])), attention_mask=torch.ones(1, len(ids),
                                                                                                  dtype=torch.long),
                          max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    from mlxgemma.media.features import prefill

    cache = model.make_cache()
    logits = prefill(model, cache, ids, model.get_image_features(pixels), step=5)
    out = []
    for _ in range(8):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    assert out == ref


def test_causal_lm_loss(pair):
    hf, model = pair
    ids, pixels = [prompt(1, seed=8)], random_pixels(1, seed=8)
    labels = np.where(types_of(ids) == 1, -100, np.asarray(ids))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), token_type_ids=torch.tensor(
            types_of(ids)), labels=torch.tensor(labels)).loss.item()
    loss = model.loss(mx.array(ids), mx.array(labels), pixel_values=pixels, token_type_ids=types_of(ids)).item()
    assert abs(loss - ref) <= TOL


def test_sequence_classification(tmp_path):
    hf = hf_gemma3_vision("ForSequenceClassification", num_labels=3, seed=2)
    hf.config.text_config.pad_token_id = 0
    model, _ = save_and_load(hf, tmp_path)
    rows = [prompt(1, seed=9), prompt(0, text=3, seed=10)]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows])  # right padding: pooled at the last real token
    pixels, labels = random_pixels(1, seed=9), np.array([2, 0])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), token_type_ids=torch.tensor(
            types_of(ids)), labels=torch.tensor(labels))
    out = model(mx.array(ids), pixel_values=pixels, token_type_ids=types_of(ids))
    assert max_diff(np.array(out), ref.logits.numpy()) <= TOL
    loss = model.loss(mx.array(ids), mx.array(labels), pixel_values=pixels, token_type_ids=types_of(ids))
    assert abs(loss.item() - ref.loss.item()) <= TOL


def test_legacy_layout_loads(pair, tmp_path):
    """The older transformers (and mlx-vlm) names: language_model.model.*, vision_tower.vision_model.*."""
    from safetensors.torch import save_file

    hf, model = pair
    state = {}
    for k, v in hf.state_dict().items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
        state[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = v.contiguous()
    state.pop("lm_head.weight")
    save_file(state, tmp_path / "model.safetensors")
    hf.config.save_pretrained(tmp_path)
    legacy = mlxgemma.load_model(tmp_path)
    ids, pixels = [prompt(1)], random_pixels(1)
    assert max_diff(ours(legacy, ids, pixels), ours(model, ids, pixels)) == 0


def test_bad_inputs(pair):
    _, model = pair
    ids = [prompt(2)]
    with pytest.raises(MlxGemmaError, match=r"8 image tokens but the image\(s\) give 4 features"):
        ours(model, ids, random_pixels(1))
    with pytest.raises(MlxGemmaError, match="image tokens but no image"):
        ours(model, ids)
    with pytest.raises(MlxGemmaError, match="pixel_values has shape"):
        ours(model, ids, np.zeros((2, 3, T5_IMAGE // 2, T5_IMAGE // 2), np.float32))
    assert isinstance(model, Gemma3ForConditionalGeneration)


def test_softcaps_of_text_config_are_not_applied(tmp_path):
    """transformers' Gemma3ForConditionalGeneration (5.23) applies neither attn_logit_softcapping nor
    final_logit_softcapping of its text_config (only its text-only Gemma3ForCausalLM applies the final one),
    and so neither does ours: caps small enough that applying either would move the logits far past TOL."""
    hf = hf_gemma3_vision(text=dict(final_logit_softcapping=0.5, attn_logit_softcapping=0.5))
    model, _ = save_and_load(hf, tmp_path)
    assert model.config.text_config.final_logit_softcapping == 0.5  # read, as transformers reads it
    ids, pixels = [prompt(1)], random_pixels(1, seed=5)
    ref = hf_logits(hf, ids, pixels)
    assert max_diff(np.tanh(ref / 0.5) * 0.5, ref) > 100 * TOL
    assert max_diff(ours(model, ids, pixels), ref) <= TOL

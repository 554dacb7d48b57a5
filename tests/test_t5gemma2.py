"""T5Gemma 2 against transformers: vision tower, projector, encoder (longer than its window), decoder logits
with and without images, padded and multi-image batches, cached greedy decoding == generate, both heads,
both checkpoint key layouts."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from reference import (EOI, T5_WINDOW, TOL, hf_t5gemma2, image_prompt, max_diff, random_ids,
                       random_pixels, save_and_load)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_t5gemma2()
    model, _ = save_and_load(hf, tmp_path_factory.mktemp("t5"))
    return hf, model


def _hf(hf, ids, dec, **kw):
    t = {k: torch.tensor(np.asarray(v)) for k, v in kw.items() if v is not None}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(np.asarray(ids)), decoder_input_ids=torch.tensor(np.asarray(dec)),
                  **t).logits.numpy()


def _ours(model, ids, dec, **kw):
    kw = {k: mx.array(np.asarray(v)) for k, v in kw.items() if v is not None}
    return np.array(model(mx.array(np.asarray(ids)), mx.array(np.asarray(dec)), **kw))


def _decoder_ids(batch, length, seed=5):
    dec = random_ids(batch, length, seed=seed, high=EOI)
    dec[:, 0] = 2
    return dec


def test_vision_tower_and_projector(pair):
    hf, model = pair
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = hf.model.encoder.get_image_features(torch.tensor(pixels), return_dict=True)
    ours_vision = model.model.encoder.vision_tower(mx.array(pixels))
    assert max_diff(np.array(ours_vision), ref.last_hidden_state.numpy()) <= TOL
    assert max_diff(np.array(model.model.encoder.get_image_features(pixels)), ref.pooler_output.numpy()) <= TOL


def test_encoder_longer_than_window(pair):
    """9+ tokens over a window of 4: the asymmetric window [i-1, i+2] decides every sliding layer."""
    hf, model = pair
    ids = random_ids(2, 3 * T5_WINDOW, high=EOI)
    ids[0, 4] = EOI  # the eoi token takes its own learned embedding
    with torch.no_grad():
        ref = hf.model.encoder(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    assert max_diff(np.array(model.encode(mx.array(ids)).hidden_states), ref) <= TOL


def test_logits_text_only(pair):
    hf, model = pair
    ids, dec = random_ids(2, 11, high=EOI), _decoder_ids(2, 2 * T5_WINDOW + 1)
    assert max_diff(_ours(model, ids, dec), _hf(hf, ids, dec)) <= TOL


def test_logits_with_image(pair):
    hf, model = pair
    ids, dec, pixels = np.array([image_prompt(1)]), _decoder_ids(1, 7), random_pixels(1)
    ref = _hf(hf, ids, dec, pixel_values=pixels)
    assert max_diff(_ours(model, ids, dec, pixel_values=pixels), ref) <= TOL
    # the image matters: the same prompt with another image gives other logits
    assert max_diff(_ours(model, ids, dec, pixel_values=random_pixels(1, seed=9)), ref) > 100 * TOL


def test_two_prompts_one_with_two_images(pair):
    """Features fill the image slots in (batch, sequence) order: row 0 takes images 0 and 1, row 1 image 2."""
    hf, model = pair
    rows = [image_prompt(2, seed=1), image_prompt(1, n_text=11, seed=2)]
    ids = np.array(rows)
    dec, pixels = _decoder_ids(2, 6), random_pixels(3, seed=4)
    assert max_diff(_ours(model, ids, dec, pixel_values=pixels), _hf(hf, ids, dec, pixel_values=pixels)) <= TOL


def test_left_padded_encoder_batch(pair):
    """Padding is masked out of the encoder and the cross part: the padded row equals its unpadded run."""
    hf, model = pair
    short, full = image_prompt(1, n_text=2, seed=3), image_prompt(1, n_text=6, seed=4)
    pad = len(full) - len(short)
    ids = np.array([[0] * pad + short, full])
    mask = np.array([[0] * pad + [1] * len(short), [1] * len(full)])
    dec, pixels = _decoder_ids(2, 6), random_pixels(2, seed=6)
    out = _ours(model, ids, dec, attention_mask=mask, pixel_values=pixels)
    assert np.isfinite(out).all()
    assert max_diff(out, _hf(hf, ids, dec, attention_mask=mask, pixel_values=pixels)) <= TOL
    alone = _ours(model, [short], dec[:1], pixel_values=pixels[:1])
    assert max_diff(out[:1], alone) <= TOL


def test_decoder_attention_mask(pair):
    """Padded decoder keys are masked. (Padded query rows are garbage in both libraries and differ: there
    transformers attends to the other keys, we let a pad see itself.)"""
    hf, model = pair
    ids, dec = random_ids(2, 8, high=EOI), _decoder_ids(2, 7)
    dmask = np.ones_like(dec)
    dmask[0, 5:] = 0
    ref = _hf(hf, ids, dec, decoder_attention_mask=dmask)
    out = _ours(model, ids, dec, decoder_attention_mask=dmask)
    real = dmask.astype(bool)
    assert max_diff(out[real], ref[real]) <= TOL
    assert max_diff(out[0, :5], _ours(model, ids[:1], dec[:1, :5])) <= TOL


def test_cached_greedy_decoding_equals_generate(pair):
    """Encoder once, cross K/V once, one token per step for two decoder windows: the reference's generate
    (start token 2) gives the same tokens and the same scores."""
    hf, model = pair
    ids, pixels = np.array([image_prompt(1, seed=7)]), random_pixels(1, seed=8)
    steps = 2 * T5_WINDOW + 2
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0].tolist()
    assert ref_tokens[0] == 2
    encoded = model.encode(mx.array(ids), pixel_values=mx.array(pixels))
    cache = model.make_cache(encoded)
    token, tokens, scores = 2, [2], []
    for _ in range(steps):
        logits = model.decode_step(mx.array([[token]]), cache=cache)[0, -1]
        scores.append(np.array(logits))
        token = int(np.argmax(scores[-1]))
        tokens.append(token)
    assert tokens == ref_tokens
    ref_scores = torch.stack(ref.scores, 1)[0].numpy()  # min_new_tokens masks eos to -inf there
    finite = np.isfinite(ref_scores)
    assert max_diff(np.stack(scores)[finite], ref_scores[finite]) <= TOL
    assert cache[0].size() == T5_WINDOW  # a sliding decoder layer holds one window


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification"])
def test_heads(head, tmp_path):
    """The decoder reads shift_right(input_ids); sequences pool at its last non-pad position (left padding:
    the decoder sees the pads, as in transformers)."""
    hf = hf_t5gemma2(head, num_labels=3)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(3, 9, high=EOI)
    ids[0, 6:] = 0  # right-padded
    ids[1, :3] = 0  # left-padded
    mask = (ids != 0).astype(np.int64)
    labels = np.array([0, 2, 1]) if head == "ForSequenceClassification" else random_ids(3, 9, low=0, high=3)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = model(mx.array(ids), attention_mask=mx.array(mask))
    assert out.shape == tuple(ref.logits.shape)
    assert max_diff(np.array(out), ref.logits.numpy()) <= TOL
    loss = model.loss(mx.array(ids), labels, attention_mask=mx.array(mask))
    assert abs(loss.item() - ref.loss.item()) <= TOL


def test_lm_loss_and_untied_head(tmp_path):
    """Untied embeddings and LM head load; the seq2seq loss reads shift_right(labels) and does not shift."""
    hf = hf_t5gemma2(tie_word_embeddings=False, vision={"vision_use_head": True})  # the unused pooling head is skipped
    model, _ = save_and_load(hf, tmp_path)
    ids, labels = random_ids(2, 8, high=EOI), random_ids(2, 6, seed=2, high=EOI)
    labels[1, 4:] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    assert abs(model.loss(mx.array(ids), labels).item() - ref.loss.item()) <= TOL


def test_in_memory_key_layout_loads(pair, tmp_path):
    """Checkpoints named as transformers' modules (`encoder.text_model.`, `vision_tower.vision_model.`)."""
    hf, model = pair
    path = tmp_path / "ckpt"
    hf.save_pretrained(path)
    state = {k.replace("vision_tower.", "vision_tower.vision_model."): v.contiguous()
             for k, v in hf.state_dict().items() if not k.startswith(("lm_head", "model.decoder.embed_tokens"))}
    assert any(".text_model." in k for k in state)
    (path / "model.safetensors").unlink()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    other = mlxgemma.load_model(path)
    ids, dec, pixels = np.array([image_prompt(1)]), _decoder_ids(1, 4), random_pixels(1)
    assert max_diff(_ours(other, ids, dec, pixel_values=pixels), _ours(model, ids, dec, pixel_values=pixels)) == 0


def test_image_count_mismatch(pair):
    _, model = pair
    ids = np.array([image_prompt(2)])
    with pytest.raises(MlxGemmaError, match=r"image tokens but the image\(s\) give"):
        model(mx.array(ids), mx.array([[2]]), pixel_values=mx.array(random_pixels(1)))


def test_wrong_image_size(pair):
    _, model = pair
    with pytest.raises(MlxGemmaError, match="pixel_values has shape"):
        model(mx.array(np.array([image_prompt(1)])), mx.array([[2]]), pixel_values=mx.zeros((1, 3, 16, 16)))


def test_legacy_config_keys(tmp_path):
    """A config.json with the pre-transformers-5 keys (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern, no layer_types) reads as transformers reads it, linear-scaled full layers included."""
    import json

    import transformers

    hf = hf_t5gemma2(text={"num_hidden_layers": 4, "layer_types": None})
    path = tmp_path / "ckpt"
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    for part in (config["encoder"]["text_config"], config["decoder"]):
        for key in ("rope_parameters", "layer_types"):
            part.pop(key, None)
        part.update(rope_theta=50000.0, rope_local_base_freq=500.0, sliding_window_pattern=2,
                    rope_scaling={"rope_type": "linear", "factor": 4.0})
    (path / "config.json").write_text(json.dumps(config))
    ref = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    assert ref.config.decoder.layer_types == ["sliding_attention", "full_attention"] * 2
    model = mlxgemma.load_model(path)
    ids, dec = random_ids(1, 40, high=EOI), _decoder_ids(1, 30)  # positions far enough for the thetas to matter
    assert max_diff(_ours(model, ids, dec), _hf(ref, ids, dec)) <= TOL
    assert max_diff(_ours(model, ids, dec), _hf(hf, ids, dec)) > 100 * TOL  # the keys changed the model


def test_bare_model_checkpoint(tmp_path):
    """A T5Gemma2Model checkpoint (keys without `model.`) loads; its output is the decoder's last hidden state."""
    hf = hf_t5gemma2("Model")
    model, _ = save_and_load(hf, tmp_path)
    ids, dec, pixels = np.array([image_prompt(1)]), _decoder_ids(1, 5), random_pixels(1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec),
                 pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    assert max_diff(np.array(model(mx.array(ids), mx.array(dec), pixel_values=mx.array(pixels))), ref) <= TOL

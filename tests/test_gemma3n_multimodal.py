"""Gemma 3n with audio (and its image layout) against transformers 5.23: a tiny random float32
Gemma3nForConditionalGeneration (every weight randomised, window 6 inside 12-token audio blocks), its processor
(SigLIP's Pillow image processor, Gemma3nAudioFeatureExtractor) and mlxgemma's model and processor loaded from
what transformers saves.

transformers builds its vision tower with timm (TimmWrapperModel); timm is imported with the torchvision
stand-ins of tests/torchvision_stand_in.py (.ci/run installs it with --no-deps), and its MobileNet-V5 is a
narrow one (5% of the channels) pooled to 4 soft tokens."""

import json
import os
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from mlxgemma.media.features import encode_prompt, prefill
from reference import TOL, max_diff, randomize
from torchvision_stand_in import import_timm, timm_wrapper

S, F = "sliding_attention", "full_attention"
WINDOW, AUDIO_TOKENS, IMAGE_TOKENS, MELS = 6, 12, 4, 16
# ids: 0-3 specials, t4..t93 text, 94/95 boi/boa; the vision range 96..103 (eoi, image token), the audio range
# 104..111 (eoa, audio token); the per-layer table stops at 96, and 111 (the last id) pads every clip.
SPECIAL = {94: "<start_of_image>", 95: "<start_of_audio>", 96: "<end_of_image>", 97: "<image_soft_token>",
           104: "<end_of_audio>", 105: "<audio_soft_token>"}
VOCAB = 112
TEXT = dict(vocab_size=VOCAB, vocab_size_per_layer_input=96, hidden_size=32, intermediate_size=48,
            num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
            layer_types=[S, F, S, S, F], hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
            num_kv_shared_layers=1, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0],
            final_logit_softcapping=5.0, eos_token_id=1, bos_token_id=2, pad_token_id=0)
AUDIO = dict(hidden_size=24, conf_num_attention_heads=4, conf_num_hidden_layers=2, input_feat_size=MELS,
             sscp_conv_channel_size=[8, 4], conf_attention_chunk_size=4, conf_attention_context_left=5,
             conf_attention_context_right=0, conf_conv_kernel_size=3, conf_reduction_factor=4,
             conf_attention_logit_cap=2.0, gradient_clipping=1.5, rms_norm_eps=1e-3, vocab_size=8, vocab_offset=104)
# A narrow MobileNet-V5 (timm's architecture at 5% of its channels; 2048 out, as released) pooled to 2 x 2.
VISION = dict(hidden_size=2048, vocab_size=8, vocab_offset=96, rms_norm_eps=1e-3,
              model_args={"channel_multiplier": 0.05, "msfa_output_resolution": 2})
PROCESSOR = dict(audio_seq_length=AUDIO_TOKENS, image_seq_length=IMAGE_TOKENS)
IMAGE_PROCESSOR = dict(size={"height": 64, "width": 64}, resample=2, do_normalize=False)


SITE = os.environ.get("MLXGEMMA_TIMM_SITE", "/tmp/timm-site")
if os.path.isdir(SITE) and SITE not in sys.path:
    sys.path.append(SITE)  # (after the environment's own: an installed timm wins)
try:
    import_timm()
except ImportError:
    pytest.skip("timm is not installed (.ci/run installs it)", allow_module_level=True)


def hf_config():
    config = transformers.Gemma3nConfig(
        text_config=TEXT, vision_config=VISION, audio_config=AUDIO,
        audio_soft_tokens_per_image=AUDIO_TOKENS, vision_soft_tokens_per_image=IMAGE_TOKENS,
        boi_token_id=94, eoi_token_id=96, image_token_id=97, boa_token_id=95, eoa_token_id=104, audio_token_id=105)
    config.text_config._attn_implementation = "eager"
    return config


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 94)}}
    vocab.update({SPECIAL.get(i, f"<m{i}>"): i for i in range(94, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL.values()])
    names = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
                 boa_token="<start_of_audio>", eoa_token="<end_of_audio>", audio_token="<audio_soft_token>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>", extra_special_tokens=names)


def hf_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return transformers.Gemma3nProcessor(transformers.Gemma3nAudioFeatureExtractor(feature_size=MELS),
                                         SiglipImageProcessorPil(**IMAGE_PROCESSOR), tokenizer(), **PROCESSOR)


def tone(seconds: float, hz: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.4 * np.sin(2 * np.pi * hz * t) + np.random.default_rng(seed).standard_normal(t.shape) * 0.05
            ).astype(np.float32)


def image(h: int, w: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(path, seed: int = 0):
    from test_gemma3n_vision import randomize as randomize_tower

    with timm_wrapper():
        hf = randomize(transformers.Gemma3nForConditionalGeneration(hf_config()), seed)
    randomize_tower(hf.model.vision_tower, seed)  # (by fan-in: activations stay of order one through its blocks)
    hf.save_pretrained(path)
    hf_processor().save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("g3n") / "ckpt"
    hf = save(path)
    model, processor = mlxgemma.load(path, dtype="float32")
    return path, hf, model, processor


def hf_logits(hf, inputs: dict) -> np.ndarray:
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return hf(**tensors).logits.numpy()


def ours(model, inputs: dict) -> np.ndarray:
    return np.array(model(**{k: mx.array(np.asarray(v)) for k, v in inputs.items()}))


def test_loads_as_the_multimodal_model(ckpt):
    path, _, model, processor = ckpt
    assert type(model).__name__ == "Gemma3nForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3nProcessor"
    assert "vision_tower" in model and "embed_vision" in model and "audio_tower" in model


def test_text_only_with_hard_tokens(ckpt):
    """Text ids in the vision and audio ranges go through embed_vision / embed_audio (and read row 0 of the
    per-layer table), as transformers embeds them; a left-padded batch."""
    _, hf, model, _ = ckpt
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 15))
    ids[:, 3:6] = [[96, 100, 110], [104, 111, 97]]
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    inputs, real = {"input_ids": ids, "attention_mask": mask}, mask.astype(bool)
    assert max_diff(ours(model, inputs)[real], hf_logits(hf, inputs)[real]) <= TOL


def test_audio_and_left_padded_batch(ckpt):
    """One clip; then a batch of two prompts with clips of other lengths (the shorter padded by the tower, its
    tokens past the tower's output padded with the last id's embedding), left-padded by the processor."""
    _, hf, model, processor = ckpt
    hp = hf_processor()
    hp.tokenizer.padding_side = "left"
    processor.tokenizer._tokenizer.padding_side = "left"
    for text, audio in (("t5 t6 <audio_soft_token> t7 t8", [tone(1.0)]),
                        (["<audio_soft_token> t9", "t4 t5 t6 t7 <audio_soft_token> t8 <audio_soft_token>"],
                         [tone(0.5, 300, 1), tone(1.6, 500, 2), tone(0.3, 700, 3)])):
        ref = {k: np.asarray(v) for k, v in hp(text=text, audio=audio, padding=True, return_tensors="np").items()}
        mine = processor(text, audio=audio)
        assert np.array_equal(mine["input_ids"], ref["input_ids"]) and np.array_equal(
            mine["token_type_ids"], ref["token_type_ids"])
        inputs = {k: mine[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
        real = mine["attention_mask"].astype(bool)  # (transformers' fully masked rows of padding are its own)
        assert max_diff(ours(model, inputs)[real], hf_logits(hf, inputs)[real]) <= TOL


def test_processor_equals_transformers(ckpt):
    """ids, layout ("\\n\\n" boi image x 4 eoi "\\n\\n", boa audio x 12 eoa), token types, pixels and features."""
    _, _, _, processor = ckpt
    hp = hf_processor()
    text = "t4 <image_soft_token> t5 <audio_soft_token> t6 <image_soft_token>"
    images, audio = [image(40, 56), image(20, 20, 1).convert("RGBA")], [tone(0.7)]
    ref = hp(text=text, images=images, audio=audio, return_tensors="np")
    mine, items = processor.prepare(text, images, audio)
    for key in ("input_ids", "attention_mask", "token_type_ids", "input_features", "input_features_mask"):
        assert np.array_equal(np.asarray(mine[key]), np.asarray(ref[key])), key
    assert max_diff(mine["pixel_values"], ref["pixel_values"]) <= 1 / 255
    row = mine["input_ids"][0].tolist()
    start = row.index(94)
    assert row[start:start + IMAGE_TOKENS + 2] == [94] + [97] * IMAGE_TOKENS + [96]
    start = row.index(95)
    assert row[start:start + AUDIO_TOKENS + 2] == [95] + [105] * AUDIO_TOKENS + [104]
    assert [i["kind"] for i in items] == ["image", "audio", "image"]


def test_images(ckpt):
    """Images through the MobileNet-V5 tower: the soft-embedded features within 1e-4 of transformers'
    get_image_features (the tower's own float32 rounding, about 1e-5 of its output over its 84 blocks, is what
    remains: tests/test_gemma3n_vision.py); given those features, the logits of an image and a clip in one
    prompt, and of a left-padded batch with an image in one row, within 1e-4 of transformers'; greedy
    generation with an image equal to transformers' generate."""
    _, hf, model, processor = ckpt
    hp = hf_processor()
    hp.tokenizer.padding_side = "left"
    processor.tokenizer._tokenizer.padding_side = "left"
    try:
        for text, images, audio in (("t4 <image_soft_token> t5 <audio_soft_token> t6", [image(70, 50)], [tone(0.6)]),
                                    (["<image_soft_token> t9", "t4 t5 t6 t7"], [image(64, 64, 1)], [])):
            mine = processor(text, images, audio)
            ref = {k: np.asarray(v) for k, v in hp(text=text, images=images, audio=audio or None, padding=True,
                                                   return_tensors="np").items()}
            assert np.array_equal(mine["input_ids"], ref["input_ids"])
            with torch.no_grad():
                features = hf.model.get_image_features(torch.from_numpy(np.asarray(mine["pixel_values"])))
            features = features.pooler_output if hasattr(features, "pooler_output") else features
            ours_features = np.stack([np.array(f) for f in model.get_image_features(mx.array(mine["pixel_values"]))])
            assert max_diff(ours_features, features.numpy()) <= TOL
            given = [features.reshape(-1, features.shape[-1]).numpy()]
            if audio:
                given.append(np.concatenate([np.array(f) for f in model.get_audio_features(
                    mx.array(mine["input_features"]), mx.array(mine["input_features_mask"]))]))
            inputs = {k: mine[k] for k in ("input_ids", "attention_mask")}
            logits = np.array(model(mx.array(inputs["input_ids"]), attention_mask=mx.array(inputs["attention_mask"]),
                                    media_features=mx.array(np.concatenate(given))))
            full = {k: mine[k] for k in ("input_ids", "attention_mask", "pixel_values", "input_features",
                                         "input_features_mask") if k in mine}
            real = mine["attention_mask"].astype(bool)
            assert max_diff(logits[real], hf_logits(hf, full)[real]) <= TOL
    finally:
        processor.tokenizer._tokenizer.padding_side = "right"
    out = [c.token for c in mlxgemma.stream_generate(model, processor, "t4 <image_soft_token> t5",
                                                     image=[image(40, 56, 2)], max_tokens=5, chat_template=False)]
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in
               processor("t4 <image_soft_token> t5", [image(40, 56, 2)]).items() if k != "token_type_ids"}
    with torch.no_grad():
        ref = hf.generate(**tensors, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out == ref[0, tensors["input_ids"].shape[1]:].tolist()


def test_chunked_prefill_and_greedy_generation(ckpt):
    """A prefill in chunks of 5 (each would cut the audio block) then cached steps equal transformers' logits;
    greedy tokens from stream_generate equal transformers' generate."""
    _, hf, model, processor = ckpt
    text, audio = "<bos>t4 t5 <audio_soft_token> t6 t7", [tone(0.9, 350)]
    ids, features = encode_prompt(model, processor, text, [], audio)
    cache = model.make_cache()
    prefill(model, cache, ids[:-1], features, step=5)
    follow = [9, 110, 11]
    steps = [np.array(model(mx.array([ids[-1:]]), cache=cache))[0, -1]]
    steps += [np.array(model(mx.array([[t]]), cache=cache))[0, -1] for t in follow]
    inputs = processor(text, audio=audio)
    full = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], [follow]], 1),
                attention_mask=np.ones((1, len(ids) + 3), np.int64))
    full.pop("token_type_ids")
    assert max_diff(np.stack(steps), hf_logits(hf, full)[0, len(ids) - 1:]) <= TOL

    out = [c.token for c in mlxgemma.stream_generate(model, processor, "t4 <audio_soft_token> t5", audio=audio,
                                                     max_tokens=6, chat_template=False)]
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in processor("t4 <audio_soft_token> t5", audio=audio).items()}
    with torch.no_grad():
        ref = hf.generate(**tensors, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out == ref[0, tensors["input_ids"].shape[1]:].tolist()


def test_chat_with_clips(ckpt):
    """Chat: a clip in each turn (the cache kept across turns, the first clip's features not encoded again)."""
    from mlxgemma.chat import ChatSession
    from mlxgemma.media.features import FEATURES

    _, _, model, processor = ckpt
    processor.tokenizer._tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} t4 " \
                                                   "{% endfor %}"
    session, hits = ChatSession(model, processor, max_tokens=4), FEATURES.hits
    first = "".join(session.reply("t5 t6", audio=[tone(0.5)]))
    second = "".join(session.reply("t7", audio=[tone(0.4, 600)]))
    assert len(first.split()) == 4 and len(second.split()) == 4 and FEATURES.hits > hits
    processor.tokenizer._tokenizer.chat_template = None


def without_audio(path, to):
    """The checkpoint with no audio_config and no audio weights (transformers always builds an audio tower)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(path, to)
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "audio" not in k}, str(to / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (to / "config.json").write_text(json.dumps(dict(config, audio_config=None)))
    return to


def test_bad_inputs(ckpt, tmp_path):
    _, _, model, processor = ckpt
    with pytest.raises(MlxGemmaError, match="1 audio placeholder"):
        processor("t4 <audio_soft_token>", audio=[tone(0.3), tone(0.3)])
    with pytest.raises(MlxGemmaError, match="media placeholder"):
        list(mlxgemma.stream_generate(model, processor, [2, 105, 104, 5], max_tokens=1))
    m, p = mlxgemma.load(without_audio(ckpt[0], tmp_path / "noaudio"), dtype="float32")
    assert type(m).__name__ == "Gemma3nForConditionalGeneration" and "audio" not in p.marks
    for call in (lambda: p("t4 <audio_soft_token>", audio=[tone(0.3)]),
                 lambda: list(mlxgemma.stream_generate(m, p, "t4", audio=[tone(0.3)], max_tokens=1))):
        with pytest.raises(MlxGemmaError, match="no audio"):
            call()


def test_checkpoint_layouts(ckpt, tmp_path):
    """mlx-vlm's layout (no model. prefix) with the vision tower's weights (left unread while mlxgemma has no
    tower) loads; the same config without tower weights (mlx-lm's conversion) is the text model."""
    from safetensors.numpy import load_file, save_file

    path, hf, _, _ = ckpt
    weights = load_file(str(path / "model.safetensors"))
    vlm = {k.removeprefix("model."): v for k, v in weights.items()}
    text = {k: v for k, v in vlm.items() if k.startswith("language_model.")}
    config = json.loads((path / "config.json").read_text())
    ids = np.random.default_rng(4).integers(3, 96, (1, 12))
    ref = hf_logits(hf, {"input_ids": ids})
    for name, w, cls in (("vlm", vlm, "Gemma3nForConditionalGeneration"), ("text", text, "Gemma3nForCausalLM")):
        (tmp_path / name).mkdir()
        save_file(w, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        m = mlxgemma.load_model(tmp_path / name, dtype="float32")
        assert type(m).__name__ == cls and max_diff(np.array(m(mx.array(ids))), ref) <= TOL


@pytest.mark.slow
def test_server_batches_mixed_requests(ckpt, tmp_path):
    """The server on Gemma 3n: 8 concurrent requests, images (image_url), clips (input_audio) and text alone
    mixed, each gives the tokens stream_generate gives for the same conversation alone."""
    import base64
    import io
    import shutil

    import openai
    from PIL import Image

    from mlxgemma.media.audio import load_audio
    from server_util import serve
    from test_decode_core import _together
    from test_gemma4_media import _png, _wav

    path = ckpt[0]
    served = tmp_path / "served"
    shutil.copytree(path, served)
    config = json.loads((served / "tokenizer_config.json").read_text())
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} t4 {% endfor %}"
    (served / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
    model, processor = mlxgemma.load(served, dtype="float32")
    kinds = ["image", "audio", "text"] * 3
    media = [_png(image(40 + 8 * i, 56, seed=i)) if k == "image" else _wav(tone(0.3 + 0.1 * i, 300 + 90 * i, i))
             if k == "audio" else None for i, k in enumerate(kinds[:8])]

    def alone(i):
        kind, mark = kinds[i], processor.marks.get(kinds[i], "")
        extra = {"image": [Image.open(io.BytesIO(media[i]))]} if kind == "image" else \
            {"audio": [load_audio(media[i])]} if kind == "audio" else {}
        return "".join(c.text for c in mlxgemma.stream_generate(
            model, processor, [{"role": "user", "content": mark + f"t{5 + i} t6"}], max_tokens=16, **extra))
    expected = [alone(i) for i in range(8)]
    server = serve(served)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        def ask(i):
            data = base64.b64encode(media[i]).decode() if media[i] else None
            part = {"image": {"type": "image_url", "image_url": {"url": "data:image/png;base64," + (data or "")}},
                    "audio": {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}}.get(kinds[i])
            parts = ([part] if part else []) + [{"type": "text", "text": f"t{5 + i} t6"}]
            return lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}],
                                                          max_tokens=16).choices[0].message.content
        together = _together(server, [ask(i) for i in range(8)])  # (all reach the scheduler at once: batched)
        assert together == expected and all(together)
    finally:
        server.stop()


@pytest.mark.slow
def test_convert_and_quantize(ckpt, tmp_path):
    """convert writes Gemma 3n with its towers: the float output's logits with an image and a clip equal the
    source's; -q gives the language model the recipe (3 bits here) and the towers and embedders --q-vision-bits
    (8) / --q-audio-bits (4)."""
    from mlxgemma.checkpoints.convert import convert

    path, _, model, processor = ckpt
    inputs = processor("t4 <image_soft_token> t5 <audio_soft_token> t6", [image(50, 40)], [tone(0.5)])
    inputs = {k: mx.array(np.asarray(v)) for k, v in inputs.items() if k != "token_type_ids"}
    ref = np.array(model(**inputs))
    converted, _ = mlxgemma.load(convert(path, tmp_path / "f"), dtype="float32")
    assert max_diff(np.array(converted(**inputs)), ref) == 0
    q, _ = mlxgemma.load(convert(path, tmp_path / "q", quantize=True, q_bits=3, q_group_size=32, q_vision_bits=8,
                                 q_audio_bits=4), dtype="float32")
    bits = {n: m.bits for n, m in q.named_modules() if hasattr(m, "bits") and "scales" in m}
    assert any(n.startswith("language_model.") and b == 3 for n, b in bits.items())
    towers = {n: b for n, b in bits.items() if n.startswith(("vision_tower.", "embed_vision.", "audio_tower.",
                                                               "embed_audio."))}
    assert towers and all(b == (8 if "vision" in n else 4) for n, b in towers.items())
    assert np.isfinite(np.array(q(**inputs))).all()

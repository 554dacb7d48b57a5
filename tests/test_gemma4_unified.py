"""Gemma 4 unified (Gemma4UnifiedForConditionalGeneration, model_type gemma4_unified) against transformers 5.23, on
a tiny random float32 checkpoint: gemma4_media_util's tokenizer, 8-pixel patches (4 x 2), 640-sample audio
frames, a window of 6 inside image blocks of up to 70 tokens, keys as values on full layers and a KV-shared last
layer (as the 12B's config), every weight and the layers' scalars randomised. Logits with text only, images of
two aspect ratios, a clip, both, a video; the image blocks of use_bidirectional_attention "vision" (the default:
they see each other on every layer, across the window) and a causal variant; a chunked, cached prefill then
decoding; greedy generation; the processor's pieces against transformers' (its image and video processors
through a stand-in for the torchvision functions they call: torchvision_stand_in.py); convert, float and
quantized, and mlx-vlm reading its output; bad inputs."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

import gemma4_media_util as media
import torchvision_stand_in
import mlxgemma
from mlxgemma.errors import MlxGemmaError
from reference import randomize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PATCH, POOL, FRAME = 4, 2, 640
IDS = media.IDS
PROCESSOR = {"image_processor": {"image_processor_type": "Gemma4UnifiedImageProcessor", "patch_size": PATCH,
                                 "pooling_kernel_size": POOL, "max_soft_tokens": 70},
             "feature_extractor": {"feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor",
                                   "feature_size": FRAME, "audio_samples_per_token": FRAME},
             "audio_seq_length": 750}
HF_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
             "input_features", "input_features_mask", "pixel_values_videos", "video_position_ids",
             "num_frames_per_video")


def config(bidirectional="vision", audio: bool = True) -> transformers.Gemma4UnifiedConfig:
    S, F = "sliding_attention", "full_attention"
    text = dict(vocab_size=media.chat.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=1, sliding_window=6,
                layer_types=[S, F, S, F], eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0,
                use_bidirectional_attention=bidirectional)
    vision = dict(patch_size=PATCH, pooling_kernel_size=POOL, mm_embed_dim=24, output_proj_dims=24, mm_posemb_size=72)
    return transformers.Gemma4UnifiedConfig(
        text_config=text, vision_config=vision, audio_config=dict(audio_embed_dim=FRAME) if audio else None,
        image_token_id=IDS["<|image|>"], boi_token_id=IDS["<|image>"], eoi_token_id=IDS["<image|>"],
        audio_token_id=IDS["<|audio|>"], boa_token_id=IDS["<|audio>"], eoa_token_index=IDS["<audio|>"],
        video_token_id=IDS["<|video|>"], attn_implementation="eager")


def hf_model(seed: int = 0, **options):
    model = randomize(transformers.Gemma4UnifiedForConditionalGeneration(config(**options)), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the persistent buffers too (the rest are derived from the config, never saved)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def save(path, seed: int = 0, **options):
    model = hf_model(seed, **options)
    model.save_pretrained(path)
    media.tokenizer().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106, 50],
                                                             "pad_token_id": 0}))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4_unified")
    hf = save(path)
    return path, hf, *mlxgemma.load(path)


@pytest.fixture(scope="module")
def causal_ckpt(tmp_path_factory):
    """use_bidirectional_attention None: image tokens causal like text."""
    path = tmp_path_factory.mktemp("gemma4_unified_causal")
    hf = save(path, seed=3, bidirectional=None, audio=False)
    return path, hf, *mlxgemma.load(path)


def hf_logits(hf, inputs: dict) -> np.ndarray:
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in HF_INPUTS}
    with torch.no_grad():
        return hf(**tensors).logits.numpy()


def ours(model, inputs: dict) -> np.ndarray:
    return np.array(model(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"}))


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


CASES = {
    "text": ("Hello there, how are you?", [], []),
    "one image": ("<|image|> What is in this picture?", [(40, 64)], []),
    "two images": ("Compare <|image|> with <|image|> please.", [(64, 24), (30, 30)], []),
    "audio": ("<|audio|> Transcribe this.", [], [0.5]),
    "image and audio": ("<|image|> and <|audio|>: what do you see and hear?", [(48, 32)], [0.3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpt, case):
    _, hf, model, processor = ckpt
    text, sizes, clips = CASES[case]
    images = [media.image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    audio = [media.tone(s, seed=i) for i, s in enumerate(clips)]
    inputs = processor(text, images, audio)
    expected = hf_logits(hf, inputs)
    got = ours(model, inputs)
    assert got.shape == expected.shape
    print(f"{case}: max |dlogits| {diff(got, expected):.2e}")
    assert diff(got, expected) <= 1e-4


def test_image_blocks_see_each_other_on_every_layer(ckpt, causal_ckpt, monkeypatch):
    """With the token types the blocks attend within themselves (mlxgemma as transformers); without them the
    forward is causal (as there). The blocks reach the full layers and across the window: Gemma 4's masks
    (sliding layers only, within the window) give other logits."""
    _, hf, model, processor = ckpt
    inputs = processor("<|image|> then <|image|>.", [media.image(32, 64), media.image(48, 48, seed=1)])
    expected = hf_logits(hf, inputs)
    assert diff(ours(model, inputs), expected) <= 1e-4
    causal = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert diff(ours(model, causal), hf_logits(hf, causal)) <= 1e-4
    assert diff(ours(model, causal), expected) > 1e-3
    text_model = type(model.language_model.model)
    for block_types, in_window in ((("sliding_attention",), True), (None, True), (("sliding_attention",), False)):
        with monkeypatch.context() as m:  # Gemma 4's masks, and each half of the difference
            m.setattr(text_model, "block_types", block_types)
            m.setattr(text_model, "blocks_in_window", in_window)
            assert diff(ours(model, inputs), expected) > 1e-3
    _, hf, model, processor = causal_ckpt
    inputs = processor("<|image|> then <|image|>.", [media.image(32, 64), media.image(48, 48, seed=1)])
    assert diff(ours(model, inputs), hf_logits(hf, inputs)) <= 1e-4


@pytest.mark.parametrize("which", ["vision", "causal"])
def test_chunked_cached_prefill_then_decoding(ckpt, causal_ckpt, which):
    """The prompt prefilled in chunks of 5 (each would cut a block: they grow to its end) through the model's
    caches, then 4 tokens decoded one at a time: every logit equal to transformers' over the whole sequence."""
    _, hf, model, processor = ckpt if which == "vision" else causal_ckpt
    images, videos = [media.image(40, 64), media.image(24, 24, seed=2)], [media.video(2, seed=4)]
    audio = [media.tone(0.3)] if which == "vision" else []
    text = "A <|image|> B <|image|> C <|video|>" + (" <|audio|> D" if audio else "") + " end"
    steps, full, start = media.cached_steps(model, processor, text, images, audio, videos=videos)
    expected = hf_logits(hf, full)[0, start:]
    print(f"{which}: max |dlogits| {diff(steps, expected):.2e}")
    assert diff(steps, expected) <= 1e-4


def test_greedy_generation_matches_transformers(ckpt):
    _, hf, model, processor = ckpt
    images, audio = [media.image(36, 52), media.image(20, 44, seed=1)], [media.tone(0.25)]
    videos = [media.video(3, seed=5)]
    text = "<|image|><|audio|> Describe <|image|> and <|video|>."
    out = list(mlxgemma.stream_generate(model, processor, text, image=images, audio=audio, video=videos,
                                        max_tokens=5, chat_template=False))
    inputs = processor(text, images, audio, videos)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        hf_out = hf.generate(**tensors, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [c.token for c in out] == hf_out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_processors():
    """(image, video): transformers' Gemma4UnifiedImageProcessor and Gemma4UnifiedVideoProcessor through a
    stand-in for the torchvision functions they call (torchvision_stand_in.py)."""
    with torchvision_stand_in.unified_processors() as both:
        yield both


@pytest.fixture(scope="module")
def hf_image_processor(hf_processors):
    return hf_processors[0]


def test_image_processor_matches_transformers(hf_image_processor):
    """Patches, positions and soft-token counts equal to transformers' for images of many sizes and aspect
    ratios (down- and upscaled, one side kept, thin strips), an RGBA and a grey array, at two budgets, with the
    rescale folded into a normalisation too."""
    from mlxgemma.media.gemma4_unified_processor import Gemma4UnifiedImageProcessor

    rng = np.random.default_rng(5)
    images = [media.image(h, w, seed=i) for i, (h, w) in enumerate(
        [(40, 64), (64, 24), (30, 30), (16, 80), (200, 37), (8, 300), (96, 64), (31, 217)])]
    images += [rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), rng.integers(0, 256, (45, 33), dtype=np.uint8)]
    small = dict(patch_size=PATCH, pooling_kernel_size=POOL)
    for options in (dict(small, max_soft_tokens=70), dict(small, max_soft_tokens=140),
                    dict(small, max_soft_tokens=70, do_normalize=True, image_mean=[0.5, 0.4, 0.3],
                         image_std=[0.2, 0.25, 0.3]), dict(max_soft_tokens=70)):
        ours_ = Gemma4UnifiedImageProcessor(**options)(images)
        expected = hf_image_processor(images, **options)
        assert ours_["pixel_values"].dtype == np.float32
        assert np.array_equal(ours_["pixel_values"], expected["pixel_values"])
        assert np.array_equal(ours_["image_position_ids"], expected["image_position_ids"])
        assert ours_["num_soft_tokens_per_image"].tolist() == expected["num_soft_tokens_per_image"].tolist()


def test_video_processor_matches_transformers(ckpt, hf_processors, tmp_path):
    """A video's frames equal those of transformers' Gemma4UnifiedVideoProcessor (which normalises where the
    image processor does not), for frames given with their timestamps (sizes down- and upscaled, a thin
    strip, two budgets) and for a video file: 32 frames read by transformers' PyAV reader with its default
    sampling, and their timestamps."""
    from functools import partial

    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    _, _, _, processor = ckpt
    hf_video = hf_processors[1]
    small = dict(patch_size=PATCH, pooling_kernel_size=POOL)
    for n, h, w in ((3, 24, 40), (2, 31, 217), (4, 96, 64)):
        frames, stamps = media.video(n, h, w, seed=n)
        for budget in (70, 140):
            got = processor.video_processor([(frames, stamps)], max_soft_tokens=budget)
            expected = hf_video([frames], max_soft_tokens=budget, **small)
            for key in ("pixel_values_videos", "video_position_ids"):
                assert np.array_equal(got[key], expected[key]), (n, h, w, budget, key)
            assert got["num_soft_tokens_per_video"] == expected["num_soft_tokens_per_video"].tolist()
    path = media.mp4(tmp_path / "clip.mp4", 40, textured=True)
    frames, metadata = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=32))
    got, expected = processor.video_processor([path]), hf_video([frames], **small)
    assert len(frames) == 32 and np.allclose(got["timestamps"][0], metadata.timestamps)
    for key in ("pixel_values_videos", "video_position_ids"):
        assert np.array_equal(got[key], expected[key]), key


def test_video_logits_and_layout_match_transformers(ckpt, hf_processors, tmp_path):
    """An image and a video (frames with their timestamps): logits equal transformers' given the same pixel
    values (the frames are blocks of type 2, each seeing itself as an image does). A video file's text is what
    transformers' replace_video_token writes for its frames and timestamps, then its tokenizer."""
    from functools import partial

    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    _, hf, model, processor = ckpt
    frames, stamps = media.video(3, seed=7)
    inputs = processor("<|image|> then <|video|> end", [media.image(30, 30)], videos=[(frames, stamps)])
    assert inputs["pixel_values_videos"].shape[0] == 3 and inputs["num_frames_per_video"].tolist() == [3]
    assert set(np.unique(inputs["mm_token_type_ids"]).tolist()) == {0, 1, 2}
    expected = hf_logits(hf, inputs)
    print(f"video: max |dlogits| {diff(ours(model, inputs), expected):.2e}")
    assert diff(ours(model, inputs), expected) <= 1e-4
    path = media.mp4(tmp_path / "clip.mp4", 40, textured=True)
    frames, metadata = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=32))
    videos = hf_processors[1]([frames], patch_size=PATCH, pooling_kernel_size=POOL)
    stub = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    text = transformers.Gemma4UnifiedProcessor.replace_video_token(stub, dict(videos, video_metadata=[metadata]), 0)
    got = processor("<|video|> What happens?", videos=[path])["input_ids"]
    assert got.tolist() == media.tokenizer()(text + " What happens?", return_tensors="np")["input_ids"].tolist()


def test_processor_matches_transformers_pieces(ckpt, hf_image_processor):
    """Our ids (placeholders expanded) and arrays equal what transformers' Gemma4UnifiedProcessor makes of its
    image processor's and feature extractor's outputs with its own replace_image_token / replace_audio_token
    (the whole processor cannot be built here: its video processor needs torchvision), then its tokenizer."""
    _, _, _, processor = ckpt
    tok = media.tokenizer()
    fe = transformers.Gemma4UnifiedAudioFeatureExtractor(**PROCESSOR["feature_extractor"])
    images = [media.image(40, 64), media.image(20, 90, seed=1)]
    audio = [media.tone(0.37), media.tone(0.08, seed=1)]
    text = "<|image|> x <|audio|> y <|image|> z <|audio|>"
    got = processor(text, images, audio)
    pixels = hf_image_processor(images, **PROCESSOR["image_processor"])
    sound = fe(audio, return_tensors="np")
    stub = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>",
                           boa_token="<|audio>", eoa_token="<audio|>", audio_token="<|audio|>")
    counters = {"image": iter(range(2)), "audio": iter(range(2))}

    def expand(m):
        kind = "image" if m.group() == "<|image|>" else "audio"
        i = next(counters[kind])
        if kind == "image":
            return transformers.Gemma4UnifiedProcessor.replace_image_token(stub, pixels, i)
        return transformers.Gemma4UnifiedProcessor.replace_audio_token(stub, sound, i)

    expected_ids = tok(re.sub(r"<\|image\|>|<\|audio\|>", expand, text), return_tensors="np")["input_ids"]
    assert got["input_ids"].tolist() == expected_ids.tolist()
    assert np.array_equal(got["pixel_values"], pixels["pixel_values"])
    assert np.array_equal(got["image_position_ids"], pixels["image_position_ids"])
    assert got["input_features"].dtype == sound["input_features"].dtype
    assert np.array_equal(got["input_features"], sound["input_features"])
    assert np.array_equal(got["input_features_mask"], sound["input_features_mask"])


@pytest.mark.parametrize("layout", ["transformers in memory", "mlx-vlm"])
def test_loads_other_layouts_and_sub_config_names(ckpt, tmp_path, layout):
    """transformers' in-memory names (model.embed_vision.patch_ln1, ...multimodal_embedder.*) and mlx-vlm's
    (language_model.model.*, vision_embedder.*, no model. prefix) load as the saved layout does; mlx-vlm's
    config names of the sub-configs' derived sizes are read."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path, hf, model, processor = ckpt
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.embed_vision.multimodal_embedder.") for k in state)
    if layout == "mlx-vlm":
        with safe_open(str(path / "model.safetensors"), "np") as f:
            state = {re.sub(r"^model\.(language_model\.)?", lambda m: "language_model.model." if m.group(1) else "",
                            k): f.get_tensor(k) for k in f.keys()}
        assert "vision_embedder.patch_ln1.weight" in state and "embed_vision.embedding_projection.weight" in state
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["model_patch_size"] = PATCH * POOL
    config["audio_config"].update(hidden_size=FRAME, output_proj_dims=FRAME, audio_samples_per_token=FRAME)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    other, _ = mlxgemma.load(tmp_path)
    inputs = processor("<|image|><|audio|> hi", [media.image(30, 40)], [media.tone(0.1)])
    assert diff(ours(other, inputs), ours(model, inputs)) == 0


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    """convert's outputs of the checkpoint: in float, and -q at 3 bits (groups of 32) with the vision
    embedder at --q-vision-bits 4 and the audio embedder at --q-audio-bits 8 (three bit widths to tell apart)."""
    from mlxgemma.checkpoints.convert import convert

    path = ckpt[0]
    out = tmp_path_factory.mktemp("gemma4_unified_converted")
    return convert(path, out / "float"), convert(path, out / "q", quantize=True, q_bits=3, q_group_size=32,
                                                 q_vision_bits=4, q_audio_bits=8)


PROMPTS = (("Hello there, how are you?", [], []), ("<|image|> What is this?", [(40, 64)], []),
           ("<|image|> and <|audio|>: what is it?", [(48, 32)], [0.3]))


def _inputs(processor, text, sizes, clips) -> dict:
    return processor(text, [media.image(h, w, seed=i) for i, (h, w) in enumerate(sizes)],
                     [media.tone(s, seed=i) for i, s in enumerate(clips)])


def test_convert_float_round_trip(ckpt, converted):
    """convert writes the whole unified model (mlx-vlm's layout, config.json with its sub-configs and their
    derived sizes, the processor files); loaded back, its logits with text, an image, an image and a clip are
    the source's."""
    path, _, model, processor = ckpt
    out = converted[0]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_unified" and config["text_config"]["model_type"] == "gemma4_unified_text"
    assert config["vision_config"]["model_patch_size"] == PATCH * POOL
    assert (out / "processor_config.json").exists() and (out / "tokenizer.json").exists()
    m, p = mlxgemma.load(out)
    for prompt in PROMPTS:
        got, expected = ours(m, _inputs(p, *prompt)), ours(model, _inputs(processor, *prompt))
        assert got.shape == expected.shape and diff(got, expected) <= 1e-5, prompt[0]


def test_convert_quantized_keeps_media_bits(ckpt, converted):
    """-q: the quantization block gives the vision embedder's linears --q-vision-bits and the audio embedder's
    --q-audio-bits (those whose input width divides the group size: the rest stay in float, as the note says),
    the language model --q-bits; it loads, quantized so, and runs on an image and a clip."""
    from mlx.utils import tree_flatten

    _, _, model, _ = ckpt
    block = json.loads((converted[1] / "config.json").read_text())["quantization"]
    media_bits = {k: v["bits"] for k, v in block.items() if isinstance(v, dict)
                  and k.startswith(("vision_embedder.", "embed_vision.", "embed_audio."))}
    linears = {name: m.weight.shape[1] for name, m in model.named_modules() if type(m).__name__ == "Linear"}
    expected = {name: 8 if name.startswith("embed_audio.") else 4 for name, width in linears.items()
                if name.startswith(("vision_embedder.", "embed_vision.", "embed_audio.")) and width % 32 == 0}
    assert media_bits == expected and set(expected) >= {"vision_embedder.patch_dense",
                                                        "embed_audio.embedding_projection"}
    text_bits = {v["bits"] for k, v in block.items() if k.startswith("language_model.") and isinstance(v, dict)}
    assert block["bits"] == 3 and text_bits == {3}
    qm, qp = mlxgemma.load(converted[1])
    loaded = {name: m.bits for name, m in qm.named_modules() if hasattr(m, "scales")
              and not name.startswith("language_model.")}
    assert loaded == expected
    assert any(k.endswith(".scales") for k, _ in tree_flatten(qm.language_model.parameters()))
    got = ours(qm, _inputs(qp, *PROMPTS[2]))
    assert got.shape == ours(model, _inputs(qp, *PROMPTS[2])).shape and np.isfinite(got).all()


def test_mlx_vlm_reads_our_conversions(ckpt, converted, tmp_path):
    """mlx-vlm (0.7.10, its gemma4_unified) loads both conversions: its language model's logits and its image
    and audio features are those of ours loaded from the same files; mlx-vlm's own 8-bit conversion loads
    here, giving its logits."""
    mlx_vlm = pytest.importorskip("mlx_vlm")
    import mlx.core as mx
    from mlx_vlm import convert as vlm_convert

    _, _, _, processor = ckpt
    ids = processor(PROMPTS[0][0])["input_ids"]
    inputs = _inputs(processor, *PROMPTS[2])
    vlm_convert(str(converted[0]), mlx_path=str(tmp_path / "vlm"), quantize=True, q_group_size=32, q_bits=8)
    for path in (*converted, tmp_path / "vlm"):
        theirs, _ = mlx_vlm.load(str(path))
        m = mlxgemma.load_model(path)
        assert diff(theirs.language_model(mx.array(ids)).logits, m(ids)) <= 1e-4, path.name
        image = theirs.get_image_features(mx.array(inputs["pixel_values"]), mx.array(inputs["image_position_ids"]))
        audio = theirs.get_audio_features(mx.array(inputs["input_features"]), mx.array(inputs["input_features_mask"]))
        assert diff(image, mx.concatenate(m.get_image_features(inputs["pixel_values"],
                                                               inputs["image_position_ids"]))) <= 1e-5
        assert diff(audio, mx.concatenate(m.get_audio_features(inputs["input_features"],
                                                               inputs["input_features_mask"]))) <= 1e-5


def test_bad_inputs(ckpt, causal_ckpt, tmp_path):
    from mlxgemma.media.gemma4_unified_processor import Gemma4UnifiedImageProcessor
    from mlxgemma.models import config_from_dict

    path, _, model, processor = ckpt
    with pytest.raises(MlxGemmaError, match="placeholder"):
        processor("<|image|> <|image|>", [media.image(30, 30)])
    with pytest.raises(MlxGemmaError, match="placeholder"):
        processor("no marks", [], [media.tone(0.5)])
    with pytest.raises(MlxGemmaError):
        processor("<|audio|>", [], [b"not audio at all"])
    inputs = processor("<|image|> hi", [media.image(30, 30)])
    with pytest.raises(MlxGemmaError, match="no media"):
        model(inputs["input_ids"])
    with pytest.raises(MlxGemmaError, match="image_position_ids"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"][..., :-1],
              image_position_ids=inputs["image_position_ids"])
    far = inputs["image_position_ids"].copy()
    far[0, 0, 0] = 500
    with pytest.raises(MlxGemmaError, match="position table"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_position_ids=far)
    with pytest.raises(MlxGemmaError, match="bicubic"):
        Gemma4UnifiedImageProcessor(resample=2)
    with pytest.raises(MlxGemmaError, match="max_soft_tokens"):
        Gemma4UnifiedImageProcessor(max_soft_tokens=100)
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(MlxGemmaError, match="output_proj_dims"):
        config_from_dict(dict(config, vision_config=dict(config["vision_config"], output_proj_dims=16)))
    with pytest.raises(MlxGemmaError, match="audio_embed_dim"):
        config_from_dict(dict(config, audio_config=dict(config["audio_config"], hidden_size=320)))
    _, _, m, p = causal_ckpt  # (no audio_config)
    with pytest.raises(MlxGemmaError, match="audio"):
        list(mlxgemma.stream_generate(m, p, "hi", audio=[media.tone(0.5)], max_tokens=1))

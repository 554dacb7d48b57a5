"""Gemma 4 with images and audio (Gemma4ForConditionalGeneration) against transformers 5.23, on a tiny random
float32 checkpoint (gemma4_media_util: window 6 inside 16-token image blocks, both towers, every weight and clip
bound randomised): logits with text only, images of two aspect ratios, an audio clip, both; the bidirectional
image blocks of use_bidirectional_attention "vision"; a chunked, cached prefill that would cut every block;
greedy generation; the processor's token layout against transformers' Gemma4Processor; bad inputs."""

import numpy as np
import pytest
import torch

import gemma4_media_util as media
import torchvision_stand_in
import mlxgemma
from mlxgemma.errors import MlxGemmaError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = media.save(tmp_path_factory.mktemp("gemma4_media"))
    hf = media.hf_model()
    model, processor = mlxgemma.load(path)
    return path, hf, model, processor


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    """use_bidirectional_attention "vision" (31B and 26B-A4B): image blocks see each other on sliding layers."""
    path = media.save(tmp_path_factory.mktemp("gemma4_bidir"), seed=3, bidirectional="vision", audio=False)
    return path, media.hf_model(3, bidirectional="vision", audio=False), *mlxgemma.load(path)


def hf_logits(hf, inputs: dict) -> np.ndarray:
    names = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
             "input_features", "input_features_mask")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in names}
    with torch.no_grad():
        return hf(**tensors).logits.numpy()


def ours(model, inputs: dict) -> np.ndarray:
    keep = {k: v for k, v in inputs.items() if k not in ("input_ids",)}
    return np.array(model(inputs["input_ids"], **keep))


CASES = {
    "text": ("Hello there, how are you?", [], []),
    "one image": ("<|image|> What is in this picture?", [(40, 64)], []),
    "two images": ("Compare <|image|> with <|image|> please.", [(64, 24), (30, 30)], []),
    "audio": ("<|audio|> Transcribe this.", [], [1.3]),
    "image and audio": ("<|image|> and <|audio|>: what do you see and hear?", [(48, 32)], [0.7]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpt, case):
    _, hf, model, processor = ckpt
    text, sizes, clips = CASES[case]
    images = [media.image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    audio = [media.tone(s, seed=i) for i, s in enumerate(clips)]
    inputs = processor(text, images, audio)
    if images:
        assert inputs["pixel_values"].shape[0] == len(images)
    expected = hf_logits(hf, inputs)
    got = ours(model, inputs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_bidirectional_image_blocks_match_transformers(vision_ckpt):
    _, hf, model, processor = vision_ckpt
    inputs = processor("<|image|> then <|image|>.", [media.image(32, 64), media.image(48, 48, seed=1)])
    expected = hf_logits(hf, inputs)
    assert np.abs(ours(model, inputs) - expected).max() <= 1e-4
    causal = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}  # without types: causal, as there
    assert np.abs(ours(model, causal) - hf_logits(hf, causal)).max() <= 1e-4
    assert np.abs(ours(model, causal) - expected).max() > 1e-3  # (the blocks change the logits)


@pytest.mark.parametrize("which", ["plain", "vision"])
def test_chunked_cached_prefill_then_decoding(ckpt, vision_ckpt, which):
    """The prompt prefilled in chunks of 5 (each would cut a block: they grow to its end) through the model's
    caches, then 4 tokens decoded one at a time: every logit equal to transformers' over the whole sequence."""
    _, hf, model, processor = ckpt if which == "plain" else vision_ckpt
    images = [media.image(40, 64), media.image(24, 24, seed=2)]
    audio = [media.tone(0.9)] if which == "plain" else []
    text = "A <|image|> B <|image|> C" + (" <|audio|> D" if audio else "") + " end"
    steps, full, start = media.cached_steps(model, processor, text, images, audio)
    expected = hf_logits(hf, full)[0, start:]
    assert np.abs(steps - expected).max() <= 1e-4


def test_greedy_generation_matches_transformers(ckpt):
    _, hf, model, processor = ckpt
    images, audio = [media.image(36, 52)], [media.tone(0.6)]
    text = "<|image|><|audio|> Describe."
    out = list(mlxgemma.stream_generate(model, processor, text, image=images, audio=audio, max_tokens=6,
                                        chat_template=False))
    inputs = processor(text, images, audio)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        hf_out = hf.generate(**tensors, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [c.token for c in out] == hf_out[0, inputs["input_ids"].shape[1]:].tolist()


def test_layout_matches_transformers_processor(ckpt):
    """Our ids (placeholders expanded: soft-token counts from sizes and clip lengths) and arrays equal what
    transformers' Gemma4Processor makes: its image processor and feature extractor, and its own
    replace_image_token / replace_audio_token (the whole processor cannot be built here: its video processor
    needs torchvision), then its tokenizer."""
    import re
    from types import SimpleNamespace

    import transformers

    _, _, _, processor = ckpt
    tok = media.tokenizer()
    ip = transformers.Gemma4ImageProcessorPil(**media.PROCESSOR["image_processor"])
    fe = transformers.Gemma4AudioFeatureExtractor(feature_size=media.MELS)
    images, audio = [media.image(40, 64), media.image(20, 90, seed=1)], [media.tone(1.1)]
    text = "<|image|> x <|audio|> y <|image|> z"
    ours_ = processor(text, images, audio)
    pixels, sound = ip(images, return_tensors="np"), fe(audio, return_tensors="np")
    stub = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>",
                           boa_token="<|audio>", eoa_token="<audio|>", audio_token="<|audio|>")
    counters = {"image": iter(range(2)), "audio": iter(range(1))}

    def expand(m):
        kind = "image" if m.group() == "<|image|>" else "audio"
        i = next(counters[kind])
        if kind == "image":
            return transformers.Gemma4Processor.replace_image_token(stub, pixels, i)
        return transformers.Gemma4Processor.replace_audio_token(stub, sound, i)

    expected_ids = tok(re.sub(r"<\|image\|>|<\|audio\|>", expand, text), return_tensors="np")["input_ids"]
    assert ours_["input_ids"].tolist() == expected_ids.tolist()
    assert np.abs(ours_["pixel_values"] - pixels["pixel_values"]).max() <= 1 / 255
    assert np.array_equal(ours_["image_position_ids"], pixels["image_position_ids"])
    assert np.abs(ours_["input_features"] - sound["input_features"]).max() <= 1e-4
    assert np.array_equal(ours_["input_features_mask"], sound["input_features_mask"])


def test_bad_inputs(ckpt, tmp_path):
    path, _, model, processor = ckpt
    with pytest.raises(MlxGemmaError, match="placeholder"):
        processor("<|image|> <|image|>", [media.image(30, 30)])
    with pytest.raises(MlxGemmaError, match="placeholder"):
        processor("no marks", [], [media.tone(0.5)])
    with pytest.raises(MlxGemmaError):
        processor("<|audio|>", [], [b"not audio at all"])
    ids = processor("<|image|> hi", [media.image(30, 30)])["input_ids"]
    with pytest.raises(MlxGemmaError, match="no media"):
        model(ids)
    text_only = media.save(tmp_path / "no_audio", audio=False)
    m, p = mlxgemma.load(text_only)
    with pytest.raises(MlxGemmaError, match="audio"):
        list(mlxgemma.stream_generate(m, p, "hi", audio=[media.tone(0.5)], max_tokens=1))


def _wav(samples: np.ndarray, rate: int = 16_000) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_chat_session_and_server_equal_the_library(ckpt, tmp_path):
    """A chat turn with a clip (ChatSession) and the server's OpenAI image_url + input_audio parts give the
    tokens of stream_generate on the same conversation; a second server request with other audio is told
    apart by the prompt cache; four concurrent requests with other clips each answer as alone; a video_url part
    (vLLM's) equals the library's video; bad base64, undecodable audio or video and a video URL to fetch are
    400s."""
    import base64
    import threading

    import openai

    from mlxgemma.chat import ChatSession
    from mlxgemma.media.audio import load_audio
    from server_util import serve

    path, _, model, processor = ckpt
    wav, png = _wav(media.tone(0.8, seed=4)), _png(media.image(28, 44, seed=5))
    clip = load_audio(wav)
    turn = [{"role": "user", "content": "<|image|><|audio|>Hi"}]
    chunks = list(mlxgemma.stream_generate(model, processor, turn, image=[media.image(28, 44, seed=5)], audio=[clip],
                                           max_tokens=5))
    expected = [c.token for c in chunks]
    session = ChatSession(model, processor, max_tokens=5)
    assert [c.token for c in session.stream("<|image|><|audio|>Hi", [media.image(28, 44, seed=5)], [clip])] == expected

    server = serve(path)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")

        def ask(audio_bytes):
            parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                     {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_bytes).decode(),
                                                             "format": "wav"}},
                     {"type": "text", "text": "Hi"}]
            return client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}],
                                                  max_tokens=5)

        assert ask(wav).choices[0].message.content == "".join(c.text for c in chunks)
        other = _wav(media.tone(0.8, hz=880.0, seed=9))
        alone = mlxgemma.stream_generate(model, processor, turn, image=[media.image(28, 44, seed=5)],
                                         audio=[load_audio(other)], max_tokens=5)
        assert ask(other).choices[0].message.content == "".join(c.text for c in alone)
        clips = [_wav(media.tone(0.4 + 0.2 * i, hz=300.0 + 150 * i, seed=20 + i)) for i in range(4)]
        alone = [ask(c).choices[0].message.content for c in clips]
        together = [None] * len(clips)

        def run(i):
            together[i] = ask(clips[i]).choices[0].message.content

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clips))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert together == alone  # batched beside each other: each as alone
        video = media.mp4(tmp_path / "v.mp4", 12).read_bytes()
        chunks = mlxgemma.stream_generate(model, processor, [{"role": "user", "content": "<|video|>Hi"}],
                                          video=[video], max_tokens=5)
        answer = client.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}},
            {"type": "text", "text": "Hi"}]}])
        assert answer.choices[0].message.content == "".join(c.text for c in chunks)
        with pytest.raises(openai.BadRequestError, match="never fetches"):
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]}])
        with pytest.raises(openai.BadRequestError, match="cannot be decoded|no video"):
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}])
        with pytest.raises(openai.BadRequestError, match="base64"):
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}])
        with pytest.raises(openai.BadRequestError, match="audio"):
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"noise").decode()}}]}])
    finally:
        server.stop()


def test_convert_keeps_the_towers(ckpt, tmp_path):
    """convert writes the whole model (mlx-vlm's layout, config.json with its towers, the processor files): in
    float its logits on an image + clip prompt are ours before conversion, exactly; -q quantizes the language
    model by the recipe and leaves towers whose widths do not divide the group size in float (said so), and
    still loads and runs. Ours loads back; so does a tower quantized at --q-vision-bits 4 with groups of 32."""
    import json

    from mlxgemma.checkpoints.convert import convert

    path, _, model, processor = ckpt
    inputs = processor("<|image|><|audio|> hi", [media.image(30, 50)], [media.tone(0.5)])
    before = ours(model, inputs)
    out = convert(path, tmp_path / "float")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["vision_config"] and config["audio_config"]
    assert (out / "processor_config.json").exists()
    m, p = mlxgemma.load(out)
    assert np.array_equal(ours(m, p("<|image|><|audio|> hi", [media.image(30, 50)], [media.tone(0.5)])), before)
    q = convert(path, tmp_path / "q", quantize=True, q_group_size=32, q_vision_bits=4, q_audio_bits=8)
    block = json.loads((q / "config.json").read_text())["quantization"]
    towers = {k: v["bits"] for k, v in block.items() if isinstance(v, dict) and k.startswith(("vision_tower.",
                                                                                              "audio_tower."))}
    assert towers and all(b == (4 if k.startswith("vision") else 8) for k, b in towers.items())
    qm, qp = mlxgemma.load(q)
    got = ours(qm, qp("<|image|><|audio|> hi", [media.image(30, 50)], [media.tone(0.5)]))
    assert got.shape == before.shape and np.isfinite(got).all()
    assert hasattr(qm.vision_tower.encoder.layers[0].self_attn.q_proj.linear, "scales")


def test_mlx_vlm_loads_our_conversion(ckpt, tmp_path):
    """mlx-vlm (0.7.10) loads what convert writes, towers included, and its language model's logits are ours;
    we load what mlx-vlm writes."""
    mlx_vlm = pytest.importorskip("mlx_vlm")
    import mlx.core as mx

    from mlxgemma.checkpoints.convert import convert

    path, _, model, processor = ckpt
    ours_path = convert(path, tmp_path / "out")
    theirs, _ = mlx_vlm.load(str(ours_path))
    ids = processor("Hello there, how are you?")["input_ids"]
    assert np.abs(np.array(theirs.language_model(mx.array(ids)).logits) - np.array(model(ids))).max() <= 1e-4
    # and the other way: mlx-vlm's 8-bit conversion (of ours: it misreads transformers' per_layer_config) loads
    # here, its quantized language model giving mlx-vlm's own logits, and takes an image and a clip
    from mlx_vlm import convert as vlm_convert

    vlm_convert(str(ours_path), mlx_path=str(tmp_path / "vlm"), quantize=True, q_group_size=32, q_bits=8)
    theirs, _ = mlx_vlm.load(str(tmp_path / "vlm"))
    m, p = mlxgemma.load(tmp_path / "vlm")
    assert hasattr(m.language_model.model.layers[0].self_attn.q_proj, "scales")
    assert np.abs(np.array(theirs.language_model(mx.array(ids)).logits) - np.array(m(ids))).max() <= 1e-4
    inputs = p("<|image|><|audio|> hi", [media.image(30, 50)], [media.tone(0.5)])
    assert np.isfinite(ours(m, inputs)).all()


def test_left_padded_batch_with_different_media_per_row(ckpt):
    """Two prompts with other media (two images and a clip; one image), left-padded into one batch: logits equal
    transformers' on the same batch, and each row's real positions equal that row alone."""
    _, hf, model, processor = ckpt
    rows = [processor("<|image|> and <|image|> with <|audio|>", [media.image(40, 24), media.image(20, 60, seed=1)],
                      [media.tone(0.6)]),
            processor("just <|image|>", [media.image(33, 33, seed=2)])]
    L = max(r["input_ids"].shape[1] for r in rows)
    pad = [L - r["input_ids"].shape[1] for r in rows]
    batch = {
        "input_ids": np.concatenate([np.pad(r["input_ids"], ((0, 0), (p, 0))) for r, p in zip(rows, pad)]),
        "attention_mask": np.concatenate([np.pad(r["attention_mask"], ((0, 0), (p, 0))) for r, p in zip(rows, pad)]),
        "mm_token_type_ids": np.concatenate([np.pad(r["mm_token_type_ids"], ((0, 0), (p, 0))) for r, p in zip(rows, pad)]),
        "pixel_values": np.concatenate([r["pixel_values"] for r in rows]),
        "image_position_ids": np.concatenate([r["image_position_ids"] for r in rows]),
        "input_features": rows[0]["input_features"], "input_features_mask": rows[0]["input_features_mask"],
    }
    got, expected = ours(model, batch), hf_logits(hf, batch)
    real = batch["attention_mask"].astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-4
    for i, (r, p) in enumerate(zip(rows, pad)):
        assert np.abs(got[i, p:] - ours(model, r)[0]).max() <= 1e-4


def test_quantized_kv_cache_and_prompt_lookup_with_media(ckpt):
    """An image and a clip in the prompt: with an 8-bit KV cache (quantized after the prefill, as for text) the
    greedy tokens are the float cache's on this model (measured: all 8), and speculative decoding by prompt
    lookup gives plain greedy's tokens exactly."""
    _, _, model, processor = ckpt
    common = dict(image=[media.image(36, 52)], audio=[media.tone(0.6)], max_tokens=8, chat_template=False)
    plain = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", **common)]
    q = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", kv_bits=8,
                                                   kv_group_size=32, quantized_kv_start=0, **common)]
    assert q == plain
    lookup = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say",
                                                        prompt_lookup_ngram=1, num_draft_tokens=3, **common)]
    assert lookup == plain


@pytest.mark.slow
def test_caption_and_transcribe_examples(ckpt, tmp_path):
    """examples/caption.py (two images at a time, one broken file) and examples/transcribe.py (a WAV and a
    broken file) print, per file, what mlxgemma.generate gives for that file alone."""
    import subprocess
    import sys
    from pathlib import Path

    path, _, model, processor = ckpt
    photos, clips = tmp_path / "photos", tmp_path / "clips"
    photos.mkdir(), clips.mkdir()
    for i, size in enumerate([(30, 50), (40, 40), (20, 64)]):
        media.image(*size, seed=i).save(photos / f"p{i}.png")
    (photos / "p1b.png").write_bytes(b"broken")
    (clips / "a.wav").write_bytes(_wav(media.tone(0.7)))
    (clips / "b.wav").write_bytes(b"broken")
    examples = Path(__file__).parent.parent / "examples"
    run = subprocess.run([sys.executable, str(examples / "caption.py"), "--model", str(path), str(photos),
                          "--max-tokens", "3", "--batch-size", "2", "--prompt", "Hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = [f"p{i}.png: " + " ".join(mlxgemma.generate(model, processor, "Hi", image=photos / f"p{i}.png",
                                                             max_tokens=3).split()) for i in range(3)]
    assert run.stdout.strip().splitlines() == expected and "p1b.png: error" in run.stderr
    run = subprocess.run([sys.executable, str(examples / "transcribe.py"), "--model", str(path), str(clips),
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "b.wav: error" in run.stderr
    text = mlxgemma.generate(model, processor, "Transcribe this audio.", audio=[clips / "a.wav"], max_tokens=4)
    assert run.stdout.strip().splitlines() == [f"a.wav: {' '.join(text.split())}"]


def test_video_logits_and_layout_match_transformers(ckpt):
    """A video's frames (decoded: frames and timestamps) through our processor: pixel values those of
    transformers' Gemma4VideoProcessor (through torchvision_stand_in.py; tests/test_gemma4_vision.py compares
    more), logits with text, an image and the video equal transformers' (its frames are image blocks of type 2,
    bidirectional where images are), and the text is what transformers' replace_video_token writes for those
    timestamps."""
    import re
    from types import SimpleNamespace

    import transformers

    _, hf, model, processor = ckpt
    frames, stamps = media.video(3)
    inputs = processor("<|image|> then <|video|> end", [media.image(30, 30)], videos=[(frames, stamps)])
    assert inputs["pixel_values_videos"].shape[0] == 3 and inputs["num_frames_per_video"].tolist() == [3]
    with torchvision_stand_in.gemma4_video_processor() as hf_video:
        theirs = hf_video([frames], patch_size=media.PATCH, pooling_kernel_size=media.POOL)
    for key in ("pixel_values_videos", "video_position_ids"):
        assert np.array_equal(inputs[key], theirs[key]), key
    names = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
             "pixel_values_videos", "video_position_ids", "num_frames_per_video")
    with torch.no_grad():
        expected = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in names}).logits.numpy()
    assert np.abs(ours(model, inputs) - expected).max() <= 1e-4
    per_frame = int((inputs["video_position_ids"][0] != -1).all(-1).sum()) // media.POOL ** 2
    stub = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    meta = transformers.video_utils.VideoMetadata(total_num_frames=3, fps=2.0, frames_indices=[0, 1, 2])
    text = transformers.Gemma4Processor.replace_video_token(stub, {"num_soft_tokens_per_video": [per_frame],
                                                                   "video_metadata": [meta]}, 0)
    decoded = processor.tokenizer.decode(inputs["input_ids"][0].tolist())
    assert text in decoded and re.search(r"00:01 <\|image>", decoded)


def test_video_frame_sampling_and_decoding(tmp_path):
    """32 frames sampled as transformers' default_sample_indices_fn does (fewer frames: all of them, where it
    raises), their timestamps as its VideoMetadata gives them; a file PyAV wrote decodes to those frames."""
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    from mlxgemma.media.gemma4_video import load_video, sample_indices

    for total in (32, 33, 100, 1000, 4097):
        theirs = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24.0), num_frames=32)
        assert sample_indices(total).tolist() == theirs.tolist()
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    path = media.mp4(tmp_path / "clip.mp4", 40)
    frames, stamps = load_video(path)
    expected = sample_indices(40)
    assert frames.shape == (32, 48, 64, 3)
    meta = VideoMetadata(total_num_frames=40, fps=10.0, frames_indices=expected)
    assert np.allclose(stamps, meta.timestamps)
    assert np.abs(frames[:, 24, 32, 0].astype(int) - (expected * 6) % 256).max() <= 8  # (lossy codec)
    assert np.array_equal(load_video(path.read_bytes())[0], frames)
    with pytest.raises(MlxGemmaError, match="cannot be decoded|no video"):
        load_video(b"not a video")


def test_video_generation(ckpt):
    """stream_generate(video=...) gives the greedy tokens of the model on the processor's inputs."""
    _, _, model, processor = ckpt
    frames, stamps = media.video(4, seed=3)
    out = [c.token for c in mlxgemma.stream_generate(model, processor, "<|video|> What happens?",
                                                     video=[(frames, stamps)], max_tokens=4, chat_template=False)]
    inputs = processor("<|video|> What happens?", videos=[(frames, stamps)])
    ids = inputs["input_ids"]
    expected = []
    for _ in range(4):
        step = dict(inputs, input_ids=ids, attention_mask=np.ones_like(ids),
                    mm_token_type_ids=np.pad(inputs["mm_token_type_ids"], ((0, 0), (0, ids.shape[1] - inputs["input_ids"].shape[1]))))
        expected.append(int(ours(model, step)[0, -1].argmax()))
        ids = np.concatenate([ids, [[expected[-1]]]], axis=1)
    assert out == expected


def test_chat_video_equals_the_library(ckpt, tmp_path, capsys):
    """/video PATH in the chat REPL: the turn shows what stream_generate gives on the same conversation and
    video (ChatSession's tokens too), and the next turn, text only, keeps the video in the conversation; a
    processor without a video processor neither offers /video nor takes it."""
    import copy
    import io

    from mlxgemma.chat import ChatSession, repl
    from mlxgemma.media.gemma4_video import load_video
    from mlxgemma.reply import Shown

    _, _, model, processor = ckpt
    video = media.mp4(tmp_path / "v.mp4", 12)
    turn = [{"role": "user", "content": "<|video|>Hi"}]
    chunks = list(mlxgemma.stream_generate(model, processor, turn, video=[video], max_tokens=5))
    shown = io.StringIO()
    view = Shown(shown, shown)  # (what the REPL prints a reply with)
    for chunk in chunks:
        view.write(chunk)
    assert len(chunks) == 5 and shown.getvalue()
    session = ChatSession(model, processor, max_tokens=5)
    assert [c.token for c in session.stream("Hi", videos=[load_video(video)])] == [c.token for c in chunks]
    follow = session.messages + [{"role": "user", "content": "And then?"}]
    expected = [c.token for c in mlxgemma.stream_generate(model, processor, follow, video=[video], max_tokens=5)]
    assert [c.token for c in session.stream("And then?")] == expected

    lines = iter([f"/video {video}", "Hi", "/quit"])
    assert repl(ChatSession(model, processor, max_tokens=5), lambda prompt="": next(lines)) == 0
    out = capsys.readouterr()
    assert "/video PATH" in out.err and "[1 video(s) for your next message]" in out.err
    assert out.out == shown.getvalue() + "\n"
    blind = ChatSession(model, copy.copy(processor), max_tokens=5)
    blind.processor.video_processor = None
    lines = iter([f"/video {video}", "/quit"])
    assert repl(blind, lambda prompt="": next(lines)) == 0
    err = capsys.readouterr().err
    assert "/video" not in err.splitlines()[0] and "takes no video" in err
    with pytest.raises(MlxGemmaError, match="takes no video"):
        list(blind.stream("Hi", videos=[load_video(video)]))


def test_prompt_cache_file_with_an_image(ckpt, tmp_path):
    """A prompt with an image cached to a file (python -m mlxgemma.cache_prompt's function), then continued
    with text: the greedy tokens of the whole prompt at once."""
    from mlxgemma.cache_prompt import cache_prompt
    from mlxgemma.generate import continuation

    _, _, model, processor = ckpt
    image = media.image(26, 42, seed=8)
    cache_prompt(model, processor, "Look <|image|> here", tmp_path / "c.safetensors", image=[image])
    resumed = [c.token for c in mlxgemma.stream_generate(
        model, processor, **continuation(model, processor, " and there", tmp_path / "c.safetensors"), max_tokens=5)]
    whole = [c.token for c in mlxgemma.stream_generate(model, processor, "Look <|image|> here and there",
                                                       image=[image], chat_template=False, max_tokens=5)]
    assert resumed == whole


def test_a_clip_longer_than_30_s_is_cut_as_transformers_cuts_it(ckpt):
    """35 s of audio: the feature extractor keeps the first 30 s (transformers' max_length, 480,000 samples),
    so the clip gets 750 soft tokens, as transformers' processor gives it."""
    import transformers

    _, _, model, processor = ckpt
    clip = media.tone(35.0)
    ids = processor("<|audio|>", [], [clip])["input_ids"][0]
    theirs = transformers.Gemma4AudioFeatureExtractor(feature_size=media.MELS)([clip], return_tensors="np")
    expected = transformers.Gemma4Processor.replace_audio_token(
        type("Stub", (), {"boa_token": "", "eoa_token": "", "audio_token": "x"})(), theirs, 0)
    assert int((ids == media.IDS["<|audio|>"]).sum()) == len(expected) == 750

"""Gemma 4's audio tower and audio feature extractor against transformers' (float32, eager; every weight
randomised and every clip bound set where it clips), the soft-token counts against Gemma4Processor's two
formulas and the tower's mask, and load_audio on files encoded here (WAV by the stdlib, FLAC/MP3/M4A/OGG by
PyAV's encoders), resampling checked against the analytic tone, and bad inputs."""

import io
import json
import math
import wave
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

from mlxgemma.errors import MlxGemmaError
from mlxgemma.media.audio import Gemma4AudioFeatureExtractor, load_audio
from mlxgemma.models.gemma4_audio import Gemma4AudioConfig, Gemma4AudioModel
from reference import TOL, max_diff, randomize

# 16 mel bins halve twice to 4 = channels[0] // 4, as transformers sizes the projection. Chunks of 4 frames
# seeing 4 past ones (the released 12 / 13 ratio) and a second shape with future context and a relative-position
# table shorter than the window; logit cap, residual clamp and eps small enough to act (the feed-forward norms
# keep eps 1e-6 whatever rms_norm_eps is).
MELS = 16
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 8],
             conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
             attention_logit_cap=2.0, rms_norm_eps=1e-3, gradient_clipping=3.0, output_proj_dims=24)
SHAPES = {"past": TOWER, "future": dict(TOWER, attention_chunk_size=3, attention_context_left=6,
                                        attention_context_right=2)}


def clip_bounds(hf, features: np.ndarray) -> None:
    """Every clippable linear's bounds at 70% of the range it sees on `features` (inf before), so all clip."""
    seen = {}

    def record(module, args, out):  # (returns None: the output stays)
        seen.setdefault(module, (args[0].min(), args[0].max(), out.min(), out.max()))

    hooks = [m.register_forward_hook(record) for m in hf.modules() if isinstance(m, Gemma4ClippableLinear)]
    with torch.no_grad():
        hf(torch.tensor(features))
        for hook in hooks:
            hook.remove()
        for m, (lo, hi, out_lo, out_hi) in seen.items():
            for name, value in zip(("input_min", "input_max", "output_min", "output_max"), (lo, hi, out_lo, out_hi)):
                getattr(m, name).fill_(0.7 * value)


def hf_tower(config: dict, seed: int = 0, bounds: bool = True):
    hf = randomize(transformers.Gemma4AudioModel(transformers.Gemma4AudioConfig(**config,
                                                                                attn_implementation="eager")), seed)
    if bounds:
        clip_bounds(hf, features(1, 64, seed=99))
    return hf


def our_tower(hf, dtype=mx.float32) -> Gemma4AudioModel:
    config = Gemma4AudioConfig.from_dict(hf.config.to_dict(), "audio_config", require=False)
    model = Gemma4AudioModel(config)
    model.set_dtype(dtype)
    weights = {k: mx.array(v.float().numpy()).astype(dtype) for k, v in hf.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def features(n: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, frames, MELS)).astype(np.float32)


def hf_run(hf, feats, mask=None):
    with torch.no_grad():
        out = hf(torch.tensor(feats), attention_mask=None if mask is None else torch.tensor(mask))
    return out.last_hidden_state.float().numpy(), None if out.attention_mask is None else out.attention_mask.numpy()


@pytest.fixture(scope="module")
def towers():
    out = {}
    for name, config in SHAPES.items():
        hf = hf_tower(config)
        out[name] = hf, our_tower(hf)
    return out


@pytest.fixture(scope="module")
def fe16():
    """A 16-mel extractor (otherwise Gemma 4's settings), to feed the tiny towers real clips."""
    return Gemma4AudioFeatureExtractor(feature_size=MELS), transformers.Gemma4AudioFeatureExtractor(feature_size=MELS)


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


# ---- the tower -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("frames", [37, 400])  # 10 / 100 frames after subsampling: 3 to 34 chunks
def test_tower_one_clip(towers, shape, frames):
    hf, ours = towers[shape]
    feats = features(1, frames, seed=frames)
    mask = np.ones((1, frames), bool)
    ref, ref_mask = hf_run(hf, feats, mask)
    hidden, out_mask = ours(feats, mask)
    assert hidden.shape == ref.shape and hidden.dtype == mx.float32
    assert max_diff(hidden, ref) <= TOL
    assert np.array_equal(np.array(out_mask), ref_mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_tower_padded_batch(towers, fe16, shape):
    """Two clips of different lengths through the feature extractor: equal everywhere, padding included; and
    each clip's valid frames as the clip alone gives them."""
    hf, ours = towers[shape]
    clips = [tone(0.9, 16000), np.random.default_rng(3).standard_normal(5200).astype(np.float32) * 0.1]
    batch = fe16[0](clips)
    ref, ref_mask = hf_run(hf, batch["input_features"], batch["input_features_mask"])
    hidden, mask = ours(batch["input_features"], batch["input_features_mask"])
    assert max_diff(hidden, ref) <= TOL
    assert np.array_equal(np.array(mask), ref_mask) and not ref_mask[1].all()
    for i, clip in enumerate(clips):
        alone = fe16[0]([clip])
        h, m = ours(alone["input_features"], alone["input_features_mask"])
        valid = int(np.array(m).sum())
        assert max_diff(np.array(h)[0, :valid], np.array(hidden)[i, :valid]) <= TOL


def test_tower_without_mask(towers):
    """No mask: transformers returns no mask; ours says every frame is valid. (MLX input here.)"""
    hf, ours = towers["future"]
    feats = features(2, 50, seed=5)
    ref, ref_mask = hf_run(hf, feats)
    hidden, mask = ours(mx.array(feats))
    assert ref_mask is None and np.array(mask).all() and mask.shape == hidden.shape[:2]
    assert max_diff(hidden, ref) <= TOL


def test_clip_bounds_matter(towers):
    """The bounds set by clip_bounds change transformers' output (so the comparisons above cover them)."""
    hf, _ = towers["past"]
    feats = features(1, 60, seed=7)
    unbounded = hf_tower(TOWER, bounds=False)
    assert max_diff(hf_run(hf, feats)[0], hf_run(unbounded, feats)[0]) > 100 * TOL


def test_mlx_layout_checkpoint(towers):
    """An MLX checkpoint (mlx-vlm / mlx-community) holds the convolutions transposed: sanitize leaves them."""
    hf, ours = towers["past"]
    weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    mlx_layout = ours.sanitize(weights)
    assert mlx_layout["subsample_conv_projection.layer1.conv.weight"].shape == (8, 3, 3, 16)
    assert mlx_layout["layers.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 3, 1)
    again = ours.sanitize(mlx_layout)
    assert all(np.array_equal(np.array(again[k]), np.array(v)) for k, v in mlx_layout.items())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tower_half_precision(towers, dtype):
    """Weights in bfloat16 / float16 run (norms and attention in float32 inside) and land no farther from the
    float32 reference than transformers in that dtype does (twice its distance at most)."""
    hf, _ = towers["past"]
    feats = features(2, 90, seed=11)
    mask = np.ones((2, 90), bool)
    mask[1, 53:] = False
    ref = hf_run(hf, feats, mask)[0]
    hf_half = hf_tower(TOWER).to(getattr(torch, dtype))
    ours = our_tower(hf_half, getattr(mx, dtype))
    hidden, _ = ours(feats, mask)
    assert hidden.dtype == getattr(mx, dtype)
    theirs = max_diff(hf_run(hf_half, feats, mask)[0], ref)
    assert np.isfinite(np.array(hidden.astype(mx.float32))).all()
    assert max_diff(hidden.astype(mx.float32), ref) <= 2 * theirs


@pytest.mark.parametrize("bad", [dict(hidden_size=30), dict(hidden_size=33, num_attention_heads=3),
                                 dict(subsampling_conv_channels=[16]), dict(attention_context_left=0),
                                 dict(attention_context_right=-1), dict(hidden_act="swish9"),
                                 dict(subsampling_conv_channels=[16, "8"])])
def test_config_errors(bad):
    with pytest.raises(MlxGemmaError) as e:
        Gemma4AudioConfig.from_dict(dict(TOWER, **bad), "audio_config", require=False)
    assert "\n" not in str(e.value)


def test_released_config():
    """The E2B checkpoint's audio_config, as shipped, reads to transformers' values."""
    real = json.loads((Path(__file__).parent / "real_configs" / "google__gemma-4-E2B-it" / "config.json").read_text())
    ours = Gemma4AudioConfig.from_dict(real["audio_config"], "audio_config", require=False)
    theirs = transformers.Gemma4AudioConfig(**real["audio_config"])
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "subsampling_conv_channels",
                 "conv_kernel_size", "attention_chunk_size", "attention_context_left", "attention_context_right",
                 "attention_logit_cap", "attention_invalid_logits_value", "use_clipped_linears", "rms_norm_eps",
                 "gradient_clipping", "output_proj_dims", "residual_weight", "hidden_act"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.subsampled_mel_bins * 4 == 128  # the feature extractor's 128 mel bins


def test_tower_input_errors(towers):
    _, ours = towers["past"]
    for feats, mask in [(np.zeros((1, 10, 128), np.float32), None), (np.zeros((10, MELS), np.float32), None),
                        (np.zeros((1, 10, MELS), np.float32), np.ones((1, 9), bool))]:
        with pytest.raises(MlxGemmaError):
            ours(feats, mask)


# ---- the feature extractor --------------------------------------------------------------------------------

CLIPS = {
    "sine": tone(3.0, 16000),
    "noise": np.random.default_rng(0).standard_normal(37_000).astype(np.float32) * 0.1,
    "silence": np.zeros(20_000, np.float32),
    "short": np.random.default_rng(1).standard_normal(200).astype(np.float32) * 0.1,  # one frame
    "long": np.random.default_rng(2).standard_normal(490_000).astype(np.float32) * 0.05,  # cut at 30 s
}
SETTINGS = {
    "gemma4": {},
    "preemphasis": dict(preemphasis=0.97, input_scale_factor=2.0, mel_floor=1e-5),
    "every_field": dict(preemphasis=0.9, preemphasis_htk_flavor=False, fft_overdrive=True, min_frequency=60.0,
                        max_frequency=7600.0, per_bin_mean=np.linspace(-1, 1, 128).tolist(),
                        per_bin_stddev=np.linspace(0.5, 2, 128).tolist(), padding_value=0.25),
    "left_padding": dict(padding_side="left"),
}


def hf_features(hf_fe, clips):
    out = hf_fe(clips, return_tensors="np")
    return out["input_features"], out["input_features_mask"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_feature_extractor(setting):
    """From the JSON transformers saves (as a checkpoint holds it): each clip alone, then all in one batch."""
    hf_fe = transformers.Gemma4AudioFeatureExtractor(**SETTINGS[setting])
    ours = Gemma4AudioFeatureExtractor.from_dict(json.loads(hf_fe.to_json_string()))
    for clips in [[c] for c in CLIPS.values()] + [list(CLIPS.values())]:
        ref, ref_mask = hf_features(hf_fe, clips)
        out = ours(clips)
        assert out["input_features"].dtype == np.float32 and out["input_features_mask"].dtype == bool
        assert out["input_features"].shape == ref.shape
        assert max_diff(out["input_features"], ref) <= TOL
        assert np.array_equal(out["input_features_mask"], ref_mask)


def test_feature_extractor_reads_configs_as_transformers():
    """Saved frame_length / hop_length / fft_length are derived and transformers ignores them on loading (a
    25 ms frame does not survive save and load): ours too, and mlx-vlm's rewritten block (num_mel_filters,
    chunk_duration) reads as transformers reads it. A processor config gives its block and audio_seq_length."""
    saved = json.loads(transformers.Gemma4AudioFeatureExtractor(frame_length_ms=25.0).to_json_string())
    assert saved["frame_length"] == 400
    mlx_vlm = {"feature_extractor_type": "Gemma4AudioFeatureExtractor", "sampling_rate": 16000,
               "num_mel_filters": 128, "fft_length": 512, "hop_length": 160, "chunk_duration": 8.0,
               "overlap_duration": 1.0}
    clip = [CLIPS["noise"]]
    for block in (saved, mlx_vlm):
        hf_fe = transformers.Gemma4AudioFeatureExtractor.from_dict(dict(block))
        ours = Gemma4AudioFeatureExtractor.from_dict({"feature_extractor": block, "audio_seq_length": 600})
        assert (ours.frame_length, ours.hop_length, ours.fft_length, ours.audio_seq_length) == \
            (hf_fe.frame_length, hf_fe.hop_length, hf_fe.fft_length, 600)
        assert max_diff(ours(clip)["input_features"], hf_features(hf_fe, clip)[0]) <= TOL


@pytest.mark.parametrize("bad", [dict(feature_size=0), dict(sampling_rate=16000.5), dict(padding_side="middle"),
                                 dict(per_bin_mean=[0.0] * 3), dict(fft_overdrive="yes"),
                                 dict(min_frequency=9000.0), dict(frame_length_ms=0.01)])
def test_feature_extractor_config_errors(bad):
    with pytest.raises(MlxGemmaError) as e:
        Gemma4AudioFeatureExtractor.from_dict(bad)
    assert "\n" not in str(e.value)


def test_feature_extractor_takes_only_its_rate():
    with pytest.raises(MlxGemmaError):
        Gemma4AudioFeatureExtractor()([CLIPS["sine"]], sampling_rate=44100)


# ---- soft tokens -------------------------------------------------------------------------------------------

LENGTHS = [0, 100, 160, 161, 320, 321, 481, 1000, 16_000, 16_123, 48_000, 479_999, 480_000, 480_160, 490_000]


def test_num_soft_tokens_as_the_processor():
    """From samples as _compute_audio_num_tokens, from masks as replace_audio_token (called on transformers'
    Gemma4Processor with the state they read), and the two agree with each other."""
    hf_fe = transformers.Gemma4AudioFeatureExtractor()
    ours = Gemma4AudioFeatureExtractor()
    processor = SimpleNamespace(feature_extractor=hf_fe, audio_seq_length=750, boa_token="[", eoa_token="]",
                                audio_token="a")
    for n in LENGTHS:
        clip = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
        expected = transformers.Gemma4Processor._compute_audio_num_tokens(processor, clip, 16000)
        assert ours.num_soft_tokens(n) == expected
        if n:
            ref_mask = hf_features(hf_fe, [clip])[1]
            replaced = transformers.Gemma4Processor.replace_audio_token(processor, {"input_features_mask": ref_mask}, 0)
            assert ours.num_soft_tokens(ref_mask[0]) == replaced.count("a") == expected
    assert ours.num_soft_tokens(480_000) == 750


def test_num_soft_tokens_is_the_tower_mask(towers, fe16):
    """What the tower marks valid, per clip of a padded batch, is the count the processor gives."""
    _, ours = towers["past"]
    fe = fe16[0]
    lengths = [5200, 16_000, 3333, 900]
    batch = fe([np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1 for n in lengths])
    _, mask = ours(batch["input_features"], batch["input_features_mask"])
    counts = np.array(mask).sum(axis=1).tolist()
    assert counts == fe.num_soft_tokens(batch["input_features_mask"]) == [fe.num_soft_tokens(n) for n in lengths]


# ---- load_audio ----------------------------------------------------------------------------------------------


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV by the standard library; samples (n,) or (channels, n) in [-1, 1]."""
    pcm = np.round(np.atleast_2d(samples).T * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def encoded(pcm: np.ndarray, rate: int, container: str, codec: str, layout: str = "mono") -> bytes:
    """A file made by PyAV's encoder from 16-bit PCM (channels, n) (frames re-cut to the codec's frame size and
    sample format, timestamps from 0)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options={"strict": "experimental"})
        ctx = stream.codec_context
        fit = av.AudioResampler(format=ctx.codec.audio_formats[0].name, layout=layout, rate=rate,
                                frame_size=ctx.frame_size or None)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.atleast_2d(pcm), np.int16), format="s16p",
                                           layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for f in fit.resample(frame) + fit.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def peak_hz(samples: np.ndarray, rate: int = 16000) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples))


def test_load_wav_exact(tmp_path):
    """A 16 kHz mono WAV decodes to its PCM values / 32768, from a path, bytes, or the array itself."""
    source = tone(1.0, 16000)
    data = wav_bytes(source, 16000)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    pcm = np.round(source * 32767).astype(np.int16)
    for got in (load_audio(path), load_audio(str(path)), load_audio(data), load_audio((pcm, 16000))):
        assert got.dtype == np.float32 and got.shape == (16000,)
        assert np.array_equal(got, pcm / np.float32(32768))


@pytest.mark.parametrize("container,codec,layout,frame", [
    ("flac", "flac", "mono", 0), ("mp3", "libmp3lame", "mono", 1152), ("ipod", "aac", "mono", 1024),
    ("ogg", "vorbis", "stereo", 1024),  # (FFmpeg's own Vorbis encoder takes stereo only)
    ("ogg", "libopus", "mono", 960)])
def test_load_encoded(container, codec, layout, frame):
    """Each format decodes to the tone it holds: lossless FLAC to the very samples, lossy ones to 440 Hz with
    the length within a codec frame (encoder padding)."""
    try:
        av.codec.Codec(codec, "w")
    except av.error.FFmpegError:  # (codec missing from this PyAV build)
        pytest.skip(f"PyAV has no {codec} encoder")
    rate = 48000 if codec == "libopus" else 16000
    pcm = np.round(tone(1.0, rate) * 32767).astype(np.int16)
    got = load_audio(encoded(pcm if layout == "mono" else np.stack([pcm, pcm]), rate, container, codec, layout))
    assert got.dtype == np.float32 and got.ndim == 1
    if codec == "flac":
        assert np.array_equal(got, pcm / np.float32(32768))
    else:
        assert abs(len(got) - 16000) <= frame * 16000 // rate + 1
        assert abs(peak_hz(got) - 440) <= 16000 / len(got)


def test_stereo_44k1_resampled():
    """Stereo at 44.1 kHz: the channels averaged (not FFmpeg's 1/sqrt(2) sum), resampled to 16 kHz against
    the analytic tone sampled at 16 kHz (away from the first and last filter lengths), length ceil(n * 16/44.1)."""
    n = 44100 + 37
    left, right = tone(n / 44100, 44100, amplitude=0.6), tone(n / 44100, 44100, amplitude=0.2)
    got = load_audio(wav_bytes(np.stack([left, right]), 44100))
    assert len(got) == math.ceil(n * 16000 / 44100)
    expected = 0.4 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16000)
    assert np.abs(got - expected)[64:-64].max() < 1e-3  # 16-bit PCM and the resampling filter's ripple
    assert abs(peak_hz(got) - 440) <= 16000 / len(got)
    same = load_audio((np.stack([left, right]).T, 44100))  # the array form, channels last
    assert np.abs(same - expected)[64:-64].max() < 1e-3


@pytest.mark.parametrize("bad", ["garbage", "empty", "directory", "missing", "text", "no_frames", "type", "nan",
                                 "rate", "cube"])
def test_load_audio_errors(tmp_path, bad):
    text = tmp_path / "notes.txt"
    text.write_text("not audio at all\n" * 20)
    sources = {
        "garbage": b"\x00\x01garbage" * 50, "empty": b"", "directory": tmp_path, "missing": tmp_path / "none.wav",
        "text": text, "no_frames": wav_bytes(np.zeros(0, np.float32), 16000), "type": 42,
        "nan": np.array([0.0, np.nan], np.float32), "rate": (np.zeros(10, np.float32), 0),
        "cube": np.zeros((2, 2, 2), np.float32),
    }
    with pytest.raises(MlxGemmaError) as e:
        load_audio(sources[bad])
    assert str(e.value) and "\n" not in str(e.value)

"""Gemma 3n's audio tower, its multimodal embedder and its audio feature extractor against transformers'
(float32, eager; every parameter randomised: the tower saves no buffers, all of them are derived), clips of
several lengths through both, files at several sample rates through load_audio, and bad inputs."""

import io
import json
import wave
from dataclasses import fields
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder as HFEmbedder

from mlxgemma.errors import MlxGemmaError
from mlxgemma.media.audio import load_audio
from mlxgemma.media.gemma3n_audio import Gemma3nAudioFeatureExtractor
from mlxgemma.models.gemma3n_audio import Gemma3nAudioConfig, Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder
from reference import TOL, max_diff, randomize

# 16 mel bins; chunks of 4 seeing 4 past frames (the released 12 / 13 ratio) and reduction 4 (released); a second
# shape with future context, a 5-frame time kernel, a frequency stride of 1 and reduction 3. Logit cap, residual
# clamp and eps small enough to act (test_small_bounds_act).
MELS = 16
TOWER = dict(hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2, input_feat_size=MELS,
             sscp_conv_channel_size=[8, 4], conf_attention_chunk_size=4, conf_attention_context_left=5,
             conf_attention_context_right=0, conf_conv_kernel_size=3, conf_reduction_factor=4,
             conf_attention_logit_cap=2.0, gradient_clipping=1.5, rms_norm_eps=1e-3, sscp_conv_group_norm_eps=0.1,
             vocab_size=8, vocab_offset=100)
SHAPES = {"past": TOWER, "future": dict(TOWER, conf_attention_chunk_size=3, conf_attention_context_left=6,
                                        conf_attention_context_right=2, conf_reduction_factor=3,
                                        sscp_conv_kernel_size=[[3, 3], [5, 3]], sscp_conv_stride_size=[[2, 2], [2, 1]])}
TEXT = SimpleNamespace(hidden_size=24)


def hf_tower(config: dict, seed: int = 0):
    return randomize(transformers.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig(**config)), seed)


def our_tower(hf, dtype=mx.float32) -> Gemma3nAudioEncoder:
    model = Gemma3nAudioEncoder(Gemma3nAudioConfig.from_dict(hf.config.to_dict(), "audio_config", require=False))
    model.set_dtype(dtype)
    weights = {k: mx.array(v.float().numpy()).astype(dtype) for k, v in hf.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def features(n: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, frames, MELS)).astype(np.float32)


def hf_run(hf, feats, padded):
    with torch.no_grad():
        out = hf(torch.tensor(feats), torch.tensor(padded))
    return out.last_hidden_state.float().numpy(), out.audio_mel_mask.numpy()


@pytest.fixture(scope="module")
def towers():
    return {name: (hf, our_tower(hf)) for name, hf in ((n, hf_tower(c)) for n, c in SHAPES.items())}


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.1


# ---- the tower -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("frames", [1, 37, 64, 101])  # 1 / 10 / 16 / 26 frames after the convolutions
def test_tower(towers, shape, frames):
    """Two clips, the second padded from two thirds on: output and mask as transformers'."""
    hf, ours = towers[shape]
    feats = features(2, frames, seed=frames)
    padded = np.zeros((2, frames), bool)
    padded[1, frames * 2 // 3 + 1:] = True
    ref, ref_mask = hf_run(hf, feats, padded)
    hidden, mask = ours(feats, padded)
    assert hidden.shape == ref.shape and hidden.dtype == mx.float32
    assert max_diff(hidden, ref) <= TOL
    assert np.array_equal(np.array(mask), ref_mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_tower_on_extracted_clips(towers, shape):
    """Clips of different lengths through the feature extractor, the mask inverted as Gemma3nModel passes it;
    then the embedder's soft path on the output, as get_audio_features."""
    hf, ours = towers[shape]
    clips = [tone(0.9, 16000), noise(5200, 3), noise(2345, 4)]
    batch = Gemma3nAudioFeatureExtractor(feature_size=MELS)(clips)
    padded = ~batch["input_features_mask"]
    ref, ref_mask = hf_run(hf, batch["input_features"], padded)
    hidden, mask = ours(batch["input_features"], padded)
    assert max_diff(hidden, ref) <= TOL and np.array_equal(np.array(mask), ref_mask) and ref_mask[1:].any()
    hf_embed, embed = embedders(hf.config)
    with torch.no_grad():
        ref_embeds = hf_embed(inputs_embeds=torch.tensor(ref)).numpy()
    assert max_diff(embed(inputs_embeds=hidden), ref_embeds) <= TOL


def test_tower_without_mask(towers):
    hf, ours = towers["future"]
    feats = features(1, 50, seed=5)
    ref, _ = hf_run(hf, feats, np.zeros((1, 50), bool))
    hidden, mask = ours(mx.array(feats))
    assert max_diff(hidden, ref) <= TOL and not np.array(mask).any()


def test_small_bounds_act(towers):
    """The tiny towers' logit cap, residual clamp and group-norm eps change transformers' output (so the
    comparisons above cover them)."""
    hf, _ = towers["past"]
    feats, padded = features(1, 60, seed=7), np.zeros((1, 60), bool)
    ref = hf_run(hf, feats, padded)[0]
    for loose in (dict(conf_attention_logit_cap=50.0), dict(gradient_clipping=1e10),
                  dict(sscp_conv_group_norm_eps=1e-6)):
        assert max_diff(hf_run(hf_tower(dict(TOWER, **loose)), feats, padded)[0], ref) > 100 * TOL, loose


def test_mlx_layout_checkpoint(towers):
    """An MLX checkpoint (mlx-vlm's conversions) holds the convolutions transposed: sanitize leaves them."""
    hf, ours = towers["future"]
    mlx_layout = ours.sanitize({k: mx.array(v.numpy()) for k, v in hf.state_dict().items()})
    assert mlx_layout["subsample_conv_projection.conv_0.conv.weight"].shape == (8, 3, 3, 1)
    assert mlx_layout["subsample_conv_projection.conv_1.conv.weight"].shape == (4, 5, 3, 8)
    assert mlx_layout["conformer.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 3, 1)
    again = ours.sanitize(mlx_layout)
    assert all(np.array_equal(np.array(again[k]), np.array(v)) for k, v in mlx_layout.items())


def test_tower_bfloat16(towers):
    """bfloat16 weights run and land no farther from the float32 reference than transformers in bfloat16."""
    hf, _ = towers["past"]
    feats, padded = features(2, 90, seed=11), np.zeros((2, 90), bool)
    padded[1, 53:] = True
    ref = hf_run(hf, feats, padded)[0]
    hf_half = hf_tower(TOWER).to(torch.bfloat16)
    hidden, _ = our_tower(hf_half, mx.bfloat16)(feats, padded)
    assert hidden.dtype == mx.bfloat16
    assert max_diff(hidden.astype(mx.float32), ref) <= 2 * max_diff(hf_run(hf_half, feats, padded)[0], ref)


def test_config_as_transformers():
    """Every field and default as transformers' Gemma3nAudioConfig."""
    theirs = transformers.Gemma3nAudioConfig()
    ours = Gemma3nAudioConfig.from_dict(theirs.to_dict(), "audio_config", require=False)
    for f in fields(Gemma3nAudioConfig):
        if f.name in transformers.Gemma3nAudioConfig.__annotations__:
            value = getattr(theirs, f.name)
            assert getattr(ours, f.name) == (json.loads(json.dumps(value)) if isinstance(value, tuple) else value)
    assert {n for n in transformers.Gemma3nAudioConfig.__annotations__} <= {f.name for f in fields(ours)}
    assert Gemma3nAudioConfig().sscp_freq_dims == [64, 32]  # 32 x 32 channels into input_proj_linear


@pytest.mark.parametrize("bad", [
    dict(hidden_size=30), dict(hidden_size=34), dict(sscp_conv_channel_size=[8]), dict(sscp_conv_channel_size=[8, "4"]),
    dict(sscp_conv_kernel_size=[[3, 3], [3]]), dict(sscp_conv_stride_size=[[2, 0], [2, 2]]),
    dict(conf_attention_chunk_size=0), dict(conf_attention_context_right=-1), dict(conf_reduction_factor=0),
    dict(input_feat_size=0), dict(input_feat_size=1, sscp_conv_kernel_size=[[3, 5], [3, 5]]),
    dict(conf_attention_logit_cap=0.0), dict(conf_num_hidden_layers=5000)])
def test_config_errors(bad):
    with pytest.raises(MlxGemmaError) as e:
        Gemma3nAudioConfig.from_dict(dict(TOWER, **bad), "audio_config", require=False)
    assert "\n" not in str(e.value)


def test_tower_input_errors(towers):
    _, ours = towers["past"]
    for feats, mask in [(np.zeros((1, 10, 128), np.float32), None), (np.zeros((10, MELS), np.float32), None),
                        (np.zeros((1, 0, MELS), np.float32), None), (np.zeros((1, 10, MELS), np.float32),
                                                                     np.zeros((1, 9), bool))]:
        with pytest.raises(MlxGemmaError):
            ours(feats, mask)


# ---- the multimodal embedder ---------------------------------------------------------------------------------


def embedders(config, seed: int = 1):
    hf = randomize(HFEmbedder(config, TEXT), seed)
    ours = Gemma3nMultimodalEmbedder(config, TEXT)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in hf.state_dict().items()], strict=True)
    return hf, ours


@pytest.mark.parametrize("which", ["audio", "vision"])
def test_embedder(which):
    """Soft and hard tokens, for the audio config and a vision-like one (another width, eps and offset)."""
    config = transformers.Gemma3nAudioConfig(**TOWER) if which == "audio" else \
        SimpleNamespace(hidden_size=48, rms_norm_eps=1e-3, vocab_offset=90, vocab_size=10)
    hf, ours = embedders(config)
    soft = np.random.default_rng(2).standard_normal((2, 5, config.hidden_size)).astype(np.float32) * 3
    ids = np.random.default_rng(3).integers(config.vocab_offset, config.vocab_offset + config.vocab_size, (2, 7))
    with torch.no_grad():
        ref_soft = hf(inputs_embeds=torch.tensor(soft)).numpy()
        ref_hard = hf(input_ids=torch.tensor(ids)).numpy()
    assert max_diff(ours(inputs_embeds=soft), ref_soft) <= 1e-5
    assert max_diff(ours(input_ids=ids), ref_hard) <= 1e-5 and ours(input_ids=mx.array(ids)).shape == (2, 7, 24)


def test_embedder_errors():
    _, ours = embedders(transformers.Gemma3nAudioConfig(**TOWER))
    for kwargs in [{}, dict(input_ids=[[100]], inputs_embeds=np.zeros((1, 1, 32), np.float32)),
                   dict(input_ids=[[99]]), dict(input_ids=[[108]]), dict(input_ids=[[100.0]]),
                   dict(inputs_embeds=np.zeros((1, 1, 31), np.float32))]:
        with pytest.raises(MlxGemmaError) as e:
            ours(**kwargs)
        assert "\n" not in str(e.value)


# ---- the feature extractor -------------------------------------------------------------------------------------

CLIPS = {
    "sine": tone(1.0, 16000),
    "noise": noise(37_000),
    "silence": np.zeros(20_000, np.float32),  # every mel at the floor
    "one_frame": noise(600, 1),  # 640 samples padded: one frame
    "odd": noise(16_001, 2),  # one sample past a hop multiple
    "long": noise(490_000, 3) * 0.5,  # cut at 30 s
}
SETTINGS = {
    "gemma3n": {},
    "plain": dict(preemphasis=0.0, fft_overdrive=False, mel_floor=1e-3, input_scale_factor=2.0),
    "every_field": dict(preemphasis=0.9, preemphasis_htk_flavor=False, min_frequency=60.0, max_frequency=7900.0,
                        per_bin_mean=np.linspace(-1, 1, 128).tolist(), per_bin_stddev=np.linspace(0.5, 2, 128).tolist(),
                        padding_value=0.25, padding_side="left", frame_length_ms=25.0, hop_length_ms=12.5),
}


def hf_features(hf_fe, clips, **kwargs):
    out = hf_fe(clips, return_tensors="np", **kwargs)
    return out["input_features"], out["input_features_mask"]


def same_features(out: dict, ref: tuple) -> None:
    assert out["input_features"].dtype == np.float32 and out["input_features_mask"].dtype == bool
    assert out["input_features"].shape == ref[0].shape
    assert not ref[0].size or max_diff(out["input_features"], ref[0]) <= TOL
    assert np.array_equal(out["input_features_mask"], ref[1])


@pytest.mark.parametrize("setting", SETTINGS)
def test_feature_extractor(setting):
    """Built from the same fields, and loaded from the JSON transformers saves (as a checkpoint holds it;
    frame_length_ms / hop_length_ms are not saved, so both sides fall back to 32 / 10 ms): each clip alone,
    then all in one batch."""
    hf_fe = transformers.Gemma3nAudioFeatureExtractor(**SETTINGS[setting])
    saved = json.loads(hf_fe.to_json_string())
    loaded = transformers.Gemma3nAudioFeatureExtractor.from_dict(saved)
    pairs = [(Gemma3nAudioFeatureExtractor(**SETTINGS[setting]), hf_fe),
             (Gemma3nAudioFeatureExtractor.from_dict(saved), loaded)]
    for ours, theirs in pairs:
        for clips in [[c] for c in CLIPS.values()] + [list(CLIPS.values())]:
            same_features(ours(clips), hf_features(theirs, clips))


def test_feature_extractor_short_and_padding_options():
    """Under one frame gives no frames, as transformers; padding to max_length; no truncation; dither with the
    same numpy seed."""
    hf_fe, ours = transformers.Gemma3nAudioFeatureExtractor(), Gemma3nAudioFeatureExtractor()
    short = [noise(200, 5)]
    assert ours(short)["input_features"].shape == (1, 0, 128)
    same_features(ours(short), hf_features(hf_fe, short))
    clips = [noise(3000, 6), noise(1000, 7)]
    for kwargs in (dict(padding="max_length", max_length=4000), dict(truncation=False, max_length=1000)):
        same_features(ours(clips, **kwargs), hf_features(hf_fe, clips, **kwargs))
    dithered = transformers.Gemma3nAudioFeatureExtractor(dither=1e-3)
    np.random.seed(0)
    ref = hf_features(dithered, clips)
    np.random.seed(0)
    same_features(Gemma3nAudioFeatureExtractor(dither=1e-3)(clips), ref)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_feature_extractor_other_rates(rate):
    """An extractor built for another sampling_rate (frames, hop, FFT and mel filters follow it)."""
    hf_fe = transformers.Gemma3nAudioFeatureExtractor(sampling_rate=rate)
    ours = Gemma3nAudioFeatureExtractor.from_dict(json.loads(hf_fe.to_json_string()))
    assert (ours.frame_length, ours.hop_length, ours.fft_length) == (hf_fe.frame_length, hf_fe.hop_length,
                                                                      hf_fe.fft_length)
    clips = [tone(1.3, rate), noise(rate // 3, rate)]
    same_features(ours(clips), hf_features(hf_fe, clips))


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit PCM mono WAV by the standard library."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_files_at_any_rate(tmp_path, rate):
    """Files (a path, bytes) and (samples, rate) pairs go through load_audio to the extractor's 16 kHz, as
    transformers' processors fetch audio at the extractor's rate (its own decoders, torchcodec or soundfile +
    soxr, are not installed here): the features are transformers' on that waveform, beside a plain clip."""
    source = tone(0.77, rate, freq=300.0)
    path = tmp_path / f"a{rate}.wav"
    path.write_bytes(wav_bytes(source, rate))
    waveform = load_audio(path)
    assert len(waveform) == -(-len(source) * 16000 // rate)
    hf_fe, ours = transformers.Gemma3nAudioFeatureExtractor(), Gemma3nAudioFeatureExtractor()
    ref = hf_features(hf_fe, [waveform, CLIPS["noise"]])
    same_features(ours([path, CLIPS["noise"]]), ref)
    same_features(ours([str(path), CLIPS["noise"]]), ref)
    same_features(ours([path.read_bytes(), CLIPS["noise"]]), ref)
    same_features(ours(path), hf_features(hf_fe, [waveform]))
    pair = ours([(source, rate), {"array": source, "sampling_rate": rate}])
    same_features(pair, hf_features(hf_fe, [load_audio((source, rate))] * 2))


@pytest.mark.parametrize("bad", [dict(feature_size=0), dict(sampling_rate=16000.5), dict(padding_side="middle"),
                                 dict(per_bin_mean=[0.0] * 3), dict(fft_overdrive="yes"), dict(min_frequency=9000.0),
                                 dict(frame_length_ms=0.01), dict(return_attention_mask=1), dict(n_fft=512)])
def test_feature_extractor_config_errors(bad):
    with pytest.raises(MlxGemmaError) as e:
        Gemma3nAudioFeatureExtractor(**bad) if "n_fft" in bad else Gemma3nAudioFeatureExtractor.from_dict(bad)
    assert "\n" not in str(e.value)


def test_feature_extractor_input_errors(tmp_path):
    ours = Gemma3nAudioFeatureExtractor()
    for call in (lambda: ours([CLIPS["sine"]], sampling_rate=44100), lambda: ours([]),
                 lambda: ours([np.zeros((2, 2, 2), np.float32)]), lambda: ours(tmp_path / "missing.wav"),
                 lambda: ours([CLIPS["sine"], CLIPS["noise"]], padding=False)):
        with pytest.raises(MlxGemmaError) as e:
            call()
        assert "\n" not in str(e.value)

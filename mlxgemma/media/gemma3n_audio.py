"""Audio inputs for Gemma 3n's audio tower, without torch: `Gemma3nAudioFeatureExtractor` turns clips into the
log-mel frames and masks the tower takes, as transformers' Gemma3nAudioFeatureExtractor does (the same numpy
operations in the same dtypes, so the same bits). Files, bytes and (samples, rate) pairs are decoded and
resampled to the extractor's rate by media/audio.py's `load_audio` (PyAV), as transformers' processors fetch
audio at the feature extractor's rate; plain arrays must already be at that rate, as transformers assumes.

Against Gemma 4's extractor (media/audio.py): no half-frame of zeros before the first frame, 32 ms frames
(512 samples, FFT 1024 with fft_overdrive), preemphasis 0.97, a periodic Hann window computed in float32,
mel filters from FFT bin frequencies k * rate / fft_length (float32) over 125 - 7600 Hz, log(max(mel, floor))
rather than log(mel + floor), a frame valid iff its FIRST sample is real audio, and padded frames left as
computed (not zeroed)."""

import math
import os
from typing import Optional, Union

import numpy as np

from ..errors import MlxGemmaError
from .audio import SAMPLING_RATE, check_feature_fields, load_audio, pad_waveforms

# transformers' Gemma3nAudioFeatureExtractor.__init__ defaults (the released Gemma 3n settings). Saved
# frame_length / hop_length / fft_length are derived, and transformers recomputes them on loading.
FEATURE_DEFAULTS = dict(feature_size=128, sampling_rate=SAMPLING_RATE, padding_value=0.0, padding_side="right",
                        frame_length_ms=32.0, hop_length_ms=10.0, min_frequency=125.0, max_frequency=7600.0,
                        preemphasis=0.97, preemphasis_htk_flavor=True, fft_overdrive=True, dither=0.0,
                        input_scale_factor=1.0, mel_floor=1e-5, per_bin_mean=None, per_bin_stddev=None)


class Gemma3nAudioFeatureExtractor:
    """Log-mel frames of 16 kHz clips: waveforms cut to max_length samples and padded to the longest, rounded
    up to a multiple of 128; frame_length + 1 samples per frame every hop (the extra one for the HTK
    preemphasis); periodic Hann window, |rfft| (FFT to the next power of two, doubled by fft_overdrive),
    triangular HTK mel filters (unnormalised), log(max(mel, mel_floor)), optional per-bin mean / stddev."""

    def __init__(self, return_attention_mask: bool = True, **fields):
        unknown = set(fields) - set(FEATURE_DEFAULTS)
        if unknown:
            raise MlxGemmaError(f"Gemma3nAudioFeatureExtractor has no field(s) {', '.join(sorted(unknown))}")
        if not isinstance(return_attention_mask, bool):
            raise MlxGemmaError(f"feature extractor: return_attention_mask is {return_attention_mask!r}, expected "
                                "true or false")
        config = dict(FEATURE_DEFAULTS, **fields)
        check_feature_fields(config)
        self.__dict__.update(config)
        self.return_attention_mask = return_attention_mask  # (the mask is always returned: the tower needs it)
        rate = self.sampling_rate
        self.frame_length = int(round(rate * self.frame_length_ms / 1000.0))
        self.hop_length = int(round(rate * self.hop_length_ms / 1000.0))
        if self.frame_length < 1 or self.hop_length < 1:
            raise MlxGemmaError(f"feature extractor: frame_length_ms {self.frame_length_ms} / hop_length_ms "
                                f"{self.hop_length_ms} are under one sample at {rate} Hz")
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        # Periodic Hann in float32 arithmetic, as transformers computes it (np.hanning's float64 differs by ulps).
        hann_arange = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * hann_arange / self.frame_length))).astype(np.float32)
        self.mel_filters = create_fb_matrix(self.fft_length // 2 + 1, self.min_frequency, self.max_frequency,
                                            self.feature_size, rate, self.fft_length)
        self.mel_floor = np.array(self.mel_floor, dtype=np.float64)
        for name in ("per_bin_mean", "per_bin_stddev"):
            if getattr(self, name) is not None:
                setattr(self, name, np.array(getattr(self, name)).reshape(1, 1, self.feature_size))

    @classmethod
    def from_dict(cls, config: dict) -> "Gemma3nAudioFeatureExtractor":
        """From preprocessor_config.json, or a processor config's feature_extractor block. Keys transformers'
        constructor does not read are ignored as it ignores them (frame_length, hop_length, fft_length,
        feature_extractor_type, processor_class, the image processor's fields, ...)."""
        if not isinstance(config, dict):
            raise MlxGemmaError(f"a feature extractor config is a JSON object, not {type(config).__name__}")
        block = config.get("feature_extractor", config)
        if not isinstance(block, dict):
            raise MlxGemmaError("processor_config.json: feature_extractor must be an object")
        fields = {k: v for k, v in block.items() if k in FEATURE_DEFAULTS and v is not None or
                  k in ("per_bin_mean", "per_bin_stddev")}
        if block.get("return_attention_mask") is not None:
            fields["return_attention_mask"] = block["return_attention_mask"]
        return cls(**fields)

    def __call__(self, raw_speech, sampling_rate: Optional[int] = None, padding: Union[bool, str] = "longest",
                 max_length: Optional[int] = 480_000, truncation: bool = True,
                 pad_to_multiple_of: Optional[int] = 128) -> dict:
        """A clip or a list of clips -> {"input_features": (N, T, feature_size) float32, "input_features_mask":
        (N, T) bool, True = valid}. A clip is a 1-D waveform at this extractor's rate (an array or a list of
        floats), or what load_audio reads: a file path, a file's bytes, a (samples, rate) pair or a
        {"array", "sampling_rate"} dict, decoded and resampled to this rate. Arguments as transformers'
        (padding "longest" or "max_length"; False only for clips of one length). T is 0 when the padded
        clips are shorter than one frame (frame_length + 1 samples), as transformers gives it."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise MlxGemmaError(f"audio at {sampling_rate} Hz given to a feature extractor for {self.sampling_rate}"
                                " Hz: resample it first (load_audio), or pass a file or a (samples, rate) pair")
        clips = [raw_speech] if is_source(raw_speech) else raw_speech
        if isinstance(clips, (list, tuple)) and any(is_source(c) for c in clips):
            clips = [load_audio(c, self.sampling_rate) if is_source(c) else c for c in clips]
        waves, masks = pad_waveforms(clips, padding, max_length, truncation, pad_to_multiple_of, self.padding_value,
                                     self.padding_side)
        features, frame_masks = zip(*(self.spectrogram(w, m) for w, m in zip(waves, masks)))
        return {"input_features": np.stack([f.astype(np.float32) for f in features]),
                "input_features_mask": np.stack(frame_masks)}

    def spectrogram(self, waveform: np.ndarray, attention_mask: np.ndarray):
        """One padded waveform and its sample mask -> (frames, feature_size) log-mel and (frames,) bool mask."""
        waveform = waveform[None]  # (1, n): the shape transformers draws its dither for
        if self.dither > 0.0:
            waveform = waveform + self.dither * np.random.randn(*waveform.shape).astype(waveform.dtype)
        if self.input_scale_factor != 1.0:
            waveform = waveform * self.input_scale_factor
        size = self.frame_length + 1
        count = max((waveform.shape[1] - size) // self.hop_length + 1, 0)
        frames = np.lib.stride_tricks.as_strided(waveform, shape=(1, count, size),
                                                 strides=(waveform.strides[0], waveform.strides[1] * self.hop_length,
                                                          waveform.strides[1]))
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                frames = np.concatenate([frames[..., :1] * (1.0 - self.preemphasis),
                                         frames[..., 1:-1] - self.preemphasis * frames[..., :-2]], axis=-1)
            else:
                frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.maximum(np.matmul(magnitude, self.mel_filters), self.mel_floor))
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        # A frame's mask is its first sample's: frames that end in padding still count as valid.
        return log_mel[0], attention_mask[:: self.hop_length].astype(bool)[:count]


def is_source(clip) -> bool:
    """Whether a clip is something load_audio decodes (a path, a file's bytes, a (samples, rate) pair, a
    {"array", "sampling_rate"} dict) rather than samples already at the extractor's rate."""
    return (isinstance(clip, (str, os.PathLike, bytes, bytearray, memoryview)) or
            isinstance(clip, dict) and "array" in clip or
            isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[0], np.ndarray) and
            isinstance(clip[1], (int, np.integer)) and not isinstance(clip[1], bool))


def create_fb_matrix(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                     fft_length: int) -> np.ndarray:
    """(n_freqs, n_mels) triangular HTK-mel filters, unnormalised, float64: transformers' create_fb_matrix
    with norm=None (its FFT bin frequencies are k * rate / fft_length in float32)."""
    all_freqs = np.arange(n_freqs, dtype=np.float32) * (sample_rate / fft_length)
    m_min = 2595.0 * math.log10(1.0 + (f_min / 700.0))
    m_max = 2595.0 * math.log10(1.0 + (f_max / 700.0))
    f_pts = 700.0 * (10 ** (np.linspace(m_min, m_max, n_mels + 2) / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = np.expand_dims(f_pts, 0) - np.expand_dims(all_freqs, 1)
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(down_slopes, up_slopes))

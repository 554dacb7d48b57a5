"""Audio inputs for Gemma 4's audio tower, without torch: `load_audio` decodes a file (WAV, FLAC, MP3, M4A/AAC,
OGG, ... whatever FFmpeg reads, through PyAV) to mono float32 at 16 kHz, and `Gemma4AudioFeatureExtractor` turns
waveforms into the log-mel frames and masks the tower takes, as transformers' Gemma4AudioFeatureExtractor does,
with the soft-token count that Gemma4Processor gives each clip.

Decoding: channels are averaged to mono (as transformers' soundfile and torchaudio backends and librosa.load
do; FFmpeg's own stereo-to-mono matrix, which torchcodec would apply, sums at 1/sqrt(2) each, 3 dB louder).
Resampling: FFmpeg's libswresample with its default filter, through PyAV's AudioResampler (torchcodec,
transformers' default decoder, resamples with libswresample too; its soundfile path uses soxr), the length
then padded or cut to ceil(n * rate / source rate) as transformers' soundfile path does. The feature
extractor itself takes only its own rate (16 kHz): users' 44.1 / 48 kHz files must go through load_audio."""

import io
import math
import os
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import MlxGemmaError

SAMPLING_RATE = 16_000
_RESAMPLE_CHUNK = 1 << 16  # samples per frame fed to the resampler (it keeps its state between frames)


def load_audio(source, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` from: a file path, the bytes of a file, a numpy array of
    samples already at `sampling_rate`, or samples at another rate as an (array, rate) pair or a
    {"array", "sampling_rate"} dict (HF datasets' form). Arrays are 1-D, or 2-D with channels on the
    shorter axis; integer arrays are PCM (int16 / int32 full scale)."""
    if not (isinstance(sampling_rate, int) and not isinstance(sampling_rate, bool) and sampling_rate > 0):
        raise MlxGemmaError(f"sampling_rate is {sampling_rate!r}, expected a positive integer")
    if isinstance(source, dict) and "array" in source:
        source = (source["array"], source.get("sampling_rate"))
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        array, rate = source
        if not (isinstance(rate, (int, np.integer)) and not isinstance(rate, bool) and rate > 0):
            raise MlxGemmaError(f"an audio array's sampling rate is {rate!r}, expected a positive integer")
        return _finish(_mono(_as_float(array)), int(rate), sampling_rate, "the audio array")
    if isinstance(source, np.ndarray):
        return _finish(_mono(_as_float(source)), sampling_rate, sampling_rate, "the audio array")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise MlxGemmaError("the audio bytes are empty")
        channels, rate = _decode(io.BytesIO(bytes(source)), "the audio bytes")
        return _finish(channels.mean(axis=0), rate, sampling_rate, "the audio bytes")
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if not os.path.exists(path):
            raise MlxGemmaError(f"audio file {path!r} not found")
        if not os.path.isfile(path):
            raise MlxGemmaError(f"audio {path!r} is not a regular file")
        channels, rate = _decode(path, f"audio file {path!r}")
        return _finish(channels.mean(axis=0), rate, sampling_rate, f"audio file {path!r}")
    raise MlxGemmaError(f"audio is a file path, bytes or a numpy array, not {type(source).__name__}")


def _decode(file, what: str):
    """(channels, samples) float32 and the rate of the first audio stream."""
    import av  # (PyAV: imported here, so that importing mlxgemma stays light)

    try:
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise MlxGemmaError(f"{what} has no audio stream")
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")  # planar float32; layout and rate as decoded
            chunks, rate = [], None
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                chunks += [f.to_ndarray() for f in to_float.resample(frame)]
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
    except MlxGemmaError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:  # (a layout change mid-stream is a ValueError)
        raise MlxGemmaError(f"{what} could not be decoded as audio: {e}") from None
    if not chunks or not sum(c.shape[1] for c in chunks):
        raise MlxGemmaError(f"{what} holds no audio samples")
    return np.concatenate(chunks, axis=1), rate


def _as_float(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype in (np.int16, np.int32):
        return (array / float(2 ** (8 * array.dtype.itemsize - 1))).astype(np.float32)
    raise MlxGemmaError(f"an audio array holds {array.dtype}; expected floats, int16 or int32 PCM")


def _mono(array: np.ndarray) -> np.ndarray:
    if array.ndim == 1:
        return array
    if array.ndim == 2:
        return array.mean(axis=int(np.argmin(array.shape)), dtype=np.float32)  # channels on the shorter axis
    raise MlxGemmaError(f"an audio array has shape {array.shape}; expected (samples,) or (channels, samples)")


def _finish(samples: np.ndarray, rate: int, sampling_rate: int, what: str) -> np.ndarray:
    if not samples.size:
        raise MlxGemmaError(f"{what} holds no audio samples")
    if not np.isfinite(samples).all():
        raise MlxGemmaError(f"{what} holds non-finite samples (NaN or infinity)")
    if rate != sampling_rate:
        samples = resample(samples, rate, sampling_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples from `rate` to `sampling_rate` by libswresample (default filter), time-aligned,
    padded or cut to ceil(n * sampling_rate / rate) samples."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
    out = []
    for start in range(0, len(samples), _RESAMPLE_CHUNK):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples[None, start:start + _RESAMPLE_CHUNK], dtype=np.float32),
            format="flt", layout="mono")
        frame.sample_rate = rate
        out += [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    n = math.ceil(len(samples) * sampling_rate / rate)
    y = np.concatenate(out) if out else np.zeros(0, np.float32)
    return np.pad(y, (0, max(0, n - len(y))))[:n]


# transformers' Gemma4AudioFeatureExtractor.__init__ defaults, which are also the released Gemma 4 settings. The
# saved frame_length / hop_length / fft_length (samples) are derived, and transformers ignores them on loading:
# only the *_ms fields and fft_overdrive set them.
FEATURE_DEFAULTS = dict(feature_size=128, sampling_rate=SAMPLING_RATE, padding_value=0.0, padding_side="right",
                        frame_length_ms=20.0, hop_length_ms=10.0, min_frequency=0.0, max_frequency=8000.0,
                        preemphasis=0.0, preemphasis_htk_flavor=True, fft_overdrive=False, dither=0.0,
                        input_scale_factor=1.0, mel_floor=1e-3, per_bin_mean=None, per_bin_stddev=None)
AUDIO_SEQ_LENGTH = 750  # Gemma4Processor's cap on a clip's soft tokens (processor_config.json audio_seq_length)


class Gemma4AudioFeatureExtractor:
    """Log-mel frames as transformers' Gemma4AudioFeatureExtractor computes them (the same numpy operations,
    in the same dtypes): waveforms cut to max_length samples and right-padded to the longest, rounded up to
    a multiple of 128; frame_length + 1 samples per frame (20 ms + 1) every hop (10 ms) after frame_length // 2
    zeros on the left; periodic Hann window, |rfft| to the next power of two (doubled if fft_overdrive), HTK
    mel filters, log(mel + mel_floor), optional per-bin mean / stddev. A frame is valid iff its last sample is
    real audio; invalid frames are zeroed."""

    def __init__(self, **fields):
        unknown = set(fields) - set(FEATURE_DEFAULTS) - {"audio_seq_length"}
        if unknown:
            raise MlxGemmaError(f"Gemma4AudioFeatureExtractor has no field(s) {', '.join(sorted(unknown))}")
        config = dict(FEATURE_DEFAULTS, **{k: v for k, v in fields.items() if k in FEATURE_DEFAULTS})
        check_feature_fields(config)
        self.__dict__.update(config)
        self.audio_seq_length = fields.get("audio_seq_length", AUDIO_SEQ_LENGTH)
        if not (isinstance(self.audio_seq_length, int) and self.audio_seq_length > 0):
            raise MlxGemmaError(f"audio_seq_length is {self.audio_seq_length!r}, expected a positive integer")
        rate = self.sampling_rate
        self.frame_length = int(round(rate * self.frame_length_ms / 1000.0))
        self.hop_length = int(round(rate * self.hop_length_ms / 1000.0))
        if self.frame_length < 1 or self.hop_length < 1:
            raise MlxGemmaError(f"feature extractor: frame_length_ms {self.frame_length_ms} / hop_length_ms "
                                f"{self.hop_length_ms} are under one sample at {rate} Hz")
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        self.window = (np.hanning(self.frame_length + 1)[:-1]).astype(np.float32)  # periodic Hann
        self.mel_filters = mel_filter_bank(self.fft_length // 2 + 1, self.feature_size, self.min_frequency,
                                           self.max_frequency, rate)
        self.mel_floor = np.array(self.mel_floor, dtype=np.float64)
        for name in ("per_bin_mean", "per_bin_stddev"):
            if getattr(self, name) is not None:
                setattr(self, name, np.array(getattr(self, name), dtype=np.float64).reshape(1, self.feature_size))

    @classmethod
    def from_dict(cls, config: dict) -> "Gemma4AudioFeatureExtractor":
        """From processor_config.json (its feature_extractor block, and audio_seq_length) or from the block
        itself (preprocessor_config.json). Keys that transformers' constructor does not read are ignored as
        it ignores them (frame_length, hop_length, fft_length, feature_extractor_type, mlx-vlm's
        num_mel_filters, ...). A processor config without the block gets the defaults, as a processor built
        without one does: they are the settings of every released Gemma 4 checkpoint."""
        if not isinstance(config, dict):
            raise MlxGemmaError(f"a feature extractor config is a JSON object, not {type(config).__name__}")
        block = config.get("feature_extractor", config)
        if not isinstance(block, dict):
            raise MlxGemmaError("processor_config.json: feature_extractor must be an object")
        fields = {k: v for k, v in block.items() if k in FEATURE_DEFAULTS and v is not None or
                  k in ("per_bin_mean", "per_bin_stddev")}
        if "audio_seq_length" in config:
            fields["audio_seq_length"] = config["audio_seq_length"]
        return cls(**fields)

    def __call__(self, raw_speech, sampling_rate: Optional[int] = None, padding: Union[bool, str] = "longest",
                 max_length: Optional[int] = 480_000, truncation: bool = True,
                 pad_to_multiple_of: Optional[int] = 128) -> dict:
        """A waveform or a list of them (1-D, at this extractor's rate) -> {"input_features": (N, T, feature_size)
        float32, "input_features_mask": (N, T) bool}. Arguments as transformers' __call__ (padding "longest"
        or "max_length"; False only for clips of one length)."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise MlxGemmaError(f"audio at {sampling_rate} Hz given to a feature extractor for {self.sampling_rate}"
                                " Hz: resample it first (load_audio)")
        waves, masks = pad_waveforms(raw_speech, padding, max_length, truncation, pad_to_multiple_of,
                                     self.padding_value, self.padding_side)
        features, frame_masks = [], []
        for wave, sample_mask in zip(waves, masks):
            spectrogram, mask = self.spectrogram(wave, sample_mask)
            features.append(spectrogram.astype(np.float32) * mask[:, None])
            frame_masks.append(mask)
        return {"input_features": np.stack(features), "input_features_mask": np.stack(frame_masks)}

    def spectrogram(self, waveform: np.ndarray, attention_mask: np.ndarray):
        """One padded waveform and its sample mask -> (frames, feature_size) log-mel and (frames,) bool mask."""
        if self.dither > 0.0:
            waveform = waveform + self.dither * np.random.randn(*waveform.shape).astype(waveform.dtype)
        if self.input_scale_factor != 1.0:
            waveform = waveform * self.input_scale_factor
        # Semicausal padding: frame_length // 2 zeros first, so that the first frame is centred on t = 0.
        pad_left = self.frame_length // 2
        waveform = np.pad(waveform, (pad_left, 0))
        attention_mask = np.pad(attention_mask, (pad_left, 0))
        size = self.frame_length + 1  # one extra sample per frame, for the preemphasis
        count = max((len(waveform) - size) // self.hop_length + 1, 0)
        frames = np.lib.stride_tricks.as_strided(waveform, shape=(count, size),
                                                 strides=(waveform.strides[0] * self.hop_length, waveform.strides[0]))
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                frames = np.concatenate([frames[..., :1] * (1.0 - self.preemphasis),
                                         frames[..., 1:-1] - self.preemphasis * frames[..., :-2]], axis=-1)
            else:
                frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.matmul(magnitude, self.mel_filters) + self.mel_floor)
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        mask = attention_mask[np.arange(count) * self.hop_length + size - 1].astype(bool)
        return log_mel, mask

    def num_soft_tokens(self, mask_or_num_samples) -> Union[int, List[int]]:
        """The audio soft tokens Gemma4Processor gives a clip, which is the count of valid frames the tower's
        two stride-2 convolutions leave: from a clip's input_features_mask (or a batch of them: a list) as
        replace_audio_token counts them, or from its number of samples (16 kHz) as _compute_audio_num_tokens
        does, capped at audio_seq_length (the 30 s max_length gives exactly 750)."""
        if isinstance(mask_or_num_samples, (int, np.integer)) and not isinstance(mask_or_num_samples, bool):
            n = int(mask_or_num_samples)
            frames = (n + self.frame_length // 2 - (self.frame_length + 1)) // self.hop_length + 1
            if frames <= 0:
                return 0
            return min((((frames - 1) // 2 + 1) - 1) // 2 + 1, self.audio_seq_length)
        mask = np.asarray(mask_or_num_samples)
        if mask.ndim == 2:
            return [self.num_soft_tokens(m) for m in mask]
        if mask.ndim != 1:
            raise MlxGemmaError(f"a feature mask has shape {mask.shape}; expected (frames,) or (clips, frames)")
        for _ in range(2):  # each convolution keeps frames 0, 2, 4, ...: ceil(t / 2) of them
            mask = mask[::2][: (len(mask) - 1) // 2 + 1]
        return int(mask.sum())


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float,
                    sampling_rate: int) -> np.ndarray:
    """(bins, filters) triangular HTK-mel filters, unnormalised, in float64: transformers' mel_filter_bank with
    norm=None, mel_scale="htk" (note its FFT bin frequencies run to sampling_rate // 2, an integer)."""
    mel_min, mel_max = (2595.0 * np.log10(1.0 + f / 700.0) for f in (min_frequency, max_frequency))
    filter_freqs = 700.0 * (np.power(10, np.linspace(mel_min, mel_max, num_mel_filters + 2) / 2595.0) - 1.0)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


def pad_waveforms(raw_speech, padding, max_length: Optional[int], truncation: bool,
                  pad_to_multiple_of: Optional[int], padding_value: float = 0.0, padding_side: str = "right"):
    """A waveform or a list of them (1-D) -> (waveforms float32, sample masks int32), each cut to max_length
    (rounded up to pad_to_multiple_of) and padded to one length, as transformers' SequenceFeatureExtractor.pad
    does for the Gemma audio extractors: padding "longest" (True) or "max_length", or False for clips of one
    length."""
    single = (isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1 or isinstance(raw_speech, Sequence)
              and len(raw_speech) and not isinstance(raw_speech[0], (np.ndarray, Sequence)))
    waves = [raw_speech] if single else list(raw_speech)
    if not waves:
        raise MlxGemmaError("no audio clips given to the feature extractor")
    waves = [_waveform(w) for w in waves]
    if truncation:
        if max_length is None:
            raise MlxGemmaError("truncation needs max_length")
        limit = _round_up(max_length, pad_to_multiple_of)
        waves = [w[:limit] for w in waves]
    if padding in (True, "longest"):
        target = _round_up(max(len(w) for w in waves), pad_to_multiple_of)
    elif padding == "max_length" and max_length is not None:
        target = max(_round_up(max_length, pad_to_multiple_of), max(len(w) for w in waves))
    elif padding in (False, "do_not_pad") and len({len(w) for w in waves}) == 1:
        target = len(waves[0])
    else:
        raise MlxGemmaError(f"padding {padding!r} is not supported here (clips are batched: 'longest', or "
                            "'max_length' with max_length)")
    padded, masks = [], []
    for w in waves:
        pad = (0, target - len(w)) if padding_side == "right" else (target - len(w), 0)
        padded.append(np.pad(w, pad, constant_values=padding_value))
        masks.append(np.pad(np.ones(len(w), np.int32), pad))
    return padded, masks


def _waveform(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 1 or w.dtype.kind not in "fiu":
        raise MlxGemmaError(f"a waveform is a 1-D array of samples, got shape {w.shape} of {w.dtype}")
    return w.astype(np.float32)  # (transformers also takes float64 input to float32 before its spectrogram)


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def check_feature_fields(config: dict) -> None:
    """Types and ranges of a Gemma audio feature extractor's fields (FEATURE_DEFAULTS' names; Gemma 3n's take
    the same), each a one-line error."""
    for name in ("feature_size", "sampling_rate"):
        value = config[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise MlxGemmaError(f"feature extractor: {name} is {value!r}, expected a positive integer")
    for name in ("padding_value", "frame_length_ms", "hop_length_ms", "min_frequency", "max_frequency",
                 "preemphasis", "dither", "input_scale_factor", "mel_floor"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MlxGemmaError(f"feature extractor: {name} is {value!r}, expected a finite number")
    for name in ("preemphasis_htk_flavor", "fft_overdrive"):
        if not isinstance(config[name], bool):
            raise MlxGemmaError(f"feature extractor: {name} is {config[name]!r}, expected true or false")
    if config["padding_side"] not in ("right", "left"):
        raise MlxGemmaError(f"feature extractor: padding_side is {config['padding_side']!r}, expected 'right' or "
                            "'left'")
    if not 0 <= config["min_frequency"] <= config["max_frequency"]:
        raise MlxGemmaError(f"feature extractor: min_frequency {config['min_frequency']} / max_frequency "
                            f"{config['max_frequency']} do not make a band")
    for name in ("per_bin_mean", "per_bin_stddev"):
        value = config[name]
        if value is None:
            continue
        flat = np.asarray(value, dtype=object).ravel()
        if flat.size != config["feature_size"] or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in flat):
            raise MlxGemmaError(f"feature extractor: {name} must be {config['feature_size']} numbers (feature_size)")

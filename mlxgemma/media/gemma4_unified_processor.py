"""Text with images, audio and video for Gemma 4 unified (model_type gemma4_unified), as transformers'
Gemma4UnifiedProcessor lays it out, without torch. The text layout is Gemma 4's (gemma4_processor.py); what
differs is what an image (a video's frame too: gemma4_video.py) and a clip become:

  image: as transformers' Gemma4UnifiedImageProcessor, which has only a torchvision backend. Converted to RGB
    (arrays as torchvision converts them), resized to Gemma 4's aspect-preserving size (gemma4_images.py) by
    torchvision's resize, which for uint8 images on the CPU is torch's own antialiased bicubic in integer
    arithmetic (not Pillow's: its weights are rounded to another precision, so some pixels differ by one);
    rescaled in float32 (both as torchvision_backend.py restates them); cut into (pooling_kernel_size *
    patch_size)-pixel patches (48 px), row by row, each flattened as (row, column, channel), at positions
    (x, y); padded to max_soft_tokens patches with zeros at (-1, -1). One soft token per patch.
  audio: no spectrogram. A clip is cut into frames of audio_samples_per_token raw samples (640: 40 ms at
    16 kHz), the last one zero-padded; one soft token per frame, no cap."""

import math

import numpy as np
from PIL import Image

from ..errors import MlxGemmaError
from .audio import SAMPLING_RATE
from .gemma4_images import Gemma4ImageProcessor, get_aspect_ratio_preserving_size
from .gemma4_processor import Gemma4Processor
from .torchvision_backend import rescale_and_normalize, resize_bicubic, torchvision_rgb


class Gemma4UnifiedImageProcessor(Gemma4ImageProcessor):
    """processor(images, max_soft_tokens=None) -> {"pixel_values" (images, max_soft_tokens, 3 * (pooling_kernel_size
    * patch_size)**2) float32, "image_position_ids" (images, max_soft_tokens, 2) int64 of (x, y) with (-1, -1)
    for padding, "num_soft_tokens_per_image" (images,) int64}. Options and inputs as Gemma4ImageProcessor's."""

    array_to_rgb = staticmethod(torchvision_rgb)
    resamples = (Image.Resampling.BICUBIC,)  # (resize_bicubic: torchvision's other modes are not restated here)

    def one(self, image, index: int, max_patches: int) -> tuple:
        x = np.asarray(self.rgb(image, index))
        height, width = x.shape[:2]
        if not width or not height:
            raise MlxGemmaError(f"image {index} is empty ({width}x{height} pixels)")
        side = self.patch_size * self.pooling_kernel_size
        budget = max_patches // self.pooling_kernel_size**2
        if self.do_resize:
            size = get_aspect_ratio_preserving_size(height, width, self.patch_size, max_patches,
                                                    self.pooling_kernel_size)
            if size != (height, width):
                x = resize_bicubic(x, *size)
                height, width = size
        elif height % side or width % side or (height // side) * (width // side) > budget:
            raise MlxGemmaError(f"image {index} is {width}x{height}; without do_resize its sides must be multiples "
                                f"of {side} and it may hold at most {budget} patches of {side} pixels")
        x = rescale_and_normalize(x, self.rescale_factor, self.mean, self.std)
        rows, cols = height // side, width // side
        patches = x.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        grid = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int64)
        pad = budget - len(patches)
        return np.pad(patches, ((0, pad), (0, 0))), np.pad(grid, ((0, pad), (0, 0)), constant_values=-1), len(patches)


class Gemma4UnifiedAudioFeatureExtractor:
    """extractor(waveforms) -> {"input_features" (clips, frames, audio_samples_per_token) float32: each clip's raw
    samples, zero-padded to whole frames, the clips padded to the longest with padding_value; "input_features_mask"
    (clips, frames) bool}, as transformers' Gemma4UnifiedAudioFeatureExtractor. Waveforms are 1-D, at
    sampling_rate (load_audio gives them so)."""

    def __init__(self, feature_size: int = 640, sampling_rate: int = SAMPLING_RATE, padding_value: float = 0.0,
                 audio_samples_per_token: int = 640, padding_side: str = "right"):
        for name, value in (("feature_size", feature_size), ("sampling_rate", sampling_rate),
                            ("audio_samples_per_token", audio_samples_per_token)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise MlxGemmaError(f"feature extractor: {name} is {value!r}, expected a positive integer")
        if isinstance(padding_value, bool) or not isinstance(padding_value, (int, float)) \
                or not math.isfinite(padding_value):
            raise MlxGemmaError(f"feature extractor: padding_value is {padding_value!r}, expected a finite number")
        if padding_side not in ("right", "left"):
            raise MlxGemmaError(f"feature extractor: padding_side is {padding_side!r}, expected 'right' or 'left'")
        self.feature_size, self.sampling_rate, self.padding_value = feature_size, sampling_rate, padding_value
        self.audio_samples_per_token, self.padding_side = audio_samples_per_token, padding_side

    @classmethod
    def from_dict(cls, config: dict) -> "Gemma4UnifiedAudioFeatureExtractor":
        """From processor_config.json's feature_extractor block (or preprocessor_config.json); other keys
        (feature_extractor_type, audio_seq_length, ...) are not read, as transformers' constructor reads none."""
        if not isinstance(config, dict):
            raise MlxGemmaError(f"a feature extractor config is a JSON object, not {type(config).__name__}")
        block = config.get("feature_extractor", config)
        if not isinstance(block, dict):
            raise MlxGemmaError("processor_config.json: feature_extractor must be an object")
        names = ("feature_size", "sampling_rate", "padding_value", "audio_samples_per_token", "padding_side")
        return cls(**{k: block[k] for k in names if block.get(k) is not None})

    def __call__(self, raw_speech, sampling_rate=None) -> dict:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise MlxGemmaError(f"audio at {sampling_rate} Hz given to a feature extractor for {self.sampling_rate}"
                                " Hz: resample it first (load_audio)")
        waves = [raw_speech] if isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1 else list(raw_speech)
        if not waves:
            raise MlxGemmaError("no audio clips given to the feature extractor")
        n = self.audio_samples_per_token
        frames = []
        for w in waves:
            w = np.asarray(w)
            if w.ndim != 1 or w.dtype.kind not in "fiu" or not len(w):
                raise MlxGemmaError(f"a waveform is a non-empty 1-D array of samples, got shape {w.shape} of {w.dtype}")
            frames.append(np.pad(w, (0, -len(w) % n)).reshape(-1, n).astype(np.float32))
        longest = max(len(f) for f in frames)
        features, masks = [], []
        for f in frames:
            pad = (0, longest - len(f)) if self.padding_side == "right" else (longest - len(f), 0)
            features.append(np.pad(f, (pad, (0, 0)), constant_values=self.padding_value).astype(np.float32))
            masks.append(np.pad(np.ones(len(f), dtype=bool), pad))
        return {"input_features": np.stack(features), "input_features_mask": np.stack(masks)}

    def num_soft_tokens(self, mask) -> int:
        """A clip's soft tokens: one per valid frame (transformers' replace_audio_token counts the mask)."""
        return int(np.asarray(mask).sum())


class Gemma4UnifiedProcessor(Gemma4Processor):
    """Gemma 4's processor (prepare, __call__, marks, token_types: gemma4_processor.py) with the unified image
    processor and feature extractor; loaded by from_pretrained(path, tokenizer, config) from the same files.
    Video as Gemma 4's: transformers' Gemma4UnifiedProcessor has a video processor (Gemma4UnifiedVideoProcessor:
    Gemma 4's frame sampling, budget and options, each frame patchified as this image processor does) and
    Gemma 4's replace_video_token; its model embeds the frames with the vision embedder."""

    image_processor_class, feature_extractor_class = Gemma4UnifiedImageProcessor, Gemma4UnifiedAudioFeatureExtractor
    frame_processor_class = Gemma4UnifiedImageProcessor  # (its video processor patchifies frames as images)

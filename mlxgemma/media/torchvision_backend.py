"""What transformers' torchvision backend (TorchvisionBackend, the default of its Gemma 4 image and video
processors) does to pixels, restated in numpy for the cases Gemma 4 meets: uint8 HWC images on the CPU.

  resize_bicubic: torchvision's resize with bicubic and antialias, which for a uint8 image on the CPU is torch's
    own antialiased bicubic in integer arithmetic (not Pillow's: its weights are rounded to another precision,
    so some pixels differ).
  torchvision_rgb: arrays to RGB as the backend converts them (its own alpha blend, in float32).
  rescale_and_normalize: the backend's fused rescale and normalisation, in float32.

Used by the 12B Unified's image processor (gemma4_unified_processor.py) and Gemma 4's video frames
(gemma4_video.py)."""

import math
from typing import Optional

import numpy as np

from .gemma4_images import rgb_array


def _cubic(x: np.ndarray) -> np.ndarray:
    """torch's antialiasing bicubic filter (Keys, a = -0.5), in float64, its expression order kept."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_weights(size: int, new_size: int) -> tuple:
    """One axis of torch's uint8 antialiased bicubic resize (align_corners=False): each output's first input
    index, its int16 weights (outputs, taps) and their precision in bits. The weights are computed in float64,
    normalised per output, then rounded to the most bits that keep the largest weight within int16."""
    scale = size / new_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(new_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # (C casts truncate toward zero)
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), size) - first, 0, taps)
    j = np.arange(taps)
    w = np.where(j < count[:, None], _cubic((j + first[:, None] - center[:, None] + 0.5) * min(1.0, 1.0 / scale)),
                 0.0)
    total = w[:, 0].copy()
    for k in range(1, taps):  # summed in order, as torch does (numpy's sum would pair them)
        total += w[:, k]
    normed = total != 0.0
    w = np.where(normed[:, None], w / np.where(normed, total, 1.0)[:, None], w)
    largest = w[normed].max() if normed.any() else 0.0
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    return first, np.where(w < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32), precision


def _resize_axis(x: np.ndarray, new_size: int, axis: int) -> np.ndarray:
    size = x.shape[axis]
    if size == new_size:  # (torch skips an axis that keeps its size)
        return x
    first, weights, precision = resize_weights(size, new_size)
    x = np.moveaxis(x, axis, 0)
    index = np.minimum(first[:, None] + np.arange(weights.shape[1]), size - 1)  # (past the end: weight 0)
    acc = np.full((new_size,) + x.shape[1:], 1 << (precision - 1), dtype=np.int32)
    shape = (new_size,) + (1,) * (x.ndim - 1)
    for k in range(weights.shape[1]):
        acc += x[index[:, k]].astype(np.int32) * weights[:, k].reshape(shape)
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An HWC uint8 image resized as torch.nn.functional.interpolate(mode="bicubic", antialias=True) resizes a
    uint8 tensor on the CPU (torchvision's resize calls exactly that, a video's frames as a batch of images):
    the width first, rounded to uint8, then the height."""
    return _resize_axis(_resize_axis(image, width, 1), height, 0)


def torchvision_blend(rgba: np.ndarray) -> np.ndarray:
    """RGBA onto white as transformers' torchvision backend blends arrays: in float32 (x / 255), then back to
    uint8 as torchvision's to_dtype does (times 255.999, truncated)."""
    x = rgba.astype(np.float32) * np.float32(1 / 255)
    blended = x[..., :3] * x[..., 3:] + (np.float32(1) - x[..., 3:])
    return (blended * np.float32(255 + 1.0 - 1e-3)).astype(np.uint8)


def torchvision_rgb(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 array as RGB the way transformers' torchvision backend converts arrays (rgb_array's checks
    and grey rule, its own alpha blend)."""
    return rgb_array(image, torchvision_blend)


def rescale_and_normalize(x: np.ndarray, rescale_factor: Optional[float], mean: Optional[np.ndarray],
                          std: Optional[np.ndarray]) -> np.ndarray:
    """uint8 pixels to float32 as TorchvisionBackend.rescale_and_normalize does (rescale_factor None: no
    rescale; mean and std float32, None: no normalisation). Normalising folds the rescale into the mean and
    std (times 1 / rescale_factor, in float32) and divides, so (x - 0) / 255 where a rescale alone is
    x * float32(1 / 255): the two differ in the last bit for about half the levels."""
    x = x.astype(np.float32)
    if mean is not None:
        unscale = np.float32(1.0 / rescale_factor) if rescale_factor is not None else np.float32(1)
        return (x - mean * unscale) / (std * unscale)
    return x * np.float32(rescale_factor) if rescale_factor is not None else x

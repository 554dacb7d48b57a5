"""Images for Gemma 4's vision tower, as transformers' Gemma4ImageProcessor (its PIL backend,
image_processing_pil_gemma4.py) prepares them, without torch. Each image is converted to RGB (transparency
composited on white), resized with Pillow (bicubic by default) to the largest size that keeps its aspect
ratio, has both sides a multiple of pooling_kernel_size * patch_size and holds at most max_soft_tokens *
pooling_kernel_size**2 patches; rescaled by 1/255 (no normalisation by default: the model maps [0, 1] to
[-1, 1] itself); cut into patch_size x patch_size patches, row by row, each flattened as (row, column,
channel); and padded to that patch budget with zero patches at position (-1, -1).

The budget (max_soft_tokens, the soft tokens an image may take) is one of SUPPORTED_SOFT_TOKENS; the config
file gives the default and a call may give another. Video frames are not prepared so: transformers'
Gemma4VideoProcessor runs on its torchvision backend (gemma4_video.py restates it)."""

import inspect
import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import MlxGemmaError
from .processor import check_image_options, decode_image, load_image, to_rgb

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


def get_aspect_ratio_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                                     pooling_kernel_size: int) -> tuple:
    """(height, width) to resize to: transformers' function, its float arithmetic kept so that the sizes
    agree. Both sides round down to a multiple of side = pooling_kernel_size * patch_size; a side that rounds
    to 0 (a very thin image) becomes one `side` and the other floor(ratio) sides, at most the budget's."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    if target_height == 0 and target_width == 0:  # (cannot happen with a supported budget)
        raise MlxGemmaError(f"a {height}x{width} image resizes to 0x0 patches")
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_height == 0:
        target_height, target_width = side, min(int(math.floor(width / height)) * side, max_side)
    elif target_width == 0:
        target_width, target_height = side, min(int(math.floor(height / width)) * side, max_side)
    if target_height * target_width > target_px:
        raise MlxGemmaError(f"a {height}x{width} image resizes to {target_height}x{target_width}, more than "
                            f"{max_patches} patches")
    return target_height, target_width


def blend_rounded(rgba: np.ndarray) -> np.ndarray:
    """RGBA onto white as transformers' PIL backend blends arrays: in float64, rounded (Pillow's composite can
    differ by one)."""
    alpha = rgba[..., 3:4] / 255
    return np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def rgb_array(image, blend=blend_rounded) -> np.ndarray:
    """An HWC uint8 array (HW or HW1: grey, HW4: RGBA) as RGB the way transformers converts arrays: grey
    repeated, alpha blended onto white by `blend` (its PIL and torchvision backends round differently)."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8):
        raise MlxGemmaError(f"an image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise MlxGemmaError(f"an image array has shape {image.shape}; expected (height, width) or (height, width, "
                            "channels) with 1, 3 or 4 channels")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return blend(image) if image.shape[-1] == 4 else image


class Gemma4ImageProcessor:
    """processor(images, max_soft_tokens=None) -> {"pixel_values" (images, max_patches, 3 * patch_size**2)
    float32, "image_position_ids" (images, max_patches, 2) int64 of (x, y) with (-1, -1) for padding,
    "num_soft_tokens_per_image" (images,) int64}, max_patches = max_soft_tokens * pooling_kernel_size**2.
    images: one image or a list; an image is a PIL image, an HWC uint8 array, encoded bytes or a file path."""

    resamples = None  # the resample filters it takes (None: any of Pillow's)

    def __init__(self, patch_size: int = 16, max_soft_tokens: int = 280, pooling_kernel_size: int = 3,
                 resample: int = Image.Resampling.BICUBIC, do_resize: bool = True, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = False, image_mean=(0.0, 0.0, 0.0),
                 image_std=(1.0, 1.0, 1.0), do_convert_rgb: bool = True):
        check_image_options(dict(resample=resample, rescale_factor=rescale_factor, image_mean=list(image_mean),
                                 image_std=list(image_std), do_rescale=do_rescale, do_normalize=do_normalize,
                                 do_convert_rgb=do_convert_rgb))
        for name, value in (("patch_size", patch_size), ("pooling_kernel_size", pooling_kernel_size)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise MlxGemmaError(f"preprocessor_config.json: {name} is {value!r}, expected a positive integer")
        self.patch_size, self.pooling_kernel_size = patch_size, pooling_kernel_size
        self.max_soft_tokens = self.check_budget(max_soft_tokens, "preprocessor_config.json: max_soft_tokens")
        self.resample = Image.Resampling(resample)
        if self.resamples is not None and self.resample not in self.resamples:
            raise MlxGemmaError(f"preprocessor_config.json: resample is {resample!r}; this processor resizes with "
                                f"{', '.join(f'{int(r)} ({r.name.lower()})' for r in self.resamples)} only")
        self.do_resize, self.do_convert_rgb = do_resize, do_convert_rgb
        self.rescale_factor = rescale_factor if do_rescale else None
        self.mean = np.array(image_mean, dtype=np.float32) if do_normalize else None
        self.std = np.array(image_std, dtype=np.float32) if do_normalize else None

    @classmethod
    def from_dict(cls, config: dict) -> "Gemma4ImageProcessor":
        """From preprocessor_config.json's fields (or processor_config.json's, whose image_processor holds
        them); others (size, image_seq_length, ...) are not read, as transformers reads none of them here."""
        if not isinstance(config, dict):
            raise MlxGemmaError(f"preprocessor_config.json must be an object, got {type(config).__name__}")
        config = config["image_processor"] if isinstance(config.get("image_processor"), dict) else config
        names = inspect.signature(cls).parameters
        return cls(**{k: config[k] for k in names if config.get(k) is not None})

    @staticmethod
    def check_budget(value, where: str) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value not in SUPPORTED_SOFT_TOKENS:
            raise MlxGemmaError(f"{where} is {value!r}; Gemma 4 takes one of "
                                f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")
        return int(value)

    def __call__(self, images, max_soft_tokens: Optional[int] = None) -> dict:
        budget = self.max_soft_tokens if max_soft_tokens is None else self.check_budget(max_soft_tokens, "max_soft_tokens")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise MlxGemmaError("the image list is empty: pass at least one image")
        max_patches = budget * self.pooling_kernel_size**2
        pixels, positions, soft_tokens = zip(*(self.one(image, i, max_patches) for i, image in enumerate(images)))
        return {"pixel_values": np.stack(pixels), "image_position_ids": np.stack(positions),
                "num_soft_tokens_per_image": np.array(soft_tokens, dtype=np.int64)}

    def one(self, image, index: int, max_patches: int) -> tuple:
        """One image -> (its patches and positions, padded to the budget; its soft tokens)."""
        img = self.rgb(image, index)
        width, height = img.size
        if not width or not height:
            raise MlxGemmaError(f"image {index} is empty ({width}x{height} pixels)")
        side = self.patch_size * self.pooling_kernel_size
        if self.do_resize:
            size = get_aspect_ratio_preserving_size(height, width, self.patch_size, max_patches,
                                                    self.pooling_kernel_size)
            if size != (height, width):
                img = self.resize(img, size)
                height, width = size
        elif height % side or width % side or height * width > max_patches * self.patch_size**2:
            raise MlxGemmaError(f"image {index} is {width}x{height}; without do_resize its sides must be multiples "
                                f"of {side} and it may hold at most {max_patches} patches")
        x = self.rescale_and_normalize(np.asarray(img))
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = x.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        grid = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int64)
        pad = max_patches - len(patches)
        return (np.pad(patches, ((0, pad), (0, 0))), np.pad(grid, ((0, pad), (0, 0)), constant_values=-1),
                len(patches) // self.pooling_kernel_size**2)

    # How pixels are converted, resized and rescaled: transformers' PIL backend; its torchvision backend (Gemma 4's
    # video frames: gemma4_video.py) differs in each.
    array_to_rgb = staticmethod(rgb_array)

    def resize(self, image: Image.Image, size: tuple) -> Image.Image:
        return image.resize(size[::-1], resample=self.resample)

    def rescale_and_normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels as the PIL backend rescales them: in float64, then float32; normalising then stays in
        float32."""
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.rescale_factor is not None \
            else x.astype(np.float32)
        return (x - self.mean) / self.std if self.mean is not None else x

    def rgb(self, image, index: int) -> Image.Image:
        """The image as an RGB PIL image; bytes are decoded, paths read (with processor.py's checks)."""
        if isinstance(image, np.ndarray):
            if image.ndim in (2, 3) and 0 in image.shape[:2]:
                raise MlxGemmaError(f"image {index} is empty ({image.shape[1]}x{image.shape[0]} pixels)")
            rgb = self.array_to_rgb(image)
            if not self.do_convert_rgb and image.shape[-1:] != (3,):
                raise MlxGemmaError(f"image {index} has shape {image.shape}, not RGB, and do_convert_rgb is off")
            return Image.fromarray(rgb)
        if isinstance(image, (bytes, bytearray, memoryview)):
            img = decode_image(bytes(image), f"image {index}")
        elif isinstance(image, (str, Path, Image.Image)):
            img = load_image(image)
        else:
            raise MlxGemmaError(f"image {index} is a {type(image).__name__}; an image is a PIL image, an HWC uint8 "
                                "array, encoded bytes or a file path")
        if self.do_convert_rgb:
            return to_rgb(img)
        if img.mode != "RGB":
            raise MlxGemmaError(f"image {index} is {img.mode}, not RGB, and do_convert_rgb is off")
        return img

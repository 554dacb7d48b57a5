"""Image+text inputs for T5Gemma 2, as transformers' Gemma3Processor with its PIL image processor prepares
them, without torch: each image placeholder (the boi token, `<start_of_image>`) becomes
"\\n\\n" + boi + image token * mm_tokens_per_image + eoi + "\\n\\n"; images are converted to RGB (transparency
composited on white), resized to the vision tower's size with Pillow's bilinear filter, rescaled by 1/255,
normalised ((v - mean) / std, 0.5 and 0.5 by default) and laid out channels-first."""

import io
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MlxGemmaError

ImageInput = Union[str, Path, Image.Image]


def load_image(image: ImageInput) -> Image.Image:
    """A PIL image from a path (read completely now, so a truncated file fails here) or as given."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise MlxGemmaError(f"an image is a file path or a PIL image, not {type(image).__name__}")
    path = Path(image).expanduser()
    if not path.exists():
        raise MlxGemmaError(f"image {str(path)!r} not found")
    if not path.is_file():
        raise MlxGemmaError(f"image {str(path)!r} is not a regular file")
    return _read(path, f"image {str(path)!r}")


def decode_image(data: bytes, what: str = "the image") -> Image.Image:
    """A PIL image from encoded bytes (PNG, JPEG, ...: what a data URL or base64 field carries)."""
    return _read(io.BytesIO(data), what)


def _read(source, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError:
        raise MlxGemmaError(f"{what} is not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise MlxGemmaError(f"{what} claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels: refused as "
                            "a possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise MlxGemmaError(f"{what} cannot be decoded ({e}): is the file truncated?") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def _check_image_options(options: dict) -> None:
    """preprocessor_config.json's values by type, so that a broken file is one clear error."""
    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) and
                                                           not isinstance(x, bool) and np.isfinite(x) for x in v)
    checks = {
        "size": lambda v: isinstance(v, dict) and all(isinstance(x, int) and x > 0 for x in v.values()),
        "resample": lambda v: v in {r.value for r in Image.Resampling},
        "rescale_factor": lambda v: numbers([v], 1),
        "image_mean": lambda v: numbers(v, 3),
        "image_std": lambda v: numbers(v, 3) and all(x != 0 for x in v),
        **{k: lambda v: isinstance(v, bool) for k in ("do_rescale", "do_normalize", "do_convert_rgb")},
    }
    for key, ok in checks.items():
        if options.get(key) is not None and not ok(options[key]):
            raise MlxGemmaError(f"preprocessor_config.json: {key} is {repr(options[key])[:40]}, which is not valid")


class T5Gemma2Processor:
    """processor(text, images) -> {"input_ids", "attention_mask", "pixel_values"} as numpy arrays.
    `tokenizer` is mlx-lm's TokenizerWrapper (streaming detokenizer, eos ids) of the checkpoint."""

    def __init__(self, tokenizer, config, image_options: Optional[dict] = None):
        options = image_options or {}
        _check_image_options(options)
        self.tokenizer = tokenizer
        enc = config.encoder
        size = options.get("size") or {}
        vision = enc.vision_config.image_size
        self.size = (size.get("height", vision), size.get("width", vision))
        if self.size != (vision, vision):
            raise MlxGemmaError(f"preprocessor_config.json resizes to {self.size}, but the vision tower takes "
                                f"{vision}x{vision} images")
        self.resample = Image.Resampling(options.get("resample", Image.Resampling.BILINEAR))
        self.rescale = options.get("rescale_factor", 1 / 255) if options.get("do_rescale", True) else 1.0
        normalize = options.get("do_normalize", True)
        self.mean = np.array(options.get("image_mean", [0.5] * 3) if normalize else [0.0] * 3, dtype=np.float32)
        self.std = np.array(options.get("image_std", [0.5] * 3) if normalize else [1.0] * 3, dtype=np.float32)
        self.do_convert_rgb = options.get("do_convert_rgb", True)
        hf = tokenizer._tokenizer
        self.boi_token, self.eoi_token, image = hf.convert_ids_to_tokens(
            [enc.boi_token_index, enc.eoi_token_index, enc.image_token_index])
        self.full_image_sequence = f"\n\n{self.boi_token}{image * enc.mm_tokens_per_image}{self.eoi_token}\n\n"

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "T5Gemma2Processor":
        from .loading import read_json

        options = {}
        for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            f = Path(path) / name
            if f.exists():
                d = read_json(f)
                d = d.get(key) or {} if key else d
                if not isinstance(d, dict):
                    raise MlxGemmaError(f"{f}: {key} must be an object")
                options.update(d)
        return cls(tokenizer, config, options)

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, 3, H, W) float32 pixel values."""
        out = []
        for image in images:
            img = load_image(image)
            img = to_rgb(img) if self.do_convert_rgb else img
            img = img.resize((self.size[1], self.size[0]), resample=self.resample)
            x = np.asarray(img, dtype=np.float32) * np.float32(self.rescale)
            out.append(((x - self.mean) / self.std).transpose(2, 0, 1))
        return np.stack(out)  # float32 throughout

    def __call__(self, text: Union[str, List[str]], images=None) -> dict:
        """text: one prompt or a batch; images: for one prompt a list of images, for a batch a list of lists
        (one per prompt, [] for none). Each prompt holds one placeholder (the boi token) per image."""
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = self.images_per_prompt(images, len(texts))
        counts = [t.count(self.boi_token) for t in texts]
        if counts != [len(i) for i in per_prompt]:
            raise MlxGemmaError(f"the prompt(s) hold {counts} image placeholder(s) {self.boi_token!r} but "
                                f"{[len(i) for i in per_prompt]} image(s) were given: one placeholder per image")
        texts = [t.replace(self.boi_token, self.full_image_sequence) for t in texts]
        enc = self.tokenizer._tokenizer(texts, padding=True, return_tensors="np")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        flat = [img for imgs in per_prompt for img in imgs]
        if flat:
            out["pixel_values"] = self.preprocess(flat)
        return out

    @staticmethod
    def images_per_prompt(images, n_texts: int) -> list:
        """One list of images per prompt, from None, one image, a list (one prompt) or a list of lists."""
        if images is None:
            return [[] for _ in range(n_texts)]
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if not images:
            raise MlxGemmaError("the image list is empty: pass at least one image, or none at all")
        nested = all(isinstance(i, (list, tuple)) for i in images)
        if n_texts == 1 and not nested:
            return [images]
        if not nested or len(images) != n_texts:
            raise MlxGemmaError(f"{n_texts} prompts need a list of {n_texts} image lists (one per prompt)")
        return [list(i) for i in images]

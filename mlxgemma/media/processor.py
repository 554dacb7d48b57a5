"""Image+text inputs for Gemma 3 (Gemma3ForConditionalGeneration) and T5Gemma 2, as transformers' Gemma3Processor
with its PIL image processor prepares them, without torch: each image placeholder (the boi token,
`<start_of_image>`) becomes "\\n\\n" + boi + image token * mm_tokens_per_image + eoi + "\\n\\n"; images are
converted to RGB (transparency composited on white), resized to the vision tower's size with Pillow's bilinear
filter, rescaled by 1/255, normalised ((v - mean) / std, 0.5 and 0.5 by default) and laid out channels-first.

Pan-and-scan (Gemma 3 only, off by default): an image whose aspect ratio reaches a threshold is also cut into
2..max crops along its long side; the original and then its crops each go through the steps above, and the
placeholder becomes "Here is the original image {seq} and here are some crops to help you see better {seq} ..."."""

import io
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MlxGemmaError
from ..files import read_json

ImageInput = Union[str, Path, Image.Image]

# transformers' Gemma3Processor.images_kwargs: the values used where a config file says null or nothing.
PAN_AND_SCAN = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}


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


def _number(v, integer: bool = False) -> bool:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    return isinstance(v, kinds) and not isinstance(v, (bool, np.bool_)) and bool(np.isfinite(v))


# (check, what a valid value is) per pan-and-scan option, for the config files and per-call keywords alike.
_PAN_AND_SCAN_CHECKS = {
    "do_pan_and_scan": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    "pan_and_scan_min_crop_size": (lambda v: _number(v, True) and v > 0, "an integer > 0"),
    "pan_and_scan_max_num_crops": (lambda v: _number(v, True) and v > 0, "an integer > 0"),
    "pan_and_scan_min_ratio_to_activate": (lambda v: _number(v) and v > 0, "a number > 0"),
}


def check_image_options(options: dict) -> None:
    """preprocessor_config.json's values by type, so that a broken file is one clear error."""
    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(_number(x) for x in v)
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
    for key, (ok, valid) in _PAN_AND_SCAN_CHECKS.items():
        if options.get(key) is not None and not ok(options[key]):
            raise MlxGemmaError(f"preprocessor_config.json: {key} is {repr(options[key])[:40]}, which is not "
                                f"valid: it must be {valid}")


class Gemma3Processor:
    """processor(text, images, **pan_and_scan) -> {"input_ids", "attention_mask", "token_type_ids" (1 at the
    image soft tokens), "pixel_values" (N images + crops, 3, H, W), "num_crops" (per image, when pan-and-scan
    ran)} as numpy arrays. `tokenizer` is mlx-lm's TokenizerWrapper of the checkpoint; `config` holds
    vision_config.image_size, mm_tokens_per_image and boi/eoi/image_token_index (a Gemma 3 multimodal config).
    The pan-and-scan keywords (PAN_AND_SCAN's names) override the config files' values for one call."""

    supports_pan_and_scan = True

    def __init__(self, tokenizer, config, image_options: Optional[dict] = None):
        options = image_options or {}
        check_image_options(options)
        self.tokenizer = tokenizer
        size = options.get("size") or {}
        vision = config.vision_config.image_size
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
        self.pan_and_scan = {k: d if options.get(k) is None else options[k] for k, d in PAN_AND_SCAN.items()}
        self._pan_and_scan_options({})  # refuses a file's do_pan_and_scan where it is not supported
        hf = tokenizer._tokenizer
        self.image_token_id = config.image_token_index
        self.boi_token, self.eoi_token, image = hf.convert_ids_to_tokens(
            [config.boi_token_index, config.eoi_token_index, config.image_token_index])
        self.full_image_sequence = f"\n\n{self.boi_token}{image * config.mm_tokens_per_image}{self.eoi_token}\n\n"

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "Gemma3Processor":
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

    def _pan_and_scan_options(self, overrides: dict) -> dict:
        unknown = sorted(set(overrides) - set(PAN_AND_SCAN))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the image options are {list(PAN_AND_SCAN)}")
        opts = dict(self.pan_and_scan)
        for key, v in overrides.items():
            if v is not None:
                ok, valid = _PAN_AND_SCAN_CHECKS[key]
                if not ok(v):
                    raise MlxGemmaError(f"{key}={repr(v)[:40]} is not valid: it must be {valid}")
                opts[key] = v
        if opts["do_pan_and_scan"] and not self.supports_pan_and_scan:
            raise MlxGemmaError(f"{type(self).__name__} does not support pan-and-scan: do_pan_and_scan must be "
                                "false (in the call and in preprocessor_config.json)")
        return opts

    @staticmethod
    def _crops(img: Image.Image, min_crop: int, max_crops: int, min_ratio: float) -> List[Image.Image]:
        """transformers' pan_and_scan, with its float arithmetic kept so that the crop counts agree."""
        w, h = img.size
        long, short = (w, h) if w >= h else (h, w)
        if long / short < min_ratio:
            return []
        n = min(int(math.floor(long / min_crop)), int(math.floor(long / short + 0.5)))
        n = min(max_crops, max(2, n))
        n_w, n_h = (n, 1) if w >= h else (1, n)
        crop_w, crop_h = int(math.ceil(w / n_w)), int(math.ceil(h / n_h))
        if min(crop_w, crop_h) < min_crop:
            return []
        # transformers slices an array, which stops at the image's edge where Image.crop would pad with black;
        # its last crop can even be empty (e.g. 9x2, 4 crops), which resizes to a black image, as here.
        return [img.crop((x, y, min(x + crop_w, w), min(y + crop_h, h)))
                for y in range(0, crop_h * n_h, crop_h) for x in range(0, crop_w * n_w, crop_w)]

    def _pixels(self, img: Image.Image) -> np.ndarray:
        img = img.resize((self.size[1], self.size[0]), resample=self.resample)
        x = np.asarray(img, dtype=np.float32) * np.float32(self.rescale)
        return ((x - self.mean) / self.std).transpose(2, 0, 1)  # float32 throughout

    def _preprocess(self, images: Sequence[ImageInput], opts: dict) -> Tuple[np.ndarray, List[int]]:
        out, num_crops = [], []
        for image in images:
            img = load_image(image)
            img = to_rgb(img) if self.do_convert_rgb else img
            crops = self._crops(img, opts["pan_and_scan_min_crop_size"], opts["pan_and_scan_max_num_crops"],
                                opts["pan_and_scan_min_ratio_to_activate"]) if opts["do_pan_and_scan"] else []
            num_crops.append(len(crops))
            out.extend(self._pixels(i) for i in [img, *crops])
        return np.stack(out), num_crops

    def preprocess_with_crops(self, images: Sequence[ImageInput], **pan_and_scan) -> Tuple[np.ndarray, List[int]]:
        """(pixel values (N + crops, 3, H, W) float32: each image then its crops, the crop count per image).
        Build a prompt for them with image_sequence(count) per image."""
        return self._preprocess(images, self._pan_and_scan_options(pan_and_scan))

    def preprocess(self, images: Sequence[ImageInput], **pan_and_scan) -> np.ndarray:
        """(N + crops, 3, H, W) float32 pixel values (N without pan-and-scan)."""
        return self.preprocess_with_crops(images, **pan_and_scan)[0]

    def image_sequence(self, num_crops: int = 0) -> str:
        """The text an image's placeholder becomes, for the image with that many pan-and-scan crops."""
        if not num_crops:
            return self.full_image_sequence
        return (f"Here is the original image {self.full_image_sequence} and here are some crops to help you see "
                "better " + " ".join([self.full_image_sequence] * num_crops))

    def __call__(self, text: Union[str, List[str]], images=None, add_special_tokens: Optional[bool] = None,
                 **pan_and_scan) -> dict:
        """text: one prompt or a batch; images: for one prompt a list of images, for a batch a list of lists
        (one per prompt, [] for none). Each prompt holds one placeholder (the boi token) per image. The
        tokenizer adds <bos> unless the text starts with it already (a chat template's output), as
        transformers' apply_chat_template decides; add_special_tokens overrides that."""
        opts = self._pan_and_scan_options(pan_and_scan)
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = self.images_per_prompt(images, len(texts))
        counts = [t.count(self.boi_token) for t in texts]
        if counts != [len(i) for i in per_prompt]:
            raise MlxGemmaError(f"the prompt(s) hold {counts} image placeholder(s) {self.boi_token!r} but "
                                f"{[len(i) for i in per_prompt]} image(s) were given: one placeholder per image")
        flat = [img for imgs in per_prompt for img in imgs]
        pixels, num_crops = self._preprocess(flat, opts) if flat else (None, [])
        crops = iter(num_crops)  # placeholders take the images in order, across the batch
        texts = ["".join(part if i == 0 else self.image_sequence(next(crops)) + part
                         for i, part in enumerate(t.split(self.boi_token))) for t in texts]
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and all(t.startswith(bos) for t in texts))
        enc = self.tokenizer._tokenizer(texts, padding=True, return_tensors="np", add_special_tokens=add_special_tokens)
        ids = enc["input_ids"]
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"],
               "token_type_ids": (ids == self.image_token_id).astype(ids.dtype)}
        if flat:
            out["pixel_values"] = pixels
            if opts["do_pan_and_scan"]:
                out["num_crops"] = num_crops
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


class T5Gemma2Processor(Gemma3Processor):
    """Gemma3Processor over a T5Gemma 2 config, whose image fields sit on config.encoder; no pan-and-scan."""

    supports_pan_and_scan = False

    def __init__(self, tokenizer, config, image_options: Optional[dict] = None):
        check_image_options(image_options or {})  # a broken file is named before the config is read
        super().__init__(tokenizer, config.encoder, image_options)

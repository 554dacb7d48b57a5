"""Text with images and audio for Gemma 3n, as transformers' Gemma3nProcessor lays it out, without torch.

The text marks where each item goes with the image token `<image_soft_token>` and the audio token
`<audio_soft_token>` (the chat template writes them for image and audio parts). Scanning the text in order, each
mark takes the next item of its kind and becomes a block of a fixed size, whatever the item:
  image: "\\n\\n" + boi + image token x image_seq_length (256) + eoi + "\\n\\n"
  audio: "\\n\\n" + boa + audio token x audio_seq_length (188) + eoa + "\\n\\n"
Images go through transformers' SigLIP image processor (its Pillow backend: RGB on white, Pillow resize to
`size`, rescale, normalise, channels first) with the checkpoint's settings; clips through
Gemma3nAudioFeatureExtractor (media/gemma3n_audio.py). The items also come back one by one in prompt order
(`prepare`), which is what the feature cache and a prefill in chunks need."""

import re
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import MlxGemmaError
from ..files import read_json
from .audio import load_audio
from .features import listed
from .gemma3n_audio import Gemma3nAudioFeatureExtractor
from .processor import Gemma3Processor, check_image_options, load_image, to_rgb

KINDS = ("image", "audio")
# transformers' SiglipImageProcessorPil class defaults: what a field the config files leave out (or null) takes.
# (The released Gemma 3n files set size 768x768, bilinear resampling and do_normalize false.)
IMAGE_DEFAULTS = dict(do_resize=True, size={"height": 224, "width": 224}, resample=Image.Resampling.BICUBIC,
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3, do_convert_rgb=True)


class Gemma3nImageProcessor:
    """images -> (N, 3, H, W) float32 pixel values, as transformers' SiglipImageProcessorPil computes them."""

    def __init__(self, **options):
        check_image_options(options)
        config = dict(IMAGE_DEFAULTS, **{k: v for k, v in options.items() if k in IMAGE_DEFAULTS and v is not None})
        size = config["size"]
        if set(size) != {"height", "width"}:
            raise MlxGemmaError(f"preprocessor_config.json: size is {size!r}, expected {{height, width}} (Gemma 3n "
                                "resizes to a fixed size)")
        self.size = (size["height"], size["width"])
        self.do_resize, self.do_convert_rgb = config["do_resize"], config["do_convert_rgb"]
        self.resample = Image.Resampling(config["resample"])
        self.rescale = config["rescale_factor"] if config["do_rescale"] else 1.0
        normalize = config["do_normalize"]
        self.mean = np.array(config["image_mean"] if normalize else [0.0] * 3, dtype=np.float32)
        self.std = np.array(config["image_std"] if normalize else [1.0] * 3, dtype=np.float32)

    def __call__(self, images) -> np.ndarray:
        out = []
        for image in images:
            img = load_image(image)
            img = to_rgb(img) if self.do_convert_rgb else img
            if self.do_resize:
                img = img.resize((self.size[1], self.size[0]), resample=self.resample)
            x = np.asarray(img, dtype=np.float32) * np.float32(self.rescale)
            out.append(((x - self.mean) / self.std).transpose(2, 0, 1))
        if len({x.shape for x in out}) > 1:
            raise MlxGemmaError("images of different sizes without do_resize cannot go in one batch")
        return np.stack(out)


class Gemma3nProcessor:
    """processor(text, images=None, audio=None) -> transformers' inputs as numpy arrays (input_ids,
    attention_mask, token_type_ids: 1 at image tokens, 3 at audio tokens, pixel_values, input_features,
    input_features_mask). `tokenizer` is mlx-lm's TokenizerWrapper of the checkpoint, `config` the model's
    Gemma3nConfig."""

    checkpoint_name = "Gemma 3n"

    def __init__(self, tokenizer, config, image_processor: Gemma3nImageProcessor,
                 feature_extractor: Optional[Gemma3nAudioFeatureExtractor] = None, audio_seq_length: int = 188,
                 image_seq_length: int = 256):
        # The model fills exactly its soft tokens per item: a processor laying out other counts cannot run.
        for name, value, model in (("audio_seq_length", audio_seq_length, config.audio_soft_tokens_per_image),
                                   ("image_seq_length", image_seq_length, config.vision_soft_tokens_per_image)):
            if value != model:
                raise MlxGemmaError(f"processor_config.json: {name} is {value!r}, but the model takes {model} soft "
                                    "tokens per item")
        self.tokenizer, self.config = tokenizer, config
        self.image_processor, self.feature_extractor = image_processor, feature_extractor
        names = ("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id", "eoa_token_id")
        tokens = tokenizer._tokenizer.convert_ids_to_tokens([getattr(config, n) for n in names])
        for name, token in zip(names, tokens):
            if token is None:
                raise MlxGemmaError(f"config.json: {name} {getattr(config, name)!r} is not a token of the tokenizer")
        self.image_token, self.boi_token, self.eoi_token, self.audio_token, self.boa_token, self.eoa_token = tokens
        self.full_image_sequence = f"\n\n{self.boi_token}{self.image_token * image_seq_length}{self.eoi_token}\n\n"
        self.full_audio_sequence = f"\n\n{self.boa_token}{self.audio_token * audio_seq_length}{self.eoa_token}\n\n"
        self.marks = {"image": self.image_token}
        if feature_extractor is not None:
            self.marks["audio"] = self.audio_token

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "Gemma3nProcessor":
        """processor_config.json (transformers' nesting: image_processor, feature_extractor, the sequence
        lengths) or preprocessor_config.json (the released checkpoints': both processors' fields in one file);
        what is missing takes transformers' defaults."""
        files = {}
        for name in ("processor_config.json", "preprocessor_config.json"):
            f = Path(path) / name
            files[name] = read_json(f) if f.exists() else {}
            if not isinstance(files[name], dict):
                raise MlxGemmaError(f"{f} must be a JSON object")
        top, flat = files["processor_config.json"], files["preprocessor_config.json"]
        image = top.get("image_processor") or flat
        audio = top.get("feature_extractor") or flat
        for what, d in (("image_processor", image), ("feature_extractor", audio)):
            if not isinstance(d, dict):
                raise MlxGemmaError(f"processor_config.json: {what} must be an object")
        extractor = Gemma3nAudioFeatureExtractor.from_dict(audio) if config.audio_config is not None else None
        lengths = {k: top.get(k, flat.get(k, d)) for k, d in (("audio_seq_length", 188), ("image_seq_length", 256))}
        return cls(tokenizer, config, Gemma3nImageProcessor(**image), extractor, **lengths)

    def _audio(self, clip) -> dict:
        if self.feature_extractor is None:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint has no audio tower: it takes no audio")
        wave = load_audio(clip, self.feature_extractor.sampling_rate)
        out = self.feature_extractor([wave])
        if out["input_features"].shape[1] == 0:
            raise MlxGemmaError(f"an audio clip of {len(wave)} samples is too short to hear: give at least one "
                                f"frame ({self.feature_extractor.frame_length + 1} samples)")
        return {"input_features": out["input_features"], "input_features_mask": out["input_features_mask"],
                "waveform": wave}

    def prepare(self, text, images=(), audio=(), videos=(), add_special_tokens: Optional[bool] = None,
                **options) -> tuple:
        """(transformers' inputs of one prompt or a batch, the items in prompt order: one dict of model inputs
        per image and clip, each with its kind under "kind")."""
        if options:
            raise MlxGemmaError(f"{self.checkpoint_name} takes no image options ({', '.join(sorted(options))}): its "
                                f"images are always {self.config.vision_soft_tokens_per_image} soft tokens")
        if listed(videos):
            raise MlxGemmaError(f"{self.checkpoint_name} takes no video")
        texts = [text] if isinstance(text, str) else list(text)
        given = {"image": listed(images), "audio": listed(audio)}
        if given["audio"] and self.feature_extractor is None:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint has no audio tower: it takes no audio")
        marks = {"image": self.image_token, "audio": self.audio_token}
        for kind in KINDS:
            count = sum(t.count(marks[kind]) for t in texts)
            if count != len(given[kind]):
                raise MlxGemmaError(f"the prompt holds {count} {kind} placeholder(s) {marks[kind]!r} but "
                                    f"{len(given[kind])} {kind}(s) were given: one placeholder per {kind}")
        pattern = "|".join(f"(?P<{k}>{re.escape(marks[k])})" for k in KINDS if given[k])
        queues = {k: iter(v) for k, v in given.items()}
        items, expanded = [], []
        for t in texts:
            parts, last = [], 0
            for m in re.finditer(pattern, t) if pattern else ():
                kind, source = m.lastgroup, next(queues[m.lastgroup])
                if kind == "image":
                    items.append({"pixel_values": self.image_processor([source]), "kind": "image"})
                else:
                    items.append(dict(self._audio(source), kind="audio"))
                parts += [t[last:m.start()], self.full_image_sequence if kind == "image" else self.full_audio_sequence]
                last = m.end()
            expanded.append("".join(parts) + t[last:])
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and all(t.startswith(bos) for t in expanded))
        enc = self.tokenizer._tokenizer(expanded, padding=True, return_tensors="np",
                                        add_special_tokens=add_special_tokens)
        ids = enc["input_ids"]
        types = np.zeros(ids.shape, dtype=np.int64)
        types[ids == self.config.image_token_id], types[ids == self.config.audio_token_id] = 1, 3
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"], "token_type_ids": types}
        images = [i["pixel_values"] for i in items if i["kind"] == "image"]
        if images:
            out["pixel_values"] = np.concatenate(images)
        clips = [i["waveform"] for i in items if i["kind"] == "audio"]
        if clips:  # (together, padded to the longest, as transformers' feature extractor gets them)
            out.update(self.feature_extractor(clips))
        return out, [{k: v for k, v in item.items() if k != "waveform"} for item in items]

    def __call__(self, text, images=(), audio=(), add_special_tokens: Optional[bool] = None) -> dict:
        return self.prepare(text, images, audio, add_special_tokens=add_special_tokens)[0]

    images_per_prompt = staticmethod(Gemma3Processor.images_per_prompt)

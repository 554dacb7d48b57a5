"""Text with images, audio and video for Gemma 4, as transformers' Gemma4Processor lays it out, without torch.

The text marks where each item goes with `<|image|>`, `<|audio|>` and `<|video|>` (the chat template writes
them for image, audio and video content parts). Scanning the text in order, as transformers does, each mark
takes the next item of its kind and becomes:
  image: `<|image>` + `<|image|>` x its soft tokens (from its size and the budget) + `<image|>`
  audio: `<|audio>` + `<|audio|>` x one per 40 ms (the tower's two stride-2 convolutions) + `<audio|>`
  video: per sampled frame, "mm:ss " + the image layout of the frame, frames joined by spaces.
The items also come back one by one in that order (`prepare`), which is what the feature cache and a
prefill in chunks need."""

import re
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import MlxGemmaError
from ..files import read_json
from .audio import Gemma4AudioFeatureExtractor, load_audio
from .features import listed
from .gemma4_images import Gemma4ImageProcessor
from .gemma4_video import Gemma4VideoFrameProcessor, Gemma4VideoProcessor
from .processor import Gemma3Processor

KINDS = ("image", "audio", "video")


class Gemma4Processor:
    """processor(text, images=None, audio=None, videos=None) -> transformers' inputs as numpy arrays
    (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_position_ids, input_features,
    input_features_mask, pixel_values_videos, video_position_ids, num_frames_per_video). `tokenizer` is
    mlx-lm's TokenizerWrapper of the checkpoint, `config` the model's Gemma4Config."""

    # What from_pretrained builds from the config files (Gemma 4 unified has its own).
    image_processor_class, feature_extractor_class = Gemma4ImageProcessor, Gemma4AudioFeatureExtractor
    # What a video's frames go through (transformers' video processor is on its torchvision backend), and what
    # samples them (EmbeddingGemma 2 has its own).
    frame_processor_class, video_processor_class = Gemma4VideoFrameProcessor, Gemma4VideoProcessor
    reads_video = True
    checkpoint_name = "Gemma 4"  # (what the errors call a checkpoint without a medium)

    def __init__(self, tokenizer, config, image_processor: Gemma4ImageProcessor,
                 feature_extractor: Optional[Gemma4AudioFeatureExtractor] = None, video_processor=None):
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor, self.feature_extractor = image_processor, feature_extractor
        self.video_processor = video_processor
        hf = tokenizer._tokenizer
        self.image_token, self.boi_token, self.eoi_token, self.audio_token, self.boa_token, self.eoa_token = \
            hf.convert_ids_to_tokens([config.image_token_id, config.boi_token_id, config.eoi_token_id,
                                      config.audio_token_id, config.boa_token_id,
                                      config.eoa_token_id or config.eoa_token_index])
        self.video_token = hf.convert_ids_to_tokens(config.video_token_id) if config.video_token_id else None
        self.marks = {"image": self.image_token, "audio": self.audio_token, "video": self.video_token}

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "Gemma4Processor":
        """processor_config.json (transformers' nesting: image_processor, feature_extractor, video_processor)
        or preprocessor_config.json (and video_preprocessor_config.json); what is missing takes transformers'
        defaults (mlx-vlm's conversions drop the feature extractor's block: its defaults are every released
        checkpoint's settings)."""
        files = {}
        for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
            f = Path(path) / name
            files[name] = read_json(f) if f.exists() else {}
            if not isinstance(files[name], dict):
                raise MlxGemmaError(f"{f} must be a JSON object")
        top = files["processor_config.json"]
        image = top.get("image_processor") or files["preprocessor_config.json"]
        audio = top.get("feature_extractor") or files["preprocessor_config.json"]
        for what, d in (("image_processor", image), ("feature_extractor", audio)):
            if not isinstance(d, dict):
                raise MlxGemmaError(f"processor_config.json: {what} must be an object")
        image_processor = cls.image_processor_class.from_dict(image)
        audio = dict(audio, audio_seq_length=top["audio_seq_length"]) if "audio_seq_length" in top else audio
        extractor = cls.feature_extractor_class.from_dict(audio) if config.audio_config is not None else None
        video = top.get("video_processor") or files["video_preprocessor_config.json"]
        if not isinstance(video, dict):
            raise MlxGemmaError("processor_config.json: video_processor must be an object")
        video_processor = None
        if cls.reads_video:  # (frames take the video processor's options and the image processor's geometry)
            video_processor = cls.video_processor_class.from_dict(video, image, cls.frame_processor_class)
        return cls(tokenizer, config, image_processor, extractor, video_processor)

    # One item of each kind -> its model inputs and its text.

    def _image(self, image, budget) -> tuple:
        out = self.image_processor([image], max_soft_tokens=budget)
        n = int(out["num_soft_tokens_per_image"][0])
        item = {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}
        return item, self.boi_token + self.image_token * n + self.eoi_token

    def _audio(self, clip) -> tuple:
        if self.feature_extractor is None:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint has no audio_config: it takes no audio")
        wave = load_audio(clip, self.feature_extractor.sampling_rate)
        out = self.feature_extractor([wave])
        n = self.feature_extractor.num_soft_tokens(out["input_features_mask"][0])
        if n == 0:
            raise MlxGemmaError(f"an audio clip of {len(wave)} samples is too short to hear: give at least 40 ms")
        item = {"input_features": out["input_features"], "input_features_mask": out["input_features_mask"],
                "waveform": wave}
        return item, self.boa_token + self.audio_token * n + self.eoa_token

    def _video(self, video, budget: Optional[int] = None) -> tuple:
        """(its frames and positions, its text: per frame "mm:ss " + the frame's image layout, as
        replace_video_token writes it). Frames take the video budget, not the images' `budget` (as
        transformers' Gemma4Processor)."""
        if self.video_processor is None or self.video_token is None:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint takes no video")
        out = self.video_processor([video])
        n, stamps = int(out["num_soft_tokens_per_video"][0]), out["timestamps"][0]
        frame = self.boi_token + self.video_token * n + self.eoi_token
        text = " ".join(f"{int(s // 60):02d}:{int(s % 60):02d} {frame}" for s in stamps)
        item = {"pixel_values_videos": out["pixel_values_videos"], "video_position_ids": out["video_position_ids"],
                "blocks": len(stamps)}
        return item, text

    def prepare(self, text, images=(), audio=(), videos=(), max_soft_tokens: Optional[int] = None,
                add_special_tokens: Optional[bool] = None) -> tuple:
        """(transformers' inputs of one prompt or a batch, the items in prompt order: one dict of model inputs
        per image, clip and video, each with its kind under "kind")."""
        texts = [text] if isinstance(text, str) else list(text)
        given = {"image": listed(images), "audio": listed(audio), "video": listed(videos)}
        counts = {k: sum(t.count(self.marks[k]) for t in texts) if self.marks[k] else 0 for k in KINDS}
        for kind in KINDS:
            if counts[kind] != len(given[kind]):
                raise MlxGemmaError(f"the prompt holds {counts[kind]} {kind} placeholder(s) {self.marks[kind]!r} "
                                    f"but {len(given[kind])} {kind}(s) were given: one placeholder per {kind}")
        pattern = "|".join(f"(?P<{k}>{re.escape(self.marks[k])})" for k in KINDS if given[k])
        queues = {k: iter(v) for k, v in given.items()}
        items, expanded = [], []
        for t in texts:
            parts, last = [], 0
            for m in re.finditer(pattern, t) if pattern else ():
                kind = m.lastgroup
                source = next(queues[kind])
                item, replacement = (self._image(source, max_soft_tokens) if kind == "image" else
                                     self._audio(source) if kind == "audio" else self._video(source, max_soft_tokens))
                items.append(dict(item, kind=kind))
                parts += [t[last:m.start()], replacement]
                last = m.end()
            expanded.append("".join(parts) + t[last:])
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and all(t.startswith(bos) for t in expanded))
        enc = self.tokenizer._tokenizer(expanded, padding=True, return_tensors="np",
                                        add_special_tokens=add_special_tokens)
        ids = enc["input_ids"]
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": self.token_types(ids)}
        out.update(batched(items, self.feature_extractor))
        return out, [{k: v for k, v in item.items() if k != "waveform"} for item in items]

    def __call__(self, text, images=(), audio=(), videos=(), max_soft_tokens: Optional[int] = None,
                 add_special_tokens: Optional[bool] = None) -> dict:
        return self.prepare(text, images, audio, videos, max_soft_tokens, add_special_tokens)[0]

    images_per_prompt = staticmethod(Gemma3Processor.images_per_prompt)

    def token_types(self, ids: np.ndarray) -> np.ndarray:
        types = np.zeros(ids.shape, dtype=np.int64)
        for token, kind in ((self.config.image_token_id, 1), (self.config.video_token_id, 2),
                            (self.config.audio_token_id, 3)):
            if token is not None:
                types[ids == token] = kind
        return types


def batched(items: List[dict], extractor) -> dict:
    """transformers' batched arrays of items: images (and video frames) stacked (the budget fixes their
    padded patch count), clips through the feature extractor together (padded to the longest)."""
    out = {}
    images = [i for i in items if i["kind"] == "image"]
    if images:
        out["pixel_values"] = _stack([i["pixel_values"] for i in images])
        out["image_position_ids"] = _stack([i["image_position_ids"] for i in images], pad=-1)
    videos = [i for i in items if i["kind"] == "video"]
    if videos:
        out["pixel_values_videos"] = _stack([i["pixel_values_videos"] for i in videos])
        out["video_position_ids"] = _stack([i["video_position_ids"] for i in videos], pad=-1)
        out["num_frames_per_video"] = np.array([len(i["video_position_ids"]) for i in videos])
    clips = [i for i in items if i["kind"] == "audio"]
    if clips:
        out.update(extractor([c["waveform"] for c in clips]))
    return out


def _stack(arrays: List[np.ndarray], pad: float = 0) -> np.ndarray:
    """Concatenate along the first axis, padding the patch axis to the longest (different budgets)."""
    P = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, P - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=pad)
                           for a in arrays])




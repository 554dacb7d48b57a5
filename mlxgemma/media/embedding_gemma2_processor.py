"""Text with images, audio and video for EmbeddingGemma 2, as transformers' EmbeddingGemma2Processor lays it out,
without torch. Its image processor and audio feature extractor are Gemma 4's (gemma4_images.py, audio.py), its
layout of an image or a clip too (gemma4_processor.py):
  image: `<|image>` + `<|image|>` x its soft tokens + `<image|>`
  audio: `<|audio>` + `<|audio|>` x one per 40 ms + `<audio|>`
What differs is video, and text left out:
  video: one image-like block per sampled frame, `<|image>` + `<|video|>` x the frame's soft tokens + `<image|>`,
    the blocks back to back, no timestamps (add_timestamps in the video processor's config: "mm:ss " before
    each block, seconds rounded, blocks joined by spaces). Frames are sampled by rate: 1 per second of the
    file (its frame rate and duration, duration = frames / rate as transformers' PyAV reader has it; its
    default reader, torchcodec, reads the stream's duration, the same for a file of constant rate), then at
    most max_frames (32) of those, spread evenly (np.linspace over them). Frames given already decoded carry
    no rate: all of them are kept, then the max_frames budget (as transformers does for an array). Each frame
    is patchified as Gemma 4's video frames are (gemma4_video.py, its torchvision backend's pixels).
  text left out (None): each prompt is its media's placeholders joined by spaces, images first, then videos,
    then clips. As transformers counts prompts then: a list of lists gives each prompt its items; otherwise
    a flat list of images is ONE prompt of them all, and a flat list of videos or of clips one prompt each.
A call's max_soft_tokens is the budget of the images and of the video frames alike (transformers passes it
to both processors). The ids are the tokenizer's, with its own special tokens and padding side; no
mm_token_type_ids (the model needs none)."""

from typing import List, Optional

import numpy as np

from ..errors import MlxGemmaError
from .features import listed
from .gemma4_processor import Gemma4Processor
from .gemma4_video import NUM_FRAMES, VIDEO_SOFT_TOKENS, Gemma4VideoFrameProcessor, Gemma4VideoProcessor, load_video

FPS, MAX_FRAMES = 1, 32  # EmbeddingGemma2VideoProcessor's defaults (70 soft tokens a frame, as Gemma 4's)
OVERFLOW_STRATEGIES = ("uniform", "truncate")


def sample_frames(total: int, fps: Optional[float], duration: Optional[float], target_fps: Optional[float] = FPS,
                  max_frames: Optional[int] = MAX_FRAMES, overflow_strategy: Optional[str] = "uniform") -> np.ndarray:
    """The frame indices transformers' EmbeddingGemma2VideoProcessor.sample_frames keeps of a video of `total`
    frames at `fps` lasting `duration` seconds: one per 1 / target_fps seconds (all of them where the rate or
    duration is unknown), then at most max_frames of those, the first ones ("truncate") or spread evenly."""
    if target_fps is None or fps is None or duration is None:
        indices = np.arange(total, dtype=int)
    else:
        step = fps / target_fps  # source frames per sampled frame
        indices = np.array([min(total - 1, int(i * step)) for i in range(max(1, int(duration * target_fps)))],
                           dtype=int)
    if overflow_strategy is not None and len(indices) > max_frames:
        if overflow_strategy == "truncate":
            indices = indices[:max_frames]
        else:
            indices = indices[np.linspace(0, len(indices) - 1, max_frames, dtype=int)]
    return indices


class EmbeddingGemma2VideoProcessor(Gemma4VideoProcessor):
    """Gemma 4's video processor (its frames' pixels, patches and budget) with EmbeddingGemma 2's sampling. A
    video is a file (path or bytes), its decoded frames (an (n, H, W, 3) uint8 array), or a (frames,
    timestamps) pair (frames decoded, with their times)."""

    def __init__(self, image_processor, max_soft_tokens: int = VIDEO_SOFT_TOKENS, fps: Optional[float] = FPS,
                 max_frames: Optional[int] = MAX_FRAMES, overflow_strategy: Optional[str] = "uniform",
                 add_timestamps: bool = False, do_sample_frames: bool = True):
        super().__init__(image_processor, NUM_FRAMES, max_soft_tokens)
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise MlxGemmaError(f"video_processor: fps is {fps!r}, expected a positive number or null")
        if overflow_strategy is not None and overflow_strategy not in OVERFLOW_STRATEGIES:
            raise MlxGemmaError(f"video_processor: overflow_strategy is {overflow_strategy!r}, expected one of "
                                f"{', '.join(OVERFLOW_STRATEGIES)} or null")
        if overflow_strategy is not None and not (isinstance(max_frames, int) and not isinstance(max_frames, bool)
                                                  and max_frames > 0):
            raise MlxGemmaError(f"video_processor: max_frames is {max_frames!r}, expected a positive integer (an "
                                "overflow_strategy needs one)")
        for name, value in (("add_timestamps", add_timestamps), ("do_sample_frames", do_sample_frames)):
            if not isinstance(value, bool):
                raise MlxGemmaError(f"video_processor: {name} is {value!r}, expected true or false")
        self.fps, self.max_frames, self.overflow_strategy = fps, max_frames, overflow_strategy
        self.add_timestamps, self.do_sample_frames = add_timestamps, do_sample_frames

    @classmethod
    def from_dict(cls, options: dict, image_options: dict,
                  frame_processor_class=Gemma4VideoFrameProcessor) -> "EmbeddingGemma2VideoProcessor":
        """From the video processor's config block; the frames as Gemma 4's (Gemma4VideoProcessor.from_dict)."""
        frames = Gemma4VideoProcessor.from_dict(options, image_options, frame_processor_class).image_processor
        names = ("fps", "max_frames", "overflow_strategy", "add_timestamps", "do_sample_frames")
        return cls(frames, options.get("max_soft_tokens") or VIDEO_SOFT_TOKENS,
                   **{k: options[k] for k in names if k in options})

    def sample(self, total: int, fps: Optional[float], duration: Optional[float]) -> np.ndarray:
        if not self.do_sample_frames:
            return np.arange(total, dtype=int)
        return sample_frames(total, fps, duration, self.fps, self.max_frames, self.overflow_strategy)

    def frames_of(self, video) -> tuple:
        """(frames, their timestamps in seconds, or None where no rate is known)."""
        if isinstance(video, (np.ndarray, tuple)):
            frames, times = video if isinstance(video, tuple) else (video, None)
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or not len(frames):
                raise MlxGemmaError(f"a decoded video is (frames, height, width, channels), got shape {frames.shape}")
            keep = self.sample(len(frames), None, None)
            return frames[keep], None if times is None else [times[i] for i in keep]
        return load_video(video, sample=lambda total, fps: self.sample(total, fps, total / fps))


class EmbeddingGemma2Processor(Gemma4Processor):
    """processor(text=None, images=(), audio=(), videos=(), max_soft_tokens=None) -> transformers' inputs as
    numpy arrays (input_ids, attention_mask, pixel_values, image_position_ids, input_features,
    input_features_mask, pixel_values_videos, video_position_ids, num_frames_per_video). text: a prompt or a
    list, each marking its media with `<|image|>`, `<|audio|>`, `<|video|>`, or None (see the module's note).
    Media: one item or a list in prompt order, or a list of lists, one per prompt. Loaded as Gemma 4's is
    (from_pretrained(path, tokenizer, config): processor_config.json, preprocessor_config.json,
    video_preprocessor_config.json)."""

    video_processor_class = EmbeddingGemma2VideoProcessor
    checkpoint_name = "EmbeddingGemma 2"

    def _video(self, video, budget: Optional[int] = None) -> tuple:
        if self.video_processor is None or self.video_token is None:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint takes no video")
        out = self.video_processor([video], max_soft_tokens=budget)
        n, stamps = int(out["num_soft_tokens_per_video"][0]), out["timestamps"][0]
        frames = len(out["pixel_values_videos"])
        block = self.boi_token + self.video_token * n + self.eoi_token
        if not self.video_processor.add_timestamps:
            text = block * frames
        elif stamps is None:
            raise MlxGemmaError("add_timestamps needs each frame's time: give the video as a file, or as a (frames, "
                                "timestamps) pair")
        else:
            seconds = [round(float(s)) for s in stamps]  # (rounded, not floored: 29.97 fps lands just under)
            text = " ".join(f"{s // 60:02d}:{s % 60:02d} {block}" for s in seconds)
        item = {"pixel_values_videos": out["pixel_values_videos"], "video_position_ids": out["video_position_ids"],
                "blocks": frames}
        return item, text

    def prepare(self, text=None, images=(), audio=(), videos=(), max_soft_tokens: Optional[int] = None,
                add_special_tokens: Optional[bool] = None) -> tuple:
        per_prompt = {kind: _per_prompt(kind, items) for kind, items in
                      (("image", images), ("video", videos), ("audio", audio))}
        if text is None:
            text = self.placeholder_text(per_prompt)
        flat = {kind: [x for prompt in groups for x in prompt] for kind, groups in per_prompt.items()}
        out, items = super().prepare(text, flat["image"], flat["audio"], flat["video"], max_soft_tokens,
                                     add_special_tokens)
        out.pop("mm_token_type_ids")
        return out, items

    def __call__(self, text=None, images=(), audio=(), videos=(), max_soft_tokens: Optional[int] = None,
                 add_special_tokens: Optional[bool] = None) -> dict:
        return self.prepare(text, images, audio, videos, max_soft_tokens, add_special_tokens)[0]

    def placeholder_text(self, per_prompt: dict) -> List[str]:
        """The prompts transformers writes when no text is given: per prompt, its images' marks, then its videos',
        then its clips', joined by spaces."""
        given = [(kind, groups) for kind, groups in per_prompt.items() if groups]
        if not given:
            raise MlxGemmaError("nothing to embed: give text, images, audio or videos")
        sizes = {kind: len(groups) for kind, groups in given}
        if len(set(sizes.values())) > 1:
            raise MlxGemmaError(f"without text, each medium must give as many prompts: got "
                                f"{', '.join(f'{n} of {kind}' for kind, n in sizes.items())} (a flat list of images "
                                "is one prompt, of videos or clips one prompt each; a list of lists, one per prompt)")
        return [" ".join(self.marks[kind] for kind, groups in given for _ in groups[i])
                for i in range(len(given[0][1]))]


def _per_prompt(kind: str, items) -> List[list]:
    """Media as transformers groups them by prompt when no text is given: a list of lists as it is; one item as
    one prompt; a flat list as one prompt (images) or one prompt per item (videos, clips)."""
    items = listed(items)
    if items and all(isinstance(x, list) for x in items):
        return [list(x) for x in items]
    if kind == "image":
        return [items] if items else []
    return [[x] for x in items]

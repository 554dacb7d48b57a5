"""Video for Gemma 4, as transformers' Gemma4VideoProcessor (and the 12B Unified's Gemma4UnifiedVideoProcessor)
prepares it, without torch: frames decoded by PyAV (FFmpeg), 32 of them sampled evenly (transformers'
default_sample_indices_fn: frame i * total // 32), each resized to the video budget (70 soft tokens by
default, the video processor's own) and patchified as the model's images are (the same aspect-ratio rule,
patches and positions). The prompt gives each frame its timestamp, "mm:ss", from its index / fps.

Gemma 4's images follow transformers' PIL backend (gemma4_images.py), but its video processor runs only on the
torchvision backend, so its frames go through Gemma4VideoFrameProcessor: Gemma 4's image layout on that
backend's pixels (torchvision_backend.py): arrays to RGB as torchvision converts them, torchvision's
antialiased bicubic resize of uint8 (not Pillow's), and the fused rescale and normalisation in float32 (mean
0 and std 1 by default: (x - 0) / 255). The 12B Unified's image processor is already on that backend, so its
frames go through it.

One difference from transformers, where it has no answer: a video of fewer frames than asked for gives all of
them (transformers raises). And one not restated: an RGBA video (PyAV decodes to RGB, so only frames given as
arrays) transformers blends to float frames before resizing them; here the frame is blended to uint8 as an
RGBA image is."""

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import MlxGemmaError
from .gemma4_images import Gemma4ImageProcessor
from .torchvision_backend import rescale_and_normalize, resize_bicubic, torchvision_rgb

NUM_FRAMES, VIDEO_SOFT_TOKENS = 32, 70  # Gemma4VideoProcessor's defaults (Gemma4UnifiedVideoProcessor's too)
# Where the video processors' defaults differ from their image processors': they normalise (mean 0, std 1),
# which in float32 is (x - 0) / 255, not always x * (1 / 255) (torchvision_backend.rescale_and_normalize). A
# video processor's config block wins over them.
FRAME_OPTIONS = {"do_normalize": True}


def sample_indices(total: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """transformers' default_sample_indices_fn with num_frames: evenly spaced, the first frame first."""
    n = min(num_frames, total)
    return np.arange(n, dtype=int) * total // n


def load_video(source, num_frames: int = NUM_FRAMES, sample=None) -> tuple:
    """(frames (n, H, W, 3) uint8 at the sampled indices, their timestamps in seconds) of a video file (a path
    or its bytes): two passes over the decoded frames (one to count them where the container does not say, one
    to keep the sampled ones), so a long video is never held whole. sample(total frames, fps) -> the indices
    to keep (by default sample_indices with num_frames; EmbeddingGemma 2 samples by rate)."""
    import io

    import av

    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MlxGemmaError(f"video {str(path)!r} not found" if not path.exists() else
                                f"video {str(path)!r} is not a regular file")
        what, opener = f"video {str(path)!r}", lambda: av.open(str(path))
    elif isinstance(source, (bytes, bytearray)):
        what, opener = "the video", lambda: av.open(io.BytesIO(bytes(source)))
    else:
        raise MlxGemmaError(f"a video is a file path or its bytes, not {type(source).__name__}")
    try:
        with opener() as container:
            if not container.streams.video:
                raise MlxGemmaError(f"{what} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            total = stream.frames or sum(1 for _ in container.decode(stream))
        sample = sample or (lambda n, _: sample_indices(n, num_frames))
        keep = set(np.asarray(sample(total, fps)).tolist()) if total else set()
        frames = []
        with opener() as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as e:
        raise MlxGemmaError(f"{what} cannot be decoded ({e})") from None
    if not frames:
        raise MlxGemmaError(f"{what} has no frames")
    return np.stack(frames), [i / fps for i in sorted(keep)[:len(frames)]]


class Gemma4VideoFrameProcessor(Gemma4ImageProcessor):
    """A Gemma 4 video's frames as transformers' Gemma4VideoProcessor prepares them: Gemma 4's image layout
    (patch_size patches, their positions and padding, a soft token per pooling_kernel_size**2 patches) on its
    torchvision backend's pixels. Options and inputs as Gemma4ImageProcessor's (from_dict with FRAME_OPTIONS
    gives the video processor's defaults)."""

    array_to_rgb = staticmethod(torchvision_rgb)
    resamples = (Image.Resampling.BICUBIC,)  # (resize_bicubic: torchvision's other modes are not restated here)

    def resize(self, image: Image.Image, size: tuple) -> Image.Image:
        return Image.fromarray(resize_bicubic(np.asarray(image), *size))

    def rescale_and_normalize(self, x: np.ndarray) -> np.ndarray:
        return rescale_and_normalize(x, self.rescale_factor, self.mean, self.std)


class Gemma4VideoProcessor:
    """processor([video], max_soft_tokens=None) -> {"pixel_values_videos" (frames, max_patches, 3 * patch^2),
    "video_position_ids" (frames, max_patches, 2), "num_soft_tokens_per_video" (soft tokens per frame, one
    entry per video), "timestamps" (seconds, per video; None where frames_of knows none)}. A video is a file
    path or bytes, or an (frames, timestamps) pair already decoded."""

    def __init__(self, image_processor: Gemma4ImageProcessor, num_frames: int = NUM_FRAMES,
                 max_soft_tokens: int = VIDEO_SOFT_TOKENS):
        if not (isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames > 0):
            raise MlxGemmaError(f"video_processor: num_frames is {num_frames!r}, expected a positive integer")
        self.image_processor, self.num_frames = image_processor, num_frames
        self.max_soft_tokens = image_processor.check_budget(max_soft_tokens, "video_processor: max_soft_tokens")

    @classmethod
    def from_dict(cls, options: dict, image_options: dict,
                  frame_processor_class=Gemma4VideoFrameProcessor) -> "Gemma4VideoProcessor":
        """From the video processor's config block (`options`) and the image processor's: frames take the
        image processor's patch geometry (the model's), then FRAME_OPTIONS, then the video block's options."""
        geometry = {k: image_options[k] for k in ("patch_size", "pooling_kernel_size") if k in image_options}
        frames = {k: v for k, v in {**FRAME_OPTIONS, **geometry, **options}.items() if k != "max_soft_tokens"}
        return cls(frame_processor_class.from_dict(frames), options.get("num_frames") or NUM_FRAMES,
                   options.get("max_soft_tokens") or VIDEO_SOFT_TOKENS)

    def __call__(self, videos, max_soft_tokens: Optional[int] = None) -> dict:
        budget = self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens
        pixels, positions, tokens, stamps = [], [], [], []
        for video in videos:
            frames, times = self.frames_of(video)
            out = self.image_processor(list(frames), max_soft_tokens=budget)
            pixels.append(out["pixel_values"])
            positions.append(out["image_position_ids"])
            tokens.append(int(out["num_soft_tokens_per_image"][0]))
            stamps.append(None if times is None else list(times))
        return {"pixel_values_videos": np.concatenate(pixels), "video_position_ids": np.concatenate(positions),
                "num_soft_tokens_per_video": tokens, "timestamps": stamps}

    def frames_of(self, video) -> tuple:
        """(frames, their timestamps in seconds) of a video: a file (its path or bytes) decoded and sampled, or
        an (frames, timestamps) pair already decoded, as it is."""
        return video if isinstance(video, tuple) else load_video(video, self.num_frames)

"""transformers' Gemma4UnifiedImageProcessor, Gemma4UnifiedVideoProcessor, Gemma4VideoProcessor and
EmbeddingGemma2VideoProcessor have only a torchvision backend, and torchvision is not installed here: their modules are imported with a stand-in for
torchvision.transforms.v2.functional holding what the processors call, restated from torchvision 0.2x
(v2/functional/_geometry.py resize_image, _misc.py normalize_image, _color.py grayscale_to_rgb_image,
_type_conversion / _misc.py to_dtype_image) for the cases met: CPU tensors, bicubic on uint8 (native in
torchvision: no cast), RGB(A) or grey, an image (C, H, W) or a video's frames (T, C, H, W).

timm (Gemma 3n's vision tower, MobileNet-V5) imports torchvision too: import_timm imports it with stand-ins
for the names it reads, and timm_wrapper lets transformers' TimmWrapperModel build with that timm."""

import enum
import importlib
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

SETTINGS = ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size",
            "max_soft_tokens", "pooling_kernel_size")


def _tv_resize(image, size, interpolation=None, antialias=True, max_size=None):
    # (a whole processor passes PIL's BICUBIC, 3: its mapping to torchvision's modes needs torchvision)
    assert interpolation in ("bicubic", 3) and image.dtype == torch.uint8 and antialias
    if list(image.shape[-2:]) == list(size):
        return image
    batch = image if image.ndim == 4 else image[None]  # (resize_image folds leading axes into one batch)
    out = torch.nn.functional.interpolate(batch, size=list(size), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out if image.ndim == 4 else out[0]


def _tv_normalize(image, mean, std, inplace=False):
    mean, std = (torch.as_tensor(v, dtype=image.dtype).view(-1, 1, 1) for v in (mean, std))
    return (image if inplace else image.clone()).sub_(mean).div_(std)


def _tv_to_dtype(image, dtype=torch.float32, scale=False):
    if image.is_floating_point() and not dtype.is_floating_point:
        return image.mul(255 + 1.0 - 1e-3).to(dtype)
    return image.to(dtype).mul_(1.0 / 255)


def _settings(cls, options: dict) -> dict:
    settings = {k: getattr(cls, k) for k in SETTINGS}
    settings.update(options)
    # (tuples: the backend caches its fused mean and std by these arguments)
    settings["image_mean"], settings["image_std"] = tuple(settings["image_mean"]), tuple(settings["image_std"])
    return settings


def _functional():
    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.resize, functional.normalize, functional.to_dtype = _tv_resize, _tv_normalize, _tv_to_dtype
    functional.grayscale_to_rgb = lambda image: image.repeat(3, 1, 1) if image.shape[-3] == 1 else image
    functional.InterpolationMode = SimpleNamespace(BICUBIC="bicubic")
    return functional


FUNCTIONAL = _functional()


def _import(module: str):
    """A transformers module that imports torchvision, imported with the stand-in as
    torchvision.transforms.v2.functional (and transformers told torchvision v2 is there: Gemma 4's video module
    imports it only then); afterwards neither the stand-in nor the module stays in sys.modules (the classes
    taken from it keep what it bound)."""
    from transformers import utils

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    name = "transformers.models." + module
    saved = {n: sys.modules.get(n) for n in names}
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]] = FUNCTIONAL
    sys.modules["torchvision.transforms.v2"].functional = FUNCTIONAL
    available, utils.is_torchvision_v2_available = utils.is_torchvision_v2_available, lambda: True
    try:
        return importlib.import_module(name)
    finally:
        utils.is_torchvision_v2_available = available
        sys.modules.pop(name, None)
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@contextmanager
def _backend():
    """The torchvision backend's functions (normalize) call the stand-in while the block runs."""
    from transformers import image_processing_backends as backends

    had = getattr(backends, "tvF", None)
    backends.tvF = FUNCTIONAL  # (the backend module binds it only where torchvision imports)
    try:
        yield
    finally:
        if had is None:
            del backends.tvF
        else:
            backends.tvF = had  # (a block within another's)


def _reference(cls):
    """An object running cls's own _preprocess and aspect_ratio_preserving_resize with the torchvision backend's
    process_image, convert_to_rgb, rescale_and_normalize (what they call)."""
    from transformers import image_processing_backends as backends

    backend = backends.TorchvisionBackend
    return type(cls.__name__ + "Reference", (), dict(
        process_image=backend.process_image, convert_to_rgb=backend.convert_to_rgb,
        rescale_and_normalize=backend.rescale_and_normalize, normalize=backend.normalize, rescale=backend.rescale,
        _fuse_mean_std_and_rescale_factor=backend._fuse_mean_std_and_rescale_factor,
        _preprocess=cls._preprocess, aspect_ratio_preserving_resize=cls.aspect_ratio_preserving_resize))()


def _video_runner(cls):
    ref = _reference(cls)

    def run_videos(items, **options):
        # (as the base video processor's _prepare_input_videos: (T, H, W, C) arrays to (T, C, H, W) tensors)
        tensors = [torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).contiguous() for v in items]
        out = ref._preprocess(tensors, resample="bicubic", return_tensors="np", **_settings(cls, options))
        return {k: np.asarray(v) for k, v in out.items()}

    return run_videos


@contextmanager
def unified_processors():
    """(image, video): callables like transformers' Gemma4UnifiedImageProcessor (images, **options) and
    Gemma4UnifiedVideoProcessor (videos: (frames, H, W, 3) uint8 arrays already sampled, **options), each
    running its class's own code (_preprocess, aspect_ratio_preserving_resize; the torchvision backend's
    process_image, convert_to_rgb, rescale_and_normalize) with its class defaults under the options given."""
    images = _import("gemma4_unified.image_processing_gemma4_unified").Gemma4UnifiedImageProcessor
    videos = _import("gemma4_unified.video_processing_gemma4_unified").Gemma4UnifiedVideoProcessor
    with _backend():

        def run_images(items, **options):
            ref = _reference(images)
            tensors = [ref.process_image(image, do_convert_rgb=True) for image in items]
            out = ref._preprocess(tensors, resample="bicubic", return_tensors="np", **_settings(images, options))
            return {k: np.asarray(v) for k, v in out.items()}

        yield run_images, _video_runner(videos)


@contextmanager
def gemma4_video_processor():
    """A callable like transformers' Gemma4VideoProcessor (videos: (frames, H, W, 3) uint8 arrays already
    sampled, **options): its own _preprocess and aspect_ratio_preserving_resize on the torchvision backend, with
    its class defaults under the options given."""
    videos = _import("gemma4.video_processing_gemma4").Gemma4VideoProcessor
    with _backend():
        yield _video_runner(videos)


@contextmanager
def embedding_gemma2_processor(tokenizer, image_processor, feature_extractor, **video_options):
    """transformers' whole EmbeddingGemma2Processor (its own __call__: layout, placeholders, text left out) over
    the given parts and its EmbeddingGemma2VideoProcessor (video_options: its settings), the video processor
    imported with the stand-in and run on the torchvision backend's functions while the block runs."""
    from transformers.models.embedding_gemma2.processing_embedding_gemma2 import EmbeddingGemma2Processor

    videos = _import("embedding_gemma2.video_processing_embedding_gemma2").EmbeddingGemma2VideoProcessor

    def check_argument_for_proper_class(self, argument_name, argument):
        return None  # (it looks the video processor's class up among torchvision's, which are not here)

    # (under transformers' name: save_pretrained writes it into the processor's and tokenizer's files)
    reference = type("EmbeddingGemma2Processor", (EmbeddingGemma2Processor,),
                     {"check_argument_for_proper_class": check_argument_for_proper_class})

    from transformers import video_processing_utils

    had = getattr(video_processing_utils, "tvF", None)
    video_processing_utils.tvF = FUNCTIONAL  # (its convert_to_rgb calls it; bound only where torchvision imports)
    try:
        with _backend():
            yield reference(feature_extractor=feature_extractor, image_processor=image_processor,
                            tokenizer=tokenizer, video_processor=videos(**video_options))
    finally:
        if had is None:
            del video_processing_utils.tvF
        else:
            video_processing_utils.tvF = had


# ---- timm -----------------------------------------------------------------------------------------------
# timm 1.0.31 imports torchvision at import time (its data pipeline and a few layers) but calls none of it to
# build or run MobileNet-V5 (Gemma 3n's vision tower): these are the names it reads.
TIMM_READS = {
    "torchvision.transforms.functional": lambda: {"InterpolationMode": enum.Enum("InterpolationMode", {
        k: k.lower() for k in ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})},
    "torchvision.transforms": lambda: {"ToTensor": type("ToTensor", (), {})},
    "torchvision.ops.misc": lambda: {"FrozenBatchNorm2d": type("FrozenBatchNorm2d", (), {})},
    "torchvision.ops": dict,
    "torchvision.datasets": lambda: {n: type(n, (), {}) for n in (
        "CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder")},
    "torchvision": lambda: {"__version__": "0.0-stand-in"},
}


def import_timm():
    """timm, imported with stand-ins for the torchvision modules it reads; afterwards no stand-in stays in
    sys.modules (transformers' availability checks would take them for torchvision). ImportError where timm is
    not installed (.ci/run installs it with --no-deps)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    import transformers  # noqa: F401  (its own torchvision check first, without the stand-ins)

    saved = {n: sys.modules.get(n) for n in TIMM_READS}
    for name, names in TIMM_READS.items():
        module = types.ModuleType(name)
        module.__dict__.update(names())
        module.__path__ = []
        sys.modules[name] = module
    for name in TIMM_READS:  # (each submodule as an attribute of its parent, as an import binds it)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        return importlib.import_module("timm")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextmanager
def timm_wrapper():
    """transformers' TimmWrapperModel (the class Gemma3nModel's vision tower is), able to build timm models
    while the block runs: its module handed the timm import_timm gives (it binds timm only where transformers
    finds torchvision) and its backend check skipped."""
    from transformers.models.timm_wrapper import modeling_timm_wrapper as wrapper

    saved = {name: getattr(wrapper, name, None) for name in ("timm", "requires_backends")}
    wrapper.timm, wrapper.requires_backends = import_timm(), lambda *args, **kwargs: None
    try:
        yield wrapper.TimmWrapperModel
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(wrapper, name)
            else:
                setattr(wrapper, name, value)

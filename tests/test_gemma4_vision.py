"""Gemma 4's vision tower and image processor against transformers 5.23's Gemma4VisionModel (float32, eager
attention, every weight randomised, std_bias/std_scale and clip bounds set to values that act) and
Gemma4ImageProcessorPil: one image and two of different shapes in one padded batch, standardize and clipped
linears each on and off, float16/bfloat16; the processor at every budget over tiny, thin and ordinary sizes,
every image mode and input kind; bad inputs as one-line MlxGemmaErrors. Video frames against transformers'
Gemma4VideoProcessor, which runs on its torchvision backend (through torchvision_stand_in.py)."""

import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Gemma4ImageProcessorPil
from transformers import Gemma4VisionConfig as HFVisionConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel as HFVisionModel

from mlxgemma.errors import MlxGemmaError
import gemma4_media_util as media
import torchvision_stand_in
from mlxgemma.media.gemma4_images import SUPPORTED_SOFT_TOKENS, Gemma4ImageProcessor
from mlxgemma.media.gemma4_video import Gemma4VideoProcessor
from mlxgemma.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionModel
from reference import TOL, max_diff, randomize

# GQA (2 heads, 1 KV head), head_dim 16 (4 rope frequencies per axis), 2x2 pooling of 4x4-pixel patches; the
# rope as the released config.json files write it ("default", which transformers reads as "axial").
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=160,
              rope_parameters={"rope_type": "default", "rope_theta": 100.0})
SMALL = dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)  # 280 patches an image
VARIANTS = [dict(use_clipped_linears=c, standardize=s) for c in (False, True) for s in (False, True)]


def hf_vision(seed=0, **overrides):
    hf = randomize(HFVisionModel(HFVisionConfig(**dict(VISION, **overrides), attn_implementation="eager")), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=gen))
            elif name.endswith("std_scale"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith(("_min", "_max")):  # bounds within the activations' range: they clip
                bound = 0.3 + 0.5 * torch.rand((), generator=gen)
                b.fill_(-bound if name.endswith("_min") else bound)
    return hf


def weights_of(hf, dtype=mx.float32) -> dict:
    return {k: mx.array(v.float().numpy()).astype(dtype) for k, v in hf.state_dict().items()}


def ours(config: dict, weights: dict) -> Gemma4VisionModel:
    model = Gemma4VisionModel(Gemma4VisionConfig.from_dict(config, "vision_config", require=False))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def hf_out(hf, inputs) -> np.ndarray:
    with torch.no_grad():
        out = hf(pixel_values=torch.tensor(inputs["pixel_values"]),
                 pixel_position_ids=torch.tensor(inputs["image_position_ids"])).last_hidden_state
    return out.float().numpy()


def random_image(height, width, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}.get(mode, 3)
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "LA"):
        return Image.fromarray(array, mode)
    if mode == "L":
        return Image.fromarray(array[..., 0], "L")
    return Image.fromarray(array).convert(mode)  # P, 1, ...


@pytest.fixture(scope="module")
def batches():
    """One image, and two of other shapes, both padded, the first by half (10x177: its ideal 15.9 x 281.6
    pixels round down to 8 x 280, 140 of 280 patches)."""
    processor = Gemma4ImageProcessor(**SMALL)
    return {"one": processor(random_image(40, 60, seed=1)),
            "two": processor([random_image(10, 177, seed=2), random_image(90, 20, seed=3)])}


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"clip{int(v['use_clipped_linears'])}-"
                                                               f"std{int(v['standardize'])}")
def pair(request):
    hf = hf_vision(**request.param)
    return request.param, hf, ours(dict(VISION, **request.param), weights_of(hf))


@pytest.mark.parametrize("batch", ["one", "two"])
def test_matches_transformers(pair, batches, batch):
    _, hf, model = pair
    inputs = batches[batch]
    ref, out = hf_out(hf, inputs), model(inputs["pixel_values"], inputs["image_position_ids"])
    assert out.dtype == mx.float32 and out.shape == ref.shape
    assert max_diff(ref, out) <= TOL
    counts = model.soft_tokens_per_image(inputs["image_position_ids"])
    assert counts == inputs["num_soft_tokens_per_image"].tolist() and sum(counts) == ref.shape[0]
    if batch == "two":  # padding is exercised, differently in each image
        padding = (inputs["image_position_ids"] == -1).all(-1).sum(-1)
        assert counts[0] != counts[1] and padding.min() > 0 and padding[0] >= 140
        # MLX arrays in, the same out
        again = model(mx.array(inputs["pixel_values"]), mx.array(inputs["image_position_ids"]))
        assert max_diff(again, out) == 0


def test_clip_bounds_and_standardize_act(pair, batches):
    """The bounds and the standardisation change the output: the comparison above tests them."""
    config, hf, model = pair
    if not (config["use_clipped_linears"] or config["standardize"]):
        pytest.skip("nothing to switch off")
    weights = weights_of(hf)
    for k in weights:
        if k.endswith(("_min", "_max")):
            weights[k] = mx.array(float("-inf") if k.endswith("_min") else float("inf"))
        elif k == "std_bias":
            weights[k] = mx.zeros_like(weights[k])
        elif k == "std_scale":
            weights[k] = mx.ones_like(weights[k])
    inputs = batches["two"]
    plain = ours(dict(VISION, **config), weights)(inputs["pixel_values"], inputs["image_position_ids"])
    assert max_diff(plain, model(inputs["pixel_values"], inputs["image_position_ids"])) > 1000 * TOL


@pytest.fixture(scope="module")
def float32_reference(batches):
    hf = hf_vision(use_clipped_linears=True, standardize=True)
    return hf_out(hf, batches["two"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(batches, float32_reference, dtype):
    """In half precision the output keeps the model's dtype (norms, pooling and standardize in float32, the
    bounds cast to the activations' dtype, as transformers does). Half-precision matmuls round differently
    (MLX's attention keeps its scores in float32, torch's eager path rounds them), so the check is that our
    error against the float32 reference is within transformers' own error in that dtype plus one rounding
    of the output (measured: bf16 0.228 against transformers' 0.217, fp16 0.035 against 0.038)."""
    config = dict(use_clipped_linears=True, standardize=True)
    hf = hf_vision(**config).to(getattr(torch, dtype))
    model = ours(dict(VISION, **config), weights_of(hf, getattr(mx, dtype)))
    inputs = batches["two"]
    ref, out = hf_out(hf, inputs), model(inputs["pixel_values"], inputs["image_position_ids"])
    assert out.dtype == getattr(mx, dtype)
    scale = np.abs(float32_reference).max()
    ulp = 2.0 ** np.floor(np.log2(scale)) * float(torch.finfo(getattr(torch, dtype)).eps)
    assert max_diff(float32_reference, out.astype(mx.float32)) <= max_diff(float32_reference, ref) + ulp


def test_sanitize():
    """transformers' names pass; what transformers ignores (the rotary inv_freq, the bounds of a config that
    does not clip) is dropped, as mlx-vlm drops it."""
    weights = weights_of(hf_vision(use_clipped_linears=True))
    extra = {"encoder.rotary_emb.inv_freq": mx.zeros((4,))}
    clipped = Gemma4VisionModel(Gemma4VisionConfig.from_dict(dict(VISION, use_clipped_linears=True), require=False))
    assert clipped.sanitize({**weights, **extra}).keys() == weights.keys()
    plain = Gemma4VisionModel(Gemma4VisionConfig.from_dict(VISION, require=False))
    kept = plain.sanitize(weights)
    assert kept.keys() == {k for k in weights if not k.endswith(("_min", "_max"))}
    plain.load_weights(list(kept.items()), strict=True)


def test_config():
    config = Gemma4VisionConfig.from_dict({}, require=False)
    hf = HFVisionConfig()
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "pooling_kernel_size", "patch_size", "position_embedding_size", "use_clipped_linears",
                 "standardize", "rope_parameters", "rms_norm_eps"):
        assert getattr(config, name) == getattr(hf, name), name
    for given in ({"rope_theta": 50.0}, {"rope_type": "default"}, {"rope_type": "axial", "rope_theta": 7.0}):
        ours_ = Gemma4VisionConfig.from_dict({"rope_parameters": dict(given)}, require=False).rope_parameters
        assert ours_ == HFVisionConfig(rope_parameters=dict(given)).rope_parameters
    bad = [dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), dict(head_dim=18), dict(pooling_kernel_size=1),
           dict(num_key_value_heads=5), dict(hidden_activation="tanh"), dict(position_embedding_size=0)]
    for fields in bad:
        with pytest.raises(MlxGemmaError) as e:
            Gemma4VisionConfig.from_dict(dict(VISION, **fields), "vision_config", require=False)
        assert "\n" not in str(e.value)


def test_model_bad_inputs(batches):
    model = Gemma4VisionModel(Gemma4VisionConfig.from_dict(VISION, require=False))
    pixels, positions = batches["two"]["pixel_values"], batches["two"]["image_position_ids"]
    only_padding = positions.copy()
    only_padding[1] = -1
    far = positions.copy()
    far[0, 0] = (500, 0)
    cases = [(pixels[:, :, :-1], positions), (pixels, positions.astype(np.float32)), (pixels, positions[..., :1]),
             (pixels[:, :-1], positions[:, :-1]), (pixels, only_padding), (pixels, far)]
    for p, pos in cases:
        with pytest.raises(MlxGemmaError) as e:
            model(p, pos)
        assert "\n" not in str(e.value)


# --- the image processor ---

SIZES = [(1, 1), (3, 3), (1, 500), (500, 1), (2, 700), (37, 91), (50, 80), (300, 300), (768, 1024), (1000, 7)]


@pytest.fixture(scope="module")
def processors():
    return Gemma4ImageProcessorPil(), Gemma4ImageProcessor()


def same(ref, out) -> None:
    assert ref["pixel_values"].shape == out["pixel_values"].shape
    assert ref["pixel_values"].dtype == out["pixel_values"].dtype == np.float32
    assert max_diff(ref["pixel_values"], out["pixel_values"]) == 0  # (within 1/255 asked; measured: exact)
    assert np.array_equal(ref["image_position_ids"], out["image_position_ids"])
    assert out["image_position_ids"].dtype == np.int64
    assert np.array_equal(ref["num_soft_tokens_per_image"], out["num_soft_tokens_per_image"])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_processor_every_budget(processors, size):
    ref_p, our_p = processors
    image = random_image(*size, seed=sum(size))
    for budget in SUPPORTED_SOFT_TOKENS:
        ref, out = ref_p(image, max_soft_tokens=budget, return_tensors="np"), our_p(image, max_soft_tokens=budget)
        same(ref, out)
        assert out["pixel_values"].shape[1] == budget * 9 and out["num_soft_tokens_per_image"][0] <= budget


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "1", "CMYK", "I;16"])
def test_processor_modes(processors, mode):
    ref_p, our_p = processors
    if mode == "PA":
        image = random_image(41, 67, "RGBA", seed=5).convert("PA")
    elif mode == "I;16":
        image = Image.fromarray(np.random.default_rng(6).integers(0, 65535, (41, 67), dtype=np.uint16))
    else:
        image = random_image(41, 67, mode, seed=7)
    assert image.mode == mode
    same(ref_p(image, max_soft_tokens=140, return_tensors="np"), our_p(image, max_soft_tokens=140))
    # a palette image with a transparent index: composited on white as transformers does
    palette = random_image(30, 20, "P", seed=8)
    palette.info["transparency"] = 3
    same(ref_p(palette, return_tensors="np"), our_p(palette))


def test_processor_inputs(processors, tmp_path):
    """A batch of different shapes; arrays (RGB, RGBA, grey HW1: transformers' own array path), encoded bytes
    and a file path, which give what their decoded image gives."""
    ref_p, our_p = processors
    rng = np.random.default_rng(9)
    arrays = [rng.integers(0, 256, (17, 45, c), dtype=np.uint8) for c in (3, 4, 1)]
    same(ref_p(arrays, return_tensors="np"), our_p(arrays))
    images = [random_image(20, 90, "RGBA", seed=10), random_image(64, 48, seed=11), random_image(5, 5, "L", seed=12)]
    same(ref_p(images, max_soft_tokens=70, return_tensors="np"), our_p(images, max_soft_tokens=70))
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buffer.getvalue())
    same(our_p(images[0]), our_p(buffer.getvalue()))
    same(our_p(images[0]), our_p(str(path)))
    # an HW greyscale array (transformers refuses one) is its HW1 array
    same(our_p(arrays[2]), our_p(arrays[2][..., 0]))


def test_processor_from_dict():
    """The released image_processor block (with the size 224x224 some converted copies add, which nothing
    reads), and a config off the defaults, against transformers built from the same fields."""
    released = {"image_processor": {
        "do_convert_rgb": True, "do_normalize": False, "do_rescale": True, "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": 280, "max_soft_tokens": 280, "patch_size": 16, "pooling_kernel_size": 3, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}}
    image = random_image(123, 77, seed=13)
    same(Gemma4ImageProcessorPil().preprocess(image, return_tensors="np"),
         Gemma4ImageProcessor.from_dict(released)(image))
    custom = dict(SMALL, do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4], resample=2,
                  rescale_factor=1 / 250)
    same(Gemma4ImageProcessorPil(**custom)(image, return_tensors="np"), Gemma4ImageProcessor.from_dict(custom)(image))


def test_processor_bad_inputs(processors, tmp_path):
    _, our_p = processors
    cases = [b"not an image", Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 5, 2), np.uint8),
             np.zeros((4, 5, 3), np.float32), str(tmp_path / "missing.png"), 42, []]
    for image in cases:
        with pytest.raises(MlxGemmaError) as e:
            our_p(image)
        assert "\n" not in str(e.value)
    image = random_image(8, 8)
    for budget in (100, 0, True, 70.0, "280"):
        with pytest.raises(MlxGemmaError) as e:
            our_p(image, max_soft_tokens=budget)
        assert "\n" not in str(e.value) and "70, 140, 280, 560, 1120" in str(e.value)
    for config in ({"max_soft_tokens": 64}, {"patch_size": 0}, {"resample": 99}, {"image_std": [1, 0, 1]}, []):
        with pytest.raises(MlxGemmaError) as e:
            Gemma4ImageProcessor.from_dict(config)
        assert "\n" not in str(e.value)
    strict = Gemma4ImageProcessor(do_convert_rgb=False)
    for image in (random_image(8, 8, "RGBA"), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(MlxGemmaError) as e:
            strict(image)
        assert "\n" not in str(e.value)
    assert strict(random_image(8, 8))["pixel_values"].shape == (1, 2520, 768)


# --- video frames: transformers' Gemma4VideoProcessor is torchvision's only ---


@pytest.fixture(scope="module")
def hf_video():
    with torchvision_stand_in.gemma4_video_processor() as run:
        yield run


def test_video_processor_matches_transformers(hf_video, tmp_path):
    """Frames' pixel values, positions and soft tokens equal transformers' Gemma4VideoProcessor's (torchvision's
    antialiased bicubic resize on uint8, its fused rescale and normalisation in float32), for frames given as
    arrays (down- and upscaled, a thin strip, VGA) at three budgets, with the released patch geometry and a
    small one, the video defaults and other options of a config block; and for a video file: 32 frames read by
    transformers' PyAV reader with its default sampling. Frames through Pillow's resize would differ."""
    from functools import partial

    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    def check(got, expected):
        for key in ("pixel_values_videos", "video_position_ids"):
            assert got[key].shape == expected[key].shape and got[key].dtype == expected[key].dtype, key
            assert np.array_equal(got[key], expected[key]), key  # (within 1/255 asked; measured: exact)
        assert got["num_soft_tokens_per_video"] == expected["num_soft_tokens_per_video"].tolist()

    small = dict(patch_size=4, pooling_kernel_size=2)
    for geometry in ({}, small):
        ours = Gemma4VideoProcessor.from_dict({}, geometry)
        for n, h, w in ((3, 24, 40), (2, 31, 217), (2, 96, 64), (1, 480, 640)):
            frames, stamps = media.video(n, h, w, seed=n + h)
            for budget in (70, 140, 280):
                check(ours([(frames, stamps)], max_soft_tokens=budget),
                      hf_video([frames], max_soft_tokens=budget, **geometry))
    frames, stamps = media.video(2, 50, 70, seed=1)
    for options in ({"do_normalize": False}, {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4],
                                              "rescale_factor": 1 / 250, "max_soft_tokens": 140}):
        check(Gemma4VideoProcessor.from_dict(options, small)([(frames, stamps)]),
              hf_video([frames], **small, **options))
    pillow = Gemma4VideoProcessor(Gemma4ImageProcessor(**small, do_normalize=True))([(frames, stamps)])
    assert not np.array_equal(pillow["pixel_values_videos"], hf_video([frames], **small)["pixel_values_videos"])
    path = media.mp4(tmp_path / "clip.mp4", 40, textured=True)
    frames, metadata = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=32))
    for geometry in ({}, small):
        got = Gemma4VideoProcessor.from_dict({}, geometry)([path])
        assert len(frames) == 32 and np.allclose(got["timestamps"][0], metadata.timestamps)
        check(got, hf_video([frames], **geometry))

"""Gemma 3n's vision tower (timm's MobileNet-V5 encoder) against timm's own, run by transformers'
TimmWrapperModel as Gemma3nModel runs it (float32; every parameter randomised, norms, biases and layer scales
included): a narrow variant (channel_multiplier 0.05: every block of the released depth, 5.8M parameters), two
image sizes in a batch of two, the soft tokens Gemma3nModel.get_image_features hands embed_vision, the released
architecture's every weight name and shape, weights in transformers', timm's and mlx-vlm's layouts, bad input.

timm is imported with tests/torchvision_stand_in.py's stand-ins (torchvision is not installed here); .ci/run
installs it with --no-deps. Where the shared environment must not get it: `pip install --no-deps --target DIR
timm` and MLXGEMMA_TIMM_SITE=DIR (default /tmp/timm-site)."""

import math
import os
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from mlxgemma.errors import MlxGemmaError
from mlxgemma.models.gemma3n_vision import Gemma3nVisionConfig, Gemma3nVisionModel
from reference import TOL, max_diff
from torchvision_stand_in import import_timm, timm_wrapper

SITE = os.environ.get("MLXGEMMA_TIMM_SITE", "/tmp/timm-site")
if os.path.isdir(SITE) and SITE not in sys.path:
    sys.path.append(SITE)  # (after the environment's own: an installed timm wins)
try:
    timm = import_timm()
except ImportError:
    pytest.skip("timm is not installed (.ci/run installs it)", allow_module_level=True)

NARROW = {"channel_multiplier": 0.05, "msfa_output_resolution": 2}
# 64 x 64: stages at 16, 8, 4, 2: the MSFA's nearest upsampling doubles, its average pool halves. 70 x 50: odd
# sizes (SAME padding's odd pixel), stage outputs 5 x 4 and 3 x 2: a nearest resize by 5/3 and 2, then bilinear.
SIZES = [(64, 64), (70, 50)]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Convolutions N(0, 1 / fan-in) (activations stay of order one through ~85 blocks), every vector (norm
    weights, the stem's bias, layer scales) N(0, 0.25)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def hf_tower(model_args: dict, seed: int = 0):
    with timm_wrapper() as TimmWrapperModel:
        return randomize(TimmWrapperModel(transformers.Gemma3nVisionConfig(model_args=model_args)), seed)


def our_tower(hf, weights=None) -> Gemma3nVisionModel:
    model = Gemma3nVisionModel(Gemma3nVisionConfig.from_dict(hf.config.to_dict(), "vision_config", require=False))
    if weights is None:
        weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def pixels(size, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (2, 3, *size)).astype(np.float32)


def relative(ours, ref) -> float:
    return max_diff(ours, ref) / float(np.abs(ref).max())


@pytest.fixture(scope="module")
def narrow():
    hf = hf_tower(NARROW)
    return hf, our_tower(hf)


@pytest.mark.parametrize("size", SIZES)
def test_tower_matches_timm(narrow, size):
    hf, ours = narrow
    x = pixels(size, seed=size[0])
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x), do_pooling=False).last_hidden_state.numpy()
    out = ours(x)
    assert out.dtype == mx.float32 and out.shape == (2, 2, 2, 2048)
    assert relative(np.array(out).transpose(0, 3, 1, 2), ref) <= TOL


def test_soft_tokens_are_get_image_features(narrow):
    """At the released output resolution (16 x 16: the 4 x 4 stage output upsampled bilinearly), the 256 tokens
    transformers' Gemma3nModel.get_image_features passes embed_vision (an identity here), as its own code
    reshapes, permutes and scales them."""
    hf = hf_tower({"channel_multiplier": 0.05}, seed=1)
    ours = our_tower(hf)
    config = SimpleNamespace(vision_config=hf.config, vision_soft_tokens_per_image=256, return_dict=True)
    model = SimpleNamespace(config=config, vision_tower=hf, embed_vision=lambda inputs_embeds: inputs_embeds)
    x = pixels((64, 64), seed=3)
    with torch.no_grad():
        ref = transformers.Gemma3nModel.get_image_features(model, torch.tensor(x)).pooler_output.numpy()
    tokens = ours.soft_tokens(x)
    assert tokens.shape == ref.shape == (2, 256, 2048) and ours.config.soft_tokens_per_image == 256
    assert relative(tokens, ref) <= TOL


def torch_meta_state(model_args: dict) -> dict:
    with torch.device("meta"):
        model = timm.create_model("mobilenetv5_300m_enc", pretrained=False, **model_args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_args", [None, {"channel_multiplier": 0.3}, {"channel_multiplier": 1.25}])
def test_architecture_is_timms(model_args):
    """The released tower (model_args null) and other widths: every weight timm builds, named and shaped alike
    (shapes in MLX's layout); the released one holds 294M parameters in 84 blocks."""
    ours = Gemma3nVisionModel(Gemma3nVisionConfig.from_dict({"model_args": model_args}, require=False))
    shapes = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    theirs = {"timm_model." + k: v if len(v) != 4 else (v[0], v[2], v[3], v[1])
              for k, v in torch_meta_state(model_args or {}).items()}
    assert shapes == theirs
    if model_args is None:
        assert sum(math.prod(s) for s in shapes.values()) == 294_126_912
        assert sum(len(stage) for stage in ours.timm_model.blocks) == 84


def test_weight_layouts(narrow):
    """transformers' names (timm_model.*), a bare timm state_dict, and mlx-vlm's conversion (its own sanitize:
    MLX-layout convolutions, the stem's (64, 3, 3, 3) included) load the same arrays."""
    hf, ours = narrow
    vision = pytest.importorskip("mlx_vlm.models.gemma3n.vision", reason="mlx-vlm (.ci/run installs it)")
    torch_weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    vlm = vision.VisionModel.sanitize(None, {"vision_tower." + k: v for k, v in torch_weights.items()})
    assert not np.array_equal(vlm["vision_tower.timm_model.conv_stem.conv.weight"],
                              torch_weights["timm_model.conv_stem.conv.weight"])
    expected = dict(tree_flatten(ours.parameters()))
    for weights in ({k.removeprefix("timm_model."): v for k, v in torch_weights.items()},
                    {k.removeprefix("vision_tower."): v for k, v in vlm.items()}):
        loaded = dict(tree_flatten(our_tower(hf, weights).parameters()))
        assert loaded.keys() == expected.keys()
        assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


def test_mixed_layouts_refused(narrow):
    hf, ours = narrow
    weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    name = "timm_model.blocks.0.0.conv_exp.weight"
    weights[name] = weights[name].transpose(0, 2, 3, 1)
    with pytest.raises(MlxGemmaError, match="mix convolution layouts"):
        ours.sanitize(weights)


@pytest.mark.parametrize("pixel_values, message", [
    (np.zeros((3, 32, 32), np.float32), "shape"),
    (np.zeros((1, 32, 32, 3), np.float32), "channels first"),
    (np.zeros((1, 3, 0, 32), np.float32), "at least one pixel"),
    (np.zeros((1, 3, 32, 32), np.uint8), "float pixels"),
    (mx.zeros((1, 3, 32, 32), mx.int32), "float pixels"),
    ([["a"]], "float pixels"),
])
def test_bad_pixels(narrow, pixel_values, message):
    with pytest.raises(MlxGemmaError, match=message):
        narrow[1](pixel_values)


@pytest.mark.parametrize("field, message", [
    ({"architecture": "resnet50"}, "architecture"),
    ({"hidden_size": 1024}, "2048"),
    ({"vocab_offset": -1}, "vocab_offset"),
    ({"model_args": {"features_only": True}}, "features_only"),
    ({"model_args": {"channel_multiplier": 0}}, "channel_multiplier"),
    ({"model_args": {"channel_multiplier": "wide"}}, "channel_multiplier"),
    ({"model_args": {"msfa_output_resolution": [16, 0]}}, "msfa_output_resolution"),
    ({"model_args": [1]}, "model_args"),
])
def test_bad_config(field, message):
    with pytest.raises(MlxGemmaError, match=message):
        Gemma3nVisionConfig.from_dict(field, "vision_config", require=False)

"""Gemma 3n's vision tower (`vision_tower`): timm's MobileNet-V5 encoder (`mobilenetv5_300m_enc`), which
transformers' Gemma3nModel builds through TimmWrapperModel from Gemma3nVisionConfig and calls with
do_pooling=False. A 3x3 stride-2 stem, then four stages built from timm's architecture definition strings
(restated below): edge residuals, universal inverted residuals, and from the third stage on mobile multi-query
attention (the third stage's keys and values downsampled 2x); the last two stages' outputs are fused by the MSFA
into hidden_size channels at msfa_output_resolution (16 x 16: 256 soft tokens). The blocks are in
gemma3n_vision_blocks.py.

Parameter names are the checkpoint's below `model.vision_tower.`: `timm_model.` + timm's own names; mlx-vlm's
conversions name them the same (below `vision_tower.`) with MLX-layout convolutions, and `sanitize` takes both.
Reference: timm 1.0.31 timm/models/mobilenetv5.py, transformers 5.23 models/timm_wrapper and
models/gemma3n/modeling_gemma3n.py (Gemma3nModel.get_image_features)."""

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MlxGemmaError
from .config import MAX_SIZE, BaseConfig, of_type
from .gemma3n_vision_blocks import (
    ConvNormAct,
    EdgeResidual,
    MobileAttention,
    MobileNetV5MultiScaleFusionAdapter,
    UniversalInvertedResidual,
    make_divisible,
)

ARCHITECTURE = "mobilenetv5_300m_enc"
# timm's arch_def for mobilenetv5_300m(_enc) (mobilenetv5.py _gen_mobilenet_v5), one tuple per stage. Block
# type (er: edge residual, uir: universal inverted residual, mqa: mobile multi-query attention), then r repeats,
# k kernel (uir: of the middle depthwise convolution, 0 none; a: of the start one), s stride, e expansion,
# c output channels (scaled by channel_multiplier), h heads, d key and value width, v key/value stride.
ARCH_DEF = (
    ("er_r1_k3_s2_e4_c128",) + ("er_r1_k3_s1_e4_c128",) * 2,
    ("uir_r1_a3_k5_s2_e6_c256", "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256", "uir_r1_a5_k0_s1_e4_c256",
     "uir_r1_a3_k0_s1_e4_c256"),
    ("uir_r1_a5_k5_s2_e6_c640",) + ("uir_r1_a5_k0_s1_e4_c640",) * 7 + ("uir_r1_a0_k0_s1_e1_c640",)
    + ("mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640") * 14,
    ("uir_r1_a5_k5_s2_e6_c1280",) + ("mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280") * 19,
)
STEM_SIZE = 64
NUM_FEATURES = 2048  # MobileNetV5Encoder's output width, fixed whatever the channel multiplier
# timm.create_model keyword arguments (config.model_args) that this restatement follows; the dropouts act only
# in training.
MODEL_ARGS = ("channel_multiplier", "msfa_output_resolution", "drop_rate", "drop_path_rate")


def decode_block(block: str) -> dict:
    """One of timm's block strings ("uir_r1_a5_k0_s1_e4_c640") -> {"type": "uir", "r": 1, "a": 5, ...}."""
    kind, *options = block.split("_")
    out = {"type": kind}
    for option in options:
        key = option.rstrip("0123456789.")
        value = option[len(key):]
        out[key] = float(value) if "." in value or key == "e" else int(value)
    return out


@dataclass
class Gemma3nVisionConfig(BaseConfig):
    """transformers' Gemma3nVisionConfig. hidden_size, rms_norm_eps, vocab_size and vocab_offset are
    embed_vision's (Gemma3nMultimodalEmbedder): the tower's own norms keep timm's eps 1e-6, and its width is
    NUM_FEATURES, which hidden_size must equal for Gemma3nModel to read its output."""

    model_type: str = "gemma3n_vision"
    architecture: str = ARCHITECTURE
    initializer_range: float = 0.02
    do_pooling: bool = False  # (Gemma3nModel passes do_pooling=False whatever this says)
    model_args: Optional[dict] = None
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    def resolve(self, legacy: dict) -> None:
        where = "vision_config"
        if self.architecture != ARCHITECTURE:
            raise MlxGemmaError(f"{where}: architecture {self.architecture!r} is not supported (Gemma 3n's vision "
                                f"tower is timm's {ARCHITECTURE!r})")
        if self.hidden_size != NUM_FEATURES:
            raise MlxGemmaError(f"{where}: hidden_size is {self.hidden_size!r}, but {ARCHITECTURE} gives "
                                f"{NUM_FEATURES} channels (transformers reads its output as hidden_size wide)")
        if not (of_type(self.vocab_offset, int) and 0 <= self.vocab_offset <= MAX_SIZE):
            raise MlxGemmaError(f"{where}: vocab_offset is {self.vocab_offset!r}, expected 0 or more")
        args = self.model_args or {}
        if not isinstance(args, dict):
            raise MlxGemmaError(f"{where}: model_args is {args!r}, expected an object or null")
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise MlxGemmaError(f"{where}: model_args {', '.join(map(repr, unknown))} not supported (supported: "
                                f"{', '.join(MODEL_ARGS)})")
        multiplier = args.get("channel_multiplier", 1.0)
        if not (of_type(multiplier, float) and 0 < multiplier <= 16):
            raise MlxGemmaError(f"{where}: model_args.channel_multiplier is {multiplier!r}, expected a number in "
                                "(0, 16]")
        resolution = args.get("msfa_output_resolution", 16)
        pair = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution, resolution]
        if not (len(pair) == 2 and all(of_type(n, int) and 0 < n <= 4096 for n in pair)):
            raise MlxGemmaError(f"{where}: model_args.msfa_output_resolution is {resolution!r}, expected a size or "
                                "a (height, width) pair, 1 to 4096")

    @property
    def channel_multiplier(self) -> float:
        return (self.model_args or {}).get("channel_multiplier", 1.0)

    @property
    def msfa_output_resolution(self) -> tuple:
        resolution = (self.model_args or {}).get("msfa_output_resolution", 16)
        return tuple(resolution) if isinstance(resolution, (list, tuple)) else (resolution, resolution)

    def round_channels(self, channels: int) -> int:
        return make_divisible(channels * self.channel_multiplier)

    @property
    def stem_size(self) -> int:
        # timm fixes the stem (fix_stem) when the multiplier narrows the network, and scales it otherwise.
        return STEM_SIZE if self.channel_multiplier < 1 else self.round_channels(STEM_SIZE)

    @property
    def soft_tokens_per_image(self) -> int:
        return math.prod(self.msfa_output_resolution)


def build_stage(config: Gemma3nVisionConfig, blocks, in_chs: int) -> tuple:
    """(the stage's blocks, its output width), as timm's EfficientNetBuilder builds them: output widths rounded
    by the channel multiplier, each block's input the previous block's output (the strides already sum to
    timm's output_stride 32, so no stride turns into dilation)."""
    stage = []
    for block in blocks:
        b = decode_block(block)
        out_chs = config.round_channels(b["c"])
        for _ in range(b["r"]):
            if b["type"] == "er":
                stage.append(EdgeResidual(in_chs, out_chs, b["k"], b["s"], b["e"]))
            elif b["type"] == "uir":
                stage.append(UniversalInvertedResidual(in_chs, out_chs, b.get("a", 0), b["k"], b["s"], b["e"]))
            else:  # mqa; its stride is 1 in every block here (timm's query_strides stay 1 too)
                stage.append(MobileAttention(in_chs, out_chs, b["h"], b["d"], b["d"], b.get("v", 1), b["k"]))
            in_chs = out_chs
    return stage, in_chs


class MobileNetV5Encoder(nn.Module):
    """timm's MobileNetV5Encoder: stem, four stages, MSFA over the last two stages' outputs (timm's
    msfa_indices (-2, -1) among its five feature levels, the stem's and each stage's)."""

    def __init__(self, config: Gemma3nVisionConfig):
        super().__init__()
        in_chs = config.stem_size
        self.conv_stem = ConvNormAct(3, in_chs, 3, stride=2, bias=True)
        self.blocks, widths = [], []
        for blocks in ARCH_DEF:
            stage, in_chs = build_stage(config, blocks, in_chs)
            self.blocks.append(stage)
            widths.append(in_chs)
        self.msfa = MobileNetV5MultiScaleFusionAdapter(sum(widths[-2:]), NUM_FEATURES, config.msfa_output_resolution)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_stem(x)
        features = []
        for stage in self.blocks:
            for block in stage:
                x = block(x)
            features.append(x)
        return self.msfa(features[-2:])


class Gemma3nVisionModel(nn.Module):
    """The vision tower as Gemma3nModel holds it (transformers' TimmWrapperModel around timm_model)."""

    def __init__(self, config: Gemma3nVisionConfig):
        super().__init__()
        self.config = config
        self.timm_model = MobileNetV5Encoder(config)

    def __call__(self, pixel_values) -> mx.array:
        """(B, 3, H, W) float pixels as Gemma 3n's image processor gives them (channels first, numpy or MLX) ->
        (B, H', W', hidden_size), channels last: transformers' last_hidden_state is its transpose(0, 3, 1, 2).
        (H', W') is msfa_output_resolution whatever the image size."""
        pixels = pixel_values if isinstance(pixel_values, mx.array) else np.asarray(pixel_values)
        floating = mx.issubdtype(pixels.dtype, mx.floating) if isinstance(pixels, mx.array) else pixels.dtype.kind == "f"
        if not floating:
            raise MlxGemmaError(f"pixel_values are {pixels.dtype}; Gemma 3n's vision tower takes float pixels (as "
                                "its image processor gives them: rescaled to [0, 1])")
        if pixels.ndim != 4 or pixels.shape[1] != 3 or 0 in pixels.shape:
            raise MlxGemmaError(f"pixel_values has shape {tuple(pixels.shape)}; Gemma 3n's vision tower takes "
                                "(images, 3, height, width), channels first, at least one pixel")
        if isinstance(pixels, np.ndarray):
            pixels = mx.array(pixels.astype(np.float32, copy=False))  # (float64 is CPU-only in MLX)
        dtype = self.timm_model.conv_stem.conv.weight.dtype  # (as transformers casts pixel_values to the model's)
        return self.timm_model(pixels.transpose(0, 2, 3, 1).astype(dtype))

    def soft_tokens(self, pixel_values) -> mx.array:
        """(B, tokens, hidden_size): what Gemma3nModel.get_image_features hands embed_vision. The tower's output
        with its pixels in row-major order, times sqrt(hidden_size) (a Python float in transformers, so the
        product is taken in float32 for reduced-precision activations, as torch's scalar multiply does)."""
        h = self(pixel_values)
        B, H, W, C = h.shape
        return (h.reshape(B, H * W, C).astype(mx.float32) * math.sqrt(self.config.hidden_size)).astype(h.dtype)

    def sanitize(self, weights: dict) -> dict:
        """Weights below this tower's prefix (`model.vision_tower.`, mlx-vlm's `vision_tower.` stripped): timm's
        names below `timm_model.` (a bare timm state_dict gets the prefix, as TimmWrapperModel's
        load_state_dict adds it). PyTorch's convolutions (out, in / groups, kh, kw) become MLX's (out, kh, kw,
        in / groups); mlx-vlm's conversions hold them so already. The layout is read once for the whole
        checkpoint off the convolutions whose shape fits only one (the stem's (64, 3, 3, 3) fits both)."""
        expected = {k: v.shape for k, v in tree_flatten(self.parameters())}
        out = {k if k.startswith("timm_model.") else "timm_model." + k: v for k, v in weights.items()}
        convs = [k for k, v in out.items() if v.ndim == 4 and k in expected]

        def fits(k):
            shape, mlx_shape = tuple(out[k].shape), tuple(out[k].transpose(0, 2, 3, 1).shape)
            return mlx_shape == tuple(expected[k]), shape == tuple(expected[k])  # (as PyTorch's, as MLX's)

        torch_only = [k for k in convs if fits(k) == (True, False)]
        mlx_only = [k for k in convs if fits(k) == (False, True)]
        if torch_only and mlx_only:
            raise MlxGemmaError(f"vision tower weights mix convolution layouts: {torch_only[0]} is PyTorch's, "
                                f"{mlx_only[0]} MLX's")
        if not mlx_only:
            for k in convs:
                if fits(k)[0]:
                    out[k] = out[k].transpose(0, 2, 3, 1)
        return out

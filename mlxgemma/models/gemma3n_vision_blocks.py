"""The blocks of Gemma 3n's vision tower, timm's MobileNet-V5 (gemma3n_vision.py assembles them), restated in MLX
from timm 1.0.31: timm/layers (conv2d_same.py, padding.py, norm.py RmsNorm2d, norm_act.py RmsNormAct2d,
conv_bn_act.py, layer_scale.py, attention2d.py MultiQueryAttention2d) and timm/models (_efficientnet_blocks.py
EdgeResidual, UniversalInvertedResidual, MobileAttention; mobilenetv5.py MobileNetV5MultiScaleFusionAdapter).

Channels-last (B, H, W, C), as MLX convolves; module and parameter names are timm's, so a checkpoint's
`timm_model.*` names load as they are. Every convolution pads as TensorFlow's SAME (timm's pad_type 'same': the
odd pixel of padding goes after, so a stride-2 3x3 convolution of an even size pads (0, 1), not (1, 1))."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def make_divisible(v: float, divisor: int = 8, min_value=None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: to the nearest multiple of divisor, never more than 10% down."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return int(new_v)


def same_padding(size: int, kernel: int, stride: int) -> tuple:
    """TensorFlow's SAME padding of one axis as timm's get_same_padding splits it: (before, after), the odd
    pixel after. For stride 1 and an odd kernel it is timm's static symmetric padding too."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Module):
    """timm's create_conv2d(..., padding='same'): nn.Conv2d where the padding is static, Conv2dSame (padded at
    call time) where it is not. Weight in MLX's layout (out, kh, kw, in / groups); bias only if asked."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__()
        self.stride, self.groups = stride, groups
        self.weight = mx.zeros((out_channels, kernel_size, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        _, kh, kw, _ = self.weight.shape
        if kh == kw == 1 and self.stride == 1 and self.groups == 1:
            # A pointwise convolution is a matmul over channels (most of this tower's work).
            y = x @ self.weight.reshape(self.weight.shape[0], -1).T
        else:
            pads = [same_padding(n, k, self.stride) for n, k in zip(x.shape[1:3], (kh, kw))]
            if any(sum(p) for p in pads):
                x = mx.pad(x, [(0, 0), *pads, (0, 0)])
            y = mx.conv2d(x, self.weight, stride=self.stride, groups=self.groups)
        return y + self.bias if "bias" in self else y


class RmsNorm2d(nn.Module):
    """timm's RmsNorm2d / RmsNormAct2d: x * rsqrt(mean over channels of x^2 + eps) * weight, in the input's dtype
    step by step as timm's rms_norm2d (mx.fast.rms_norm would keep the normalised value in float32 before the
    weight), then GELU (tanh) if act. eps 1e-6 everywhere in MobileNet-V5."""

    def __init__(self, channels: int, eps: float = 1e-6, act: bool = False):
        super().__init__()
        self.eps, self.act = eps, act
        self.weight = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        x = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + self.eps) * self.weight
        return nn.gelu_approx(x) if self.act else x


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: `conv`, then `bn` (the RMS norm, GELU if act)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, act: bool = True):
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride, groups, bias)
        self.bn = RmsNorm2d(out_channels, act=act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.bn(self.conv(x))


class LayerScale2d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.full((dim,), 1e-5)

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class EdgeResidual(nn.Module):
    """timm's EdgeResidual (FusedMBConv): a full k x k expansion convolution (carrying the stride), norm + GELU,
    a pointwise projection, norm; + the input where shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, exp_kernel_size: int, stride: int, exp_ratio: float):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.has_skip = in_chs == out_chs and stride == 1
        self.conv_exp = Conv2dSame(in_chs, mid_chs, exp_kernel_size, stride)
        self.bn1 = RmsNorm2d(mid_chs, act=True)
        self.conv_pwl = Conv2dSame(mid_chs, out_chs, 1)
        self.bn2 = RmsNorm2d(out_chs)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return h + x if self.has_skip else h


class UniversalInvertedResidual(nn.Module):
    """timm's UniversalInvertedResidual: an optional depthwise convolution on the input (dw_start, no
    activation), pointwise expansion (pw_exp), an optional depthwise convolution on the expansion (dw_mid),
    pointwise projection (pw_proj, no activation), the layer scale; + the input where shapes allow. The stride
    sits on dw_mid, or on dw_start where there is no dw_mid."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size_start: int = 0, dw_kernel_size_mid: int = 3,
                 stride: int = 1, exp_ratio: float = 1.0, noskip: bool = False, layer_scale: bool = True):
        super().__init__()
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip
        if dw_kernel_size_start:
            self.dw_start = ConvNormAct(in_chs, in_chs, dw_kernel_size_start, 1 if dw_kernel_size_mid else stride,
                                        groups=in_chs, act=False)
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.pw_exp = ConvNormAct(in_chs, mid_chs, 1)
        if dw_kernel_size_mid:
            self.dw_mid = ConvNormAct(mid_chs, mid_chs, dw_kernel_size_mid, stride, groups=mid_chs)
        self.pw_proj = ConvNormAct(mid_chs, out_chs, 1, act=False)
        if layer_scale:
            self.layer_scale = LayerScale2d(out_chs)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.dw_start(x) if "dw_start" in self else x
        h = self.pw_exp(h)
        if "dw_mid" in self:
            h = self.dw_mid(h)
        h = self.pw_proj(h)
        if "layer_scale" in self:
            h = self.layer_scale(h)
        return h + x if self.has_skip else h


class Projection(nn.Module):
    """One of the nn.Sequential timm's MultiQueryAttention2d builds for query, key, value and output: with a kv
    stride, keys and values are first downsampled by a strided depthwise convolution (down_conv) and normed;
    then a pointwise projection (proj)."""

    def __init__(self, dim: int, out_dim: int, stride: int = 1, kernel_size: int = 3):
        super().__init__()
        if stride > 1:
            self.down_conv = Conv2dSame(dim, dim, kernel_size, stride, groups=dim)
            self.norm = RmsNorm2d(dim)
        self.proj = Conv2dSame(dim, out_dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention over the pixels: num_heads query heads, one key and one value head (shared),
    scaled by key_dim^-0.5 (torch's SDPA default); query channels are head-major (head * key_dim + d), as are
    the output's."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, key_dim: int, value_dim: int, kv_stride: int,
                 dw_kernel_size: int):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.query = Projection(dim, num_heads * key_dim)
        self.key = Projection(dim, key_dim, kv_stride, dw_kernel_size)
        self.value = Projection(dim, value_dim, kv_stride, dw_kernel_size)
        self.output = Projection(num_heads * value_dim, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        q = self.query(x).reshape(B, H * W, self.num_heads, self.key_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(B, 1, -1, self.key_dim)
        v = self.value(x).reshape(B, 1, -1, self.value_dim)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.key_dim**-0.5)
        return self.output(o.transpose(0, 2, 1, 3).reshape(B, H, W, self.num_heads * self.value_dim))


class MobileAttention(nn.Module):
    """timm's MobileAttention with use_multi_query: norm, multi-query attention, layer scale, + the input."""

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, key_dim: int, value_dim: int, kv_stride: int,
                 dw_kernel_size: int):
        super().__init__()
        self.has_skip = in_chs == out_chs
        self.norm = RmsNorm2d(in_chs)
        self.attn = MultiQueryAttention2d(in_chs, out_chs, num_heads, key_dim, value_dim, kv_stride, dw_kernel_size)
        self.layer_scale = LayerScale2d(out_chs)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.layer_scale(self.attn(self.norm(x)))
        return h + x if self.has_skip else h


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """torch's F.interpolate(mode='nearest') source index of each output pixel: floor(i * (in / out)) in float32
    (its nearest_idx, whose 1x and 2x cases this arithmetic reproduces), clamped."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """torch's F.interpolate(mode='bilinear', align_corners=False, no antialias) along one axis as an
    (out, in) matrix of its two weights per row, with its float32 index arithmetic."""
    matrix = np.zeros((out_size, in_size), np.float32)
    if in_size == out_size:
        return np.eye(in_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    for i in range(out_size):
        src = max(scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
        i0 = min(int(np.floor(src)), in_size - 1)
        lam = min(max(src - np.float32(i0), np.float32(0)), np.float32(1))
        matrix[i, i0] += np.float32(1) - lam
        matrix[i, min(i0 + 1, in_size - 1)] += lam
    return matrix


class MobileNetV5MultiScaleFusionAdapter(nn.Module):
    """The MSFA that ends the tower: every input (the last two stages' outputs) resized by nearest neighbour to
    the first's (highest) resolution, concatenated over channels, a UIR with no depthwise convolution
    (expansion 2, no skip, no layer scale), brought to output_resolution (an average pool where it divides the
    resolution, else bilinear), and normed."""

    def __init__(self, in_chs: int, out_chs: int, output_resolution: tuple):
        super().__init__()
        self.output_resolution = tuple(output_resolution)
        self.ffn = UniversalInvertedResidual(in_chs, out_chs, dw_kernel_size_mid=0, exp_ratio=2.0, noskip=True,
                                             layer_scale=False)
        self.norm = RmsNorm2d(out_chs)

    def __call__(self, inputs: list) -> mx.array:
        H, W = inputs[0].shape[1:3]
        resized = []
        for x in inputs:
            h, w = x.shape[1:3]
            if h < H or w < W:
                x = mx.take(x, mx.array(nearest_indices(h, H)), axis=1)
                x = mx.take(x, mx.array(nearest_indices(w, W)), axis=2)
            resized.append(x)
        x = self.ffn(mx.concatenate(resized, axis=-1))
        oh, ow = self.output_resolution
        if (H, W) != (oh, ow):
            if H % oh or W % ow:
                # (in float32, as torch weighs reduced-precision pixels)
                rows, cols = (mx.array(bilinear_matrix(n, o)) for n, o in ((H, oh), (W, ow)))
                h = mx.einsum("ph,bhwc->bpwc", rows, x.astype(mx.float32))
                x = mx.einsum("qw,bpwc->bpqc", cols, h).astype(x.dtype)
            else:
                B, _, _, C = x.shape
                x = x.reshape(B, oh, H // oh, ow, W // ow, C).mean(axis=(2, 4))
        return self.norm(x)

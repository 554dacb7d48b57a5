"""Gemma 4's audio tower (the E2B/E4B `audio_tower`): a USM Conformer over log-mel frames. Two stride-2
convolutions cut the frames by 4; each of the layers is a macaron Conformer block (half feed-forward, chunked
local self-attention with relative positions and a tanh logit cap, a causal depthwise light convolution, half
feed-forward); a biased projection maps to output_proj_dims (the text model's embedder takes it from there).
Parameter names are transformers' `Gemma4AudioModel` state_dict's (mlx-vlm and mlx-community checkpoints use
the same names, with MLX-layout convolutions: `sanitize` takes both).
Reference: transformers/models/gemma4 (Gemma4AudioConfig, Gemma4AudioModel and its parts)."""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import activation
from .config import BaseConfig
from .gemma4 import Gemma4ClippableLinear, Gemma4RMSNorm


@dataclass
class Gemma4AudioConfig(BaseConfig):
    model_type: str = "gemma4_audio"
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    initializer_range: float = 0.02

    def resolve(self, legacy: dict) -> None:
        where = "audio_config"
        self.check_divisible_heads(where)
        if self.hidden_size % 2:
            # The relative position table is [sin, cos] over hidden_size // 2 timescales.
            raise MlxGemmaError(f"{where}: hidden_size {self.hidden_size} must be even")
        channels = self.subsampling_conv_channels
        if len(channels) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise MlxGemmaError(f"{where}: subsampling_conv_channels is {channels!r}, expected two positive integers")
        for name in ("attention_chunk_size", "attention_context_left", "conv_kernel_size", "output_proj_dims"):
            if not 0 < getattr(self, name) <= 2**31 - 1:
                raise MlxGemmaError(f"{where}: field {name} is {getattr(self, name)!r}, expected a positive size")
        if self.attention_context_right < 0:
            raise MlxGemmaError(f"{where}: attention_context_right is {self.attention_context_right}, "
                                "expected 0 or more")
        for name in ("attention_logit_cap", "gradient_clipping", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise MlxGemmaError(f"{where}: field {name} is {getattr(self, name)!r}, expected a positive number")
        activation(self.hidden_act, f"{where}.hidden_act")

    @property
    def subsampled_mel_bins(self) -> int:
        """The mel bins left after the two convolutions, as transformers sizes the projection after them:
        channels[0] // 4 * channels[1] inputs, i.e. it takes the mel bins to be channels[0] (both 128 in the
        released models)."""
        return self.subsampling_conv_channels[0] // 4


def halved(n: int) -> int:
    """The length a 3-wide, stride-2, 1-padded convolution leaves of n: ceil(n / 2)."""
    return (n - 1) // 2 + 1


def clip_value(config, dtype) -> float:
    """The residual clamp of a USM tower's config (its gradient_clipping: Gemma 4's and Gemma 3n's)."""
    # transformers clamps at min(gradient_clipping, the dtype's max): 1e10 would be inf in float16.
    return min(config.gradient_clipping, float(mx.finfo(dtype).max))


class Gemma4AudioSubSampleConvProjectionLayer(nn.Module):
    """3x3 stride-2 convolution over (time, mel), LayerNorm over channels (weight only), ReLU. Channels-last."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask):
        if mask is not None:
            x = x * mask[:, :, None, None]  # padded frames are zeros to the convolution
        x = nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype))))
        return x, None if mask is None else mask[:, ::2]  # a frame is valid iff the one it starts on is


class Gemma4AudioSubSampleConvProjection(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = Gemma4AudioSubSampleConvProjectionLayer(1, c0, config.rms_norm_eps)
        self.layer1 = Gemma4AudioSubSampleConvProjectionLayer(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear(config.subsampled_mel_bins * c1, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask):
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        B, T, F, C = x.shape  # flattened mel-major, channel-minor, as transformers' permute(0, 2, 3, 1)
        return self.input_proj_linear(x.reshape(B, T, F * C)), mask


def timing_signal(positions: mx.array, channels: int) -> mx.array:
    """[sin | cos] of positions over channels // 2 geometric timescales 1 ... 1e4, float32: the USM sinusoid of
    Gemma 4's Gemma4AudioRelPositionalEncoding and Gemma 3n's Gemma3nAudioRelativePositionEmbedding alike."""
    n = channels // 2
    increment = math.log(10000.0) / max(n - 1, 1)
    inv_timescales = mx.exp(mx.arange(n).astype(mx.float32) * -increment)
    scaled = positions.astype(mx.float32)[:, None] * inv_timescales[None]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


def relative_position_embeddings(config: Gemma4AudioConfig) -> mx.array:
    """The timing signal of the relative positions context_size // 2 ... 0 (float32), as transformers'
    Gemma4AudioRelPositionalEncoding. Its context_size counts chunk + left - 1 + right: for the released
    chunk 12 / left 13 that is 13 positions, 12 ... 0, one per distance the window holds; other shapes get
    other counts (mlx-vlm's table, left - 1 + right ... 0, differs there)."""
    context = config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
    return timing_signal(mx.arange(context // 2, -1, -1), config.hidden_size)


def context_windows(x: mx.array, chunk: int, past: int, future: int) -> mx.array:
    """(B, T, ...) -> (B, blocks, chunk + past + future, ...), blocks = ceil(T / chunk): for block u, the frames
    u * chunk - past ... (u + 1) * chunk - 1 + future, zeros (False) outside the clip (transformers'
    _extract_block_context, Gemma 4's and Gemma 3n's)."""
    blocks = -(-x.shape[1] // chunk)
    x = mx.pad(x, [(0, 0), (past, future + chunk - 1)] + [(0, 0)] * (x.ndim - 2))
    index = mx.arange(blocks)[:, None] * chunk + mx.arange(chunk + past + future)[None]
    return x[:, index]


def relative_shift(x: mx.array, context: int) -> mx.array:
    """(..., chunk, positions) -> (..., chunk, context): pad each row to context + 1, flatten, cut, re-read as
    rows of context, so that query i's key j reads relative column j - i (transformers' _relative_shift /
    _rel_shift, appendix B of Transformer-XL)."""
    *lead, chunk, positions = x.shape
    x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, context + 1 - positions)])
    return x.reshape(*lead, chunk * (context + 1))[..., : chunk * context].reshape(*lead, chunk, context)


def blocked_mask(valid: mx.array, config: Gemma4AudioConfig) -> mx.array:
    """(B, T) valid frames -> (B, blocks, chunk, context) bool, True where a query may see a key: the key is a
    valid frame of the clip and q - k lies in [0, left - 1) or in (-right, 0). Note left - 1, not left: the
    windows hold left - 1 past frames but transformers' sliding_window_mask_function((left - 1, right))
    takes only dist < left - 1, so the farthest one is never seen. Equal to _convert_4d_mask_to_blocked_5d
    of transformers' mask (for the queries that exist; padded query rows are cut off after attention)."""
    chunk, past, future = (config.attention_chunk_size, config.attention_context_left - 1,
                           config.attention_context_right)
    dist = mx.arange(chunk)[:, None] + past - mx.arange(chunk + past + future)[None]  # q - k, per block
    window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future))
    return window[None, None] & context_windows(valid, chunk, past, future)[:, :, None, :]


class Gemma4AudioAttention(nn.Module):
    """Chunked local attention: queries in chunks of chunk_size see their chunk plus left - 1 past and right
    future frames; logits = q.k + q.r (Transformer-XL relative keys), tanh-capped, then masked. All in
    float32, as transformers computes it (q, k, v are upcast after their projections)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = D // self.num_heads
        # USM's base-2 softmax scaling folded into q and k, as transformers keeps it.
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = Gemma4ClippableLinear(config, D, D)
        self.k_proj = Gemma4ClippableLinear(config, D, D)
        self.v_proj = Gemma4ClippableLinear(config, D, D)
        self.post = Gemma4ClippableLinear(config, D, D)
        self.relative_k_proj = nn.Linear(D, D, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def __call__(self, x: mx.array, position_embeddings: mx.array, mask: mx.array) -> mx.array:
        config, H, d = self.config, self.num_heads, self.head_dim
        B, T, _ = x.shape
        chunk, past, future = (config.attention_chunk_size, config.attention_context_left - 1,
                               config.attention_context_right)
        context = chunk + past + future
        blocks = -(-T // chunk)
        q, k, v = (p(x).astype(mx.float32).reshape(B, T, H, d) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * self.q_scale * nn.softplus(self.per_dim_scale)  # softplus in the weight's dtype, as torch
        k = k * self.k_scale

        q = mx.pad(q, [(0, 0), (0, blocks * chunk - T), (0, 0), (0, 0)]).reshape(B, blocks, chunk, H, d)
        q = q.transpose(0, 3, 1, 2, 4)  # (B, H, blocks, chunk, d)
        k = context_windows(k, chunk, past, future).transpose(0, 3, 1, 4, 2)  # (B, H, blocks, d, context)
        v = context_windows(v, chunk, past, future).transpose(0, 3, 1, 2, 4)  # (B, H, blocks, context, d)

        relative = self.relative_k_proj(position_embeddings).astype(mx.float32).reshape(-1, H, d)
        positions = relative.shape[0]
        content = q @ k
        relative = q.reshape(B, H, -1, d) @ relative.transpose(1, 2, 0)
        logits = content + relative_shift(relative.reshape(B, H, blocks, chunk, positions), context)

        cap = config.attention_logit_cap
        logits = mx.tanh(logits / cap) * cap
        logits = mx.where(mask[:, None], logits, config.attention_invalid_logits_value)
        out = mx.softmax(logits, axis=-1) @ v  # (B, H, blocks, chunk, d)
        out = out.transpose(0, 2, 3, 1, 4).reshape(B, blocks * chunk, H * d)[:, :T]
        return self.post(out.astype(x.dtype))


class Gemma4AudioFeedForward(nn.Module):
    """Half of the macaron: clamp, RMSNorm, 4x up, activation, down, clamp, RMSNorm, residual_weight * it +
    residual. Its norms have eps 1e-6 whatever rms_norm_eps says (transformers passes no eps)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        self.ffw_layer_1 = Gemma4ClippableLinear(config, config.hidden_size, config.hidden_size * 4)
        self.ffw_layer_2 = Gemma4ClippableLinear(config, config.hidden_size * 4, config.hidden_size)
        self.pre_layer_norm = Gemma4RMSNorm(config.hidden_size)
        self.post_layer_norm = Gemma4RMSNorm(config.hidden_size)
        self.act = activation(config.hidden_act, "audio_config.hidden_act")

    def __call__(self, x: mx.array) -> mx.array:
        clip = clip_value(self.config, x.dtype)
        h = self.pre_layer_norm(mx.clip(x, -clip, clip))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        h = self.post_layer_norm(mx.clip(h, -clip, clip))
        return h * self.config.residual_weight + x


class Gemma4AudioLightConv1d(nn.Module):
    """RMSNorm, 2x up + GLU, causal depthwise convolution (left-padded by kernel - 1), clamp, RMSNorm,
    activation, down, residual. Its norms do take rms_norm_eps."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.linear_start = Gemma4ClippableLinear(config, D, D * 2)
        self.linear_end = Gemma4ClippableLinear(config, D, D)
        self.depthwise_conv1d = nn.Conv1d(D, D, config.conv_kernel_size, groups=D, bias=False)
        self.pre_layer_norm = Gemma4RMSNorm(D, eps=config.rms_norm_eps)
        self.conv_norm = Gemma4RMSNorm(D, eps=config.rms_norm_eps)
        self.act = activation(config.hidden_act, "audio_config.hidden_act")

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        a, b = mx.split(h, 2, axis=-1)
        h = a * mx.sigmoid(b)
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.config.conv_kernel_size - 1, 0), (0, 0)]))
        clip = clip_value(self.config, h.dtype)
        h = self.act(self.conv_norm(mx.clip(h, -clip, clip)))
        return self.linear_end(h) + x


class Gemma4AudioLayer(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        self.feed_forward1 = Gemma4AudioFeedForward(config)
        self.feed_forward2 = Gemma4AudioFeedForward(config)
        self.self_attn = Gemma4AudioAttention(config)
        self.lconv1d = Gemma4AudioLightConv1d(config)
        self.norm_pre_attn = Gemma4RMSNorm(config.hidden_size)
        self.norm_post_attn = Gemma4RMSNorm(config.hidden_size)
        self.norm_out = Gemma4RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, position_embeddings: mx.array, mask: mx.array) -> mx.array:
        clip = clip_value(self.config, self.norm_pre_attn.weight.dtype)  # (the weight's dtype, as transformers)
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(mx.clip(x, -clip, clip)), position_embeddings, mask)
        x = self.norm_post_attn(mx.clip(h, -clip, clip)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(mx.clip(x, -clip, clip))


class Gemma4AudioModel(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = Gemma4AudioSubSampleConvProjection(config)
        self.layers = [Gemma4AudioLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def __call__(self, input_features, input_features_mask=None) -> tuple:
        """(N, T, mel bins) log-mel features and (N, T) bool validity (None: all valid), numpy or MLX, as the
        feature extractor makes them -> (hidden (N, T', output_proj_dims), mask (N, T') bool), with
        T' = halved(halved(T)) = ceil(ceil(T / 2) / 2). Outputs at padded frames are computed as transformers
        computes them (not zeroed, unlike mlx-vlm's); the mask says which are valid."""
        features = mx.array(np.asarray(input_features, np.float32)) if isinstance(input_features, np.ndarray) \
            else mx.array(input_features)
        if features.ndim != 3 or features.shape[0] == 0 or features.shape[1] == 0:
            raise MlxGemmaError(f"input_features has shape {tuple(features.shape)}; the audio tower takes "
                                "(clips, frames, mel bins) with at least one frame")
        if halved(halved(features.shape[2])) != self.config.subsampled_mel_bins:
            raise MlxGemmaError(f"input_features has {features.shape[2]} mel bins; this audio tower takes "
                                f"{self.config.subsampled_mel_bins * 4} (use the checkpoint's feature extractor)")
        mask = None
        if input_features_mask is not None:
            mask = mx.array(np.asarray(input_features_mask)).astype(mx.bool_)
            if mask.shape != features.shape[:2]:
                raise MlxGemmaError(f"input_features_mask has shape {tuple(mask.shape)}, expected "
                                    f"{tuple(features.shape[:2])}")
        h, mask = self.subsample_conv_projection(features, mask)
        if mask is None:
            mask = mx.ones(h.shape[:2], dtype=mx.bool_)
        position_embeddings = relative_position_embeddings(self.config).astype(h.dtype)
        attention_mask = blocked_mask(mask, self.config)
        for layer in self.layers:
            h = layer(h, position_embeddings, attention_mask)
        return self.output_proj(h), mask

    def sanitize(self, weights: dict) -> dict:
        """Weights under this tower's prefix (model.audio_tower. stripped): PyTorch's convolutions, (O, I, 3, 3)
        and depthwise (D, 1, K), become MLX's (O, 3, 3, I) and (D, K, 1). MLX checkpoints (mlx-vlm,
        mlx-community) hold them in that layout already: told apart by shape (ambiguous only for a first
        channel count of 3, read as MLX's, as mlx-vlm does)."""
        c0 = self.config.subsampling_conv_channels[0]
        out = {}
        for k, v in weights.items():
            if k.startswith("subsample_conv_projection.layer") and k.endswith(".conv.weight") and v.ndim == 4:
                in_channels = 1 if ".layer0." in k else c0
                if not (v.shape[1:3] == (3, 3) and v.shape[3] == in_channels):
                    v = v.transpose(0, 2, 3, 1)
            elif k.endswith("depthwise_conv1d.weight") and v.ndim == 3 and v.shape[-1] != 1:
                v = v.transpose(0, 2, 1)  # (K = 1 is the same array either way)
            out[k] = v
        return out

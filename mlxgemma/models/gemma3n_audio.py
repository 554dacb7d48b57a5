"""Gemma 3n's audio tower (`audio_tower`, a USM Conformer over log-mel frames) and the multimodal embedder that
both its towers share (`embed_audio`, `embed_vision`). Two convolutions (3x3, stride 2, padded only at the end of
time: causal) cut the frames by 4, each normed by a cumulative group norm; each Conformer block is a macaron
(half feed-forward, chunked local self-attention with relative positions and a tanh logit cap, a causal
depthwise light convolution, half feed-forward); the output keeps every conf_reduction_factor-th frame.

Gemma 4's tower (gemma4_audio.py) is the same lineage and lends its identical pieces: the sinusoid, the context
windows, the relative shift, the residual clamp and the RMSNorm (transformers' Gemma3nRMSNorm is Gemma4RMSNorm
line for line). What differs is Gemma 3n's own: the cumulative group norm (not LayerNorm), end-only time
padding, q scaled but k not, a mask that sees q - k in [-right, left - 1] (both ends in), finfo.min for masked
logits, no float32 upcast, plain linears, and the reduction. Parameter names are transformers'
`Gemma3nAudioEncoder` / `Gemma3nMultimodalEmbedder` state_dicts' (mlx-vlm's conversions use the same, with
MLX-layout convolutions: `sanitize` takes both).
Reference: transformers/models/gemma3n/modeling_gemma3n.py (5.23)."""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .config import MAX_LAYERS, MAX_SIZE, BaseConfig
from .gemma4 import Gemma4RMSNorm
from .gemma4_audio import clip_value, context_windows, relative_shift, timing_signal


@dataclass
class Gemma3nAudioConfig(BaseConfig):
    model_type: str = "gemma3n_audio"
    vocab_size: int = 128
    vocab_offset: int = 262_144 + 128  # text vocab + vision vocab: the audio hard tokens come last
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: list = field(default_factory=lambda: [128, 32])
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: list = field(default_factory=lambda: [[3, 3], [3, 3]])
    sscp_conv_stride_size: list = field(default_factory=lambda: [[2, 2], [2, 2]])

    def resolve(self, legacy: dict) -> None:
        where = "audio_config"

        def count(value, n):
            return isinstance(value, (list, tuple)) and len(value) == n and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE for v in value)

        for name, low in (("input_feat_size", 1), ("conf_attention_chunk_size", 1), ("conf_num_attention_heads", 1),
                          ("conf_conv_kernel_size", 1), ("conf_reduction_factor", 1), ("vocab_offset", 0),
                          ("conf_attention_context_left", 0), ("conf_attention_context_right", 0),
                          ("conf_num_hidden_layers", 0)):
            if not low <= getattr(self, name) <= MAX_SIZE:
                raise MlxGemmaError(f"{where}: field {name} is {getattr(self, name)!r}, expected "
                                    f"{'a positive size' if low else '0 or more'}")
        if self.conf_num_hidden_layers > MAX_LAYERS:
            raise MlxGemmaError(f"{where}: conf_num_hidden_layers {self.conf_num_hidden_layers} is more than "
                                f"mlxgemma builds ({MAX_LAYERS})")
        if self.hidden_size % self.conf_num_attention_heads or self.hidden_size % 2:
            # Heads split hidden_size, and the position sinusoid is [sin, cos] over hidden_size // 2 timescales.
            raise MlxGemmaError(f"{where}: hidden_size {self.hidden_size} must be even and a multiple of "
                                f"conf_num_attention_heads {self.conf_num_attention_heads}")
        if not count(self.sscp_conv_channel_size, 2):
            raise MlxGemmaError(f"{where}: sscp_conv_channel_size is {self.sscp_conv_channel_size!r}, expected two "
                                "positive integers")
        for name in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(count(v, 2) for v in value)):
                raise MlxGemmaError(f"{where}: {name} is {value!r}, expected two (time, frequency) pairs of "
                                    "positive integers")
        for name in ("conf_attention_logit_cap", "gradient_clipping", "sscp_conv_group_norm_eps"):
            if not getattr(self, name) > 0:
                raise MlxGemmaError(f"{where}: field {name} is {getattr(self, name)!r}, expected a positive number")
        if self.sscp_freq_dims[-1] < 1:
            raise MlxGemmaError(f"{where}: input_feat_size {self.input_feat_size} leaves no frequency bins after "
                                f"the subsampling convolutions (kernels {self.sscp_conv_kernel_size})")

    @property
    def sscp_freq_dims(self) -> list:
        """The frequency bins after each subsampling convolution: (f + 1 + 1 - kernel) // stride + 1, as
        transformers sizes them (one bin of padding on each side, whatever the kernel)."""
        dims, f = [], self.input_feat_size
        for (_, kw), (_, sw) in zip(self.sscp_conv_kernel_size, self.sscp_conv_stride_size):
            f = (f + 2 - kw) // sw + 1
            dims.append(f)
        return dims


class Gemma3nAudioCumulativeGroupNorm(nn.Module):
    """Group norm (one group) over (frequency, channels), its statistics cumulative over time: frame t is normed
    by the mean of frames 0..t and the sum over 0..t of each frame's squared distance to ITS OWN running mean
    (not a true running variance: transformers' arithmetic, kept). No mask (transformers' is all ones), so
    padded frames count too; weight per channel, no bias. In float32. Input (B, T, F, C)."""

    def __init__(self, num_channels: int, feature_dims, eps: float = 1e-3):
        super().__init__()
        self.num_channels, self.feature_dims, self.eps = num_channels, tuple(feature_dims), eps
        self.weight = mx.ones((num_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        B, T, F, C = x.shape
        h = x.astype(mx.float32)
        counts = (mx.arange(1, T + 1) * (F * C)).astype(mx.float32)[None, :, None, None]  # exact, as torch's
        mean = mx.cumsum(h.sum(axis=(2, 3), keepdims=True), axis=1) / counts
        variance = mx.cumsum(((h - mean) ** 2).sum(axis=(2, 3), keepdims=True), axis=1) / counts
        out = (h - mean) * mx.rsqrt(variance + self.eps) * self.weight.astype(mx.float32)
        return out.astype(x.dtype)


class Gemma3nAudioSSCPConvBlock(nn.Module):
    """Convolution over (time, frequency), cumulative group norm, ReLU. Channels-last. Padding is manual:
    one bin each side of frequency, kernel - 1 frames after the clip and none before (JAX's reverse-causal),
    so T frames give ceil(T / stride) (Gemma 4's pads one frame each side)."""

    def __init__(self, config: Gemma3nAudioConfig, idx: int, input_freq_dim: int):
        super().__init__()
        in_channels = 1 if idx == 0 else config.sscp_conv_channel_size[idx - 1]
        out_channels = config.sscp_conv_channel_size[idx]
        kernel, stride = config.sscp_conv_kernel_size[idx], config.sscp_conv_stride_size[idx]
        self.time_padding = kernel[0] - 1
        self.conv = nn.Conv2d(in_channels, out_channels, tuple(kernel), stride=tuple(stride), bias=False)
        f_out = (input_freq_dim + 2 - kernel[1]) // stride[1] + 1
        self.norm = Gemma3nAudioCumulativeGroupNorm(out_channels, (f_out,), config.sscp_conv_group_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, self.time_padding), (1, 1), (0, 0)]).astype(self.conv.weight.dtype)
        return nn.relu(self.norm(self.conv(x)))


class Gemma3nAudioSubSampleConvProjection(nn.Module):
    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        dims = config.sscp_freq_dims
        self.conv_0 = Gemma3nAudioSSCPConvBlock(config, 0, config.input_feat_size)
        self.conv_1 = Gemma3nAudioSSCPConvBlock(config, 1, dims[0])
        self.input_proj_linear = nn.Linear(config.sscp_conv_channel_size[-1] * dims[-1], config.hidden_size,
                                           bias=False)

    def __call__(self, audio_mel: mx.array) -> mx.array:
        x = self.conv_1(self.conv_0(audio_mel[..., None]))
        B, T, F, C = x.shape  # flattened frequency-major, channel-minor, as transformers' permute(0, 2, 3, 1)
        return self.input_proj_linear(x.reshape(B, T, F * C))


def local_attention_mask(valid: mx.array, config: Gemma3nAudioConfig) -> mx.array:
    """(B, T) valid frames -> (B, blocks, chunk, context) bool: the key is a valid frame of the clip and
    q - k lies in [-right, left - 1], both ends in (transformers' local_causal_valid_mask: query i sees context
    column j iff i <= j <= i + past + future; Gemma 4's window drops the farthest past frame)."""
    chunk, past, future = (config.conf_attention_chunk_size, max(0, config.conf_attention_context_left - 1),
                           config.conf_attention_context_right)
    j_minus_i = mx.arange(chunk + past + future)[None] - mx.arange(chunk)[:, None]
    window = (j_minus_i >= 0) & (j_minus_i <= past + future)
    return window[None, None] & context_windows(valid, chunk, past, future)[:, :, None, :]


class Gemma3nAudioRelativePositionEmbedding(nn.Module):
    """logits = q.k + q.r, r the projected sinusoid of the distances left - 1 ... -right, shifted into place."""

    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.channels = config.hidden_size
        self.head_dim = self.channels // self.num_heads
        self.max_backward = max(0, config.conf_attention_context_left - 1)
        self.max_forward = config.conf_attention_context_right
        self.pos_proj = nn.Linear(self.channels, self.num_heads * self.head_dim, bias=False)

    def __call__(self, queries: mx.array, keys: mx.array) -> mx.array:
        """queries (B, blocks, chunk, H, d), keys (B, blocks, context, H, d) -> (B, H, blocks, chunk, context)."""
        B, U, W, H, d = queries.shape
        positions = mx.arange(self.max_backward, -self.max_forward - 1, -1)
        sin_emb = self.pos_proj(timing_signal(positions, self.channels).astype(queries.dtype)).reshape(-1, H, d)
        q = queries.transpose(0, 3, 1, 2, 4)  # (B, H, U, W, d)
        term_ac = q @ keys.transpose(0, 3, 1, 4, 2)
        term_bd = (q.reshape(B, H, U * W, d) @ sin_emb.transpose(1, 2, 0)).reshape(B, H, U, W, -1)
        return term_ac + relative_shift(term_bd, keys.shape[2])


class Gemma3nAudioAttention(nn.Module):
    """Chunked local attention in the activations' dtype (only the softmax runs in float32, as transformers):
    queries in chunks of chunk_size see their chunk, left - 1 past and right future frames."""

    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.hidden_size = config.hidden_size
        self.head_dim = self.hidden_size // self.num_heads
        self.chunk_size = config.conf_attention_chunk_size
        self.max_future_horizon = config.conf_attention_context_right
        self.max_past_horizon = max(0, config.conf_attention_context_left - 1)
        self.attention_logits_soft_cap = config.conf_attention_logit_cap
        self.relative_position_embedding = Gemma3nAudioRelativePositionEmbedding(config)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        # head_dim^-0.5 / softplus(0): a zero per_dim_scale leaves the plain 1/sqrt(d). Only q is scaled.
        self.q_scale = self.head_dim**-0.5 / math.log(2.0)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        """x (B, T, D), mask (B, blocks, chunk, context) from local_attention_mask -> (B, T, H, d)."""
        B, T, _ = x.shape
        H, d, chunk = self.num_heads, self.head_dim, self.chunk_size
        q, k, v = (p(x).reshape(B, T, H, d) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * self.q_scale * nn.softplus(self.per_dim_scale)
        blocks = -(-T // chunk)
        q = mx.pad(q, [(0, 0), (0, blocks * chunk - T), (0, 0), (0, 0)]).reshape(B, blocks, chunk, H, d)
        k, v = (context_windows(t, chunk, self.max_past_horizon, self.max_future_horizon) for t in (k, v))

        logits = self.relative_position_embedding(q, k)  # (B, H, blocks, chunk, context)
        cap = self.attention_logits_soft_cap
        logits = mx.tanh(logits / cap) * cap
        logits = mx.where(mask[:, None], logits, mx.finfo(logits.dtype).min)
        probabilities = mx.softmax(logits.astype(mx.float32), axis=-1).astype(v.dtype)
        out = probabilities @ v.transpose(0, 3, 1, 2, 4)  # (B, H, blocks, chunk, d)
        return out.transpose(0, 2, 3, 1, 4).reshape(B, blocks * chunk, H, d)[:, :T]


class Gemma3nAudioConformerAttention(nn.Module):
    """clamp, RMSNorm, attention, post, clamp, RMSNorm, + the unclamped input. Its norms keep eps 1e-6."""

    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.config = config
        self.pre_attn_norm = Gemma4RMSNorm(config.hidden_size)
        self.attn = Gemma3nAudioAttention(config)
        self.post = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_norm = Gemma4RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        clip = clip_value(self.config, x.dtype)
        h = self.attn(self.pre_attn_norm(mx.clip(x, -clip, clip)), mask)
        h = mx.clip(self.post(h.reshape(*x.shape[:2], -1)), -clip, clip)
        return x + self.post_norm(h)


class Gemma3nAudioConformerFeedForward(nn.Module):
    """Half of the macaron: clamp, RMSNorm, 4x up, SiLU, down, clamp, RMSNorm, residual + conf_residual_weight *
    it. Its norms keep eps 1e-6 whatever rms_norm_eps says (transformers passes none)."""

    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.config = config
        self.pre_layer_norm = Gemma4RMSNorm(config.hidden_size)
        self.ffw_layer_1 = nn.Linear(config.hidden_size, config.hidden_size * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(config.hidden_size * 4, config.hidden_size, bias=False)
        self.post_layer_norm = Gemma4RMSNorm(config.hidden_size)
        self.post_layer_scale = config.conf_residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        clip = clip_value(self.config, x.dtype)
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(self.pre_layer_norm(mx.clip(x, -clip, clip)))))
        return x + self.post_layer_norm(mx.clip(h, -clip, clip)) * self.post_layer_scale


class Gemma3nAudioConformerLightConv1d(nn.Module):
    """RMSNorm, 2x up + GLU, causal depthwise convolution (left-padded by kernel - 1), clamp, RMSNorm, SiLU,
    down, residual. Its norms do take rms_norm_eps."""

    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.pre_layer_norm = Gemma4RMSNorm(D, eps=config.rms_norm_eps)
        self.linear_start = nn.Linear(D, D * 2, bias=False)
        self.depthwise_conv1d = nn.Conv1d(D, D, config.conf_conv_kernel_size, groups=D, bias=False)
        self.conv_norm = Gemma4RMSNorm(D, eps=config.rms_norm_eps)
        self.linear_end = nn.Linear(D, D, bias=False)
        self.causal_padding = config.conf_conv_kernel_size - 1

    def __call__(self, x: mx.array) -> mx.array:
        a, b = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = self.depthwise_conv1d(mx.pad(a * mx.sigmoid(b), [(0, 0), (self.causal_padding, 0), (0, 0)]))
        clip = clip_value(self.config, h.dtype)
        return self.linear_end(nn.silu(self.conv_norm(mx.clip(h, -clip, clip)))) + x


class Gemma3nAudioConformerBlock(nn.Module):
    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.config = config
        self.ffw_layer_start = Gemma3nAudioConformerFeedForward(config)
        self.attention = Gemma3nAudioConformerAttention(config)
        self.lconv1d = Gemma3nAudioConformerLightConv1d(config)
        self.ffw_layer_end = Gemma3nAudioConformerFeedForward(config)
        self.norm = Gemma4RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, valid: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), mask)
        x = self.ffw_layer_end(self.lconv1d(x * valid[..., None].astype(x.dtype)))  # padded frames: zeros
        clip = clip_value(self.config, x.dtype)
        return self.norm(mx.clip(x, -clip, clip))


class Gemma3nAudioEncoder(nn.Module):
    def __init__(self, config: Gemma3nAudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = Gemma3nAudioSubSampleConvProjection(config)
        self.conformer = [Gemma3nAudioConformerBlock(config) for _ in range(config.conf_num_hidden_layers)]

    def __call__(self, audio_mel, audio_mel_mask=None) -> tuple:
        """(B, T, input_feat_size) log-mel features and their (B, T) mask, numpy or MLX, in transformers'
        convention: True marks a PADDED frame (Gemma3nModel passes ~input_features_mask; None here: none
        padded) -> (last_hidden_state (B, T', hidden_size), audio_mel_mask (B, T') bool, True = padded), with
        T' = ceil(ceil(T / 4) / conf_reduction_factor) for the released strides. Padded outputs are zeros."""
        config = self.config
        features = mx.array(np.asarray(audio_mel, np.float32)) if isinstance(audio_mel, np.ndarray) \
            else mx.array(audio_mel)
        if features.ndim != 3 or 0 in features.shape or features.shape[2] != config.input_feat_size:
            raise MlxGemmaError(f"audio_mel has shape {tuple(features.shape)}; this audio tower takes (clips, frames, "
                                f"{config.input_feat_size} mel bins) with at least one frame (use the checkpoint's "
                                "feature extractor)")
        if audio_mel_mask is None:
            mask = mx.zeros(features.shape[:2], dtype=mx.bool_)
        else:
            mask = mx.array(np.asarray(audio_mel_mask)).astype(mx.bool_)
            if mask.shape != features.shape[:2]:
                raise MlxGemmaError(f"audio_mel_mask has shape {tuple(mask.shape)}, expected "
                                    f"{tuple(features.shape[:2])}")
        h = self.subsample_conv_projection(features)
        # Each subsampled frame takes the mask of the frame its receptive field starts on.
        stride = math.prod(s[0] for s in config.sscp_conv_stride_size)
        mask = mask[:, mx.minimum(mx.arange(h.shape[1]) * stride, mask.shape[1] - 1)]
        valid = mx.logical_not(mask)
        attention_mask = local_attention_mask(valid, config)
        for block in self.conformer:
            h = block(h, valid, attention_mask)
        if config.conf_reduction_factor > 1:
            h, mask = h[:, :: config.conf_reduction_factor], mask[:, :: config.conf_reduction_factor]
        return mx.where(mask[..., None], mx.array(0.0, h.dtype), h), mask

    def sanitize(self, weights: dict) -> dict:
        """Weights under this tower's prefix (model.audio_tower. stripped): PyTorch's convolutions, (O, I, kh,
        kw) and depthwise (D, 1, K), become MLX's (O, kh, kw, I) and (D, K, 1). MLX checkpoints (mlx-vlm's
        conversions) hold them so already: told apart by shape (read as MLX's where both fit, I = kh = kw)."""
        config, out = self.config, {}
        for k, v in weights.items():
            for i in range(2):
                if k == f"subsample_conv_projection.conv_{i}.conv.weight" and v.ndim == 4:
                    kh, kw = config.sscp_conv_kernel_size[i]
                    in_channels = 1 if i == 0 else config.sscp_conv_channel_size[0]
                    if tuple(v.shape[1:]) != (kh, kw, in_channels):
                        v = v.transpose(0, 2, 3, 1)
            if k.endswith("depthwise_conv1d.weight") and v.ndim == 3 and v.shape[-1] != 1:
                v = v.transpose(0, 2, 1)  # (K = 1 is the same array either way)
            out[k] = v
        return out


class Gemma3nMultimodalEmbedder(nn.Module):
    """Audio or vision into the text model's space (transformers' embed_audio / embed_vision): hard tokens (ids
    in [vocab_offset, vocab_offset + vocab_size)) are looked up and RMS-normed, soft tokens (a tower's output)
    RMS-normed by their own norm; then projected to the text width and RMS-normed without a scale.
    multimodal_config: anything with hidden_size, rms_norm_eps, vocab_offset, vocab_size (Gemma3nAudioConfig,
    a vision config); text_config: anything with hidden_size."""

    def __init__(self, multimodal_config, text_config):
        super().__init__()
        self.multimodal_hidden_size = multimodal_config.hidden_size
        self.eps = multimodal_config.rms_norm_eps
        self.vocab_offset = multimodal_config.vocab_offset
        self.vocab_size = multimodal_config.vocab_size
        self.text_hidden_size = text_config.hidden_size
        self.embedding = nn.Embedding(self.vocab_size, self.multimodal_hidden_size)
        self.hard_embedding_norm = Gemma4RMSNorm(self.multimodal_hidden_size, eps=self.eps)
        self.soft_embedding_norm = Gemma4RMSNorm(self.multimodal_hidden_size, eps=self.eps)
        self.embedding_projection = nn.Linear(self.multimodal_hidden_size, self.text_hidden_size, bias=False)
        self.embedding_post_projection_norm = Gemma4RMSNorm(self.text_hidden_size, eps=self.eps, with_scale=False)

    def __call__(self, input_ids=None, inputs_embeds=None) -> mx.array:
        if (input_ids is None) == (inputs_embeds is None):
            raise MlxGemmaError("the multimodal embedder takes exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            h = mx.array(inputs_embeds)
            if h.ndim == 0 or h.shape[-1] != self.multimodal_hidden_size:
                raise MlxGemmaError(f"inputs_embeds has shape {tuple(h.shape)}; this embedder takes "
                                    f"(..., {self.multimodal_hidden_size})")
            h = self.soft_embedding_norm(h)
        else:
            ids = mx.array(input_ids)
            if not mx.issubdtype(ids.dtype, mx.integer):
                raise MlxGemmaError(f"input_ids are {ids.dtype}, expected integer token ids")
            ids = ids.astype(mx.int64) - self.vocab_offset
            if ids.size and ((ids < 0) | (ids >= self.vocab_size)).any().item():
                raise MlxGemmaError(f"input_ids hold ids outside [{self.vocab_offset}, "
                                    f"{self.vocab_offset + self.vocab_size}), the ids this embedder embeds")
            h = self.hard_embedding_norm(self.embedding(ids))
        return self.embedding_post_projection_norm(self.embedding_projection(h))

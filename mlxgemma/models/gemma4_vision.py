"""Gemma 4's vision tower (transformers' Gemma4VisionModel): a ViT over a variable number of patches. The
processor (media/gemma4_images.py) cuts each image into patches of 3 * patch_size**2 pixels, gives each its
(x, y) place in the patch grid and pads every image to the same patch count with (-1, -1). A linear patch
embedding plus a learned table per axis, then Gemma 4 layers: sandwich RMSNorms with plain weights, q and k
RMS-normalised per head and v without a weight, attention unscaled and bidirectional over the valid patches,
a 2-D "axial" RoPE (the first half of each head turns with x, the second with y). Then each
pooling_kernel_size**2 block of patches is averaged into one soft token, scaled by sqrt(hidden_size) and
optionally standardised; the padding is dropped, so the output is every image's soft tokens, one after the
other. Linears may clip their inputs and outputs to bounds stored in the checkpoint (use_clipped_linears).

Module and parameter names are transformers' state_dict names (the `model.vision_tower.` prefix removed);
mlx-vlm's Gemma 4 port names them the same. Reference: transformers/models/gemma4/modeling_gemma4.py."""

import math
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import activation
from .config import MAX_SIZE, BaseConfig, check_rope
from .gemma4 import Gemma4ClippableLinear, Gemma4RMSNorm

CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


@dataclass
class Gemma4VisionConfig(BaseConfig):
    model_type: str = "gemma4_vision"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    attention_bias: Optional[bool] = False  # read by transformers, used by nothing: the linears have no bias
    attention_dropout: Optional[float] = 0.0
    rope_parameters: Optional[dict] = None
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    initializer_range: float = 0.02

    writes_legacy_rope_keys = False

    def resolve(self, legacy: dict) -> None:
        where = "vision_config"
        # As transformers standardises it: a legacy rope_scaling / rope_theta fills in, theta defaults to 100,
        # and "default" means "axial" (the released config.json files say "default"); nothing else is built.
        params = dict(legacy.get("rope_scaling") or self.rope_parameters or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", legacy.get("rope_theta", 100.0))
        if params["rope_type"] == "default":
            params["rope_type"] = "axial"
        check_rope(params, f"{where}.rope_parameters", ("axial",))
        self.rope_parameters = params
        activation(self.hidden_activation, f"{where}.hidden_activation")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "patch_size", "pooling_kernel_size",
                     "position_embedding_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 < value <= MAX_SIZE):
                raise MlxGemmaError(f"{where}: {name} is {value!r}, expected a positive size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MlxGemmaError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 4:
            raise MlxGemmaError(f"{where}: head_dim {self.head_dim} is not a multiple of 4 (the 2-D rope turns "
                                "each head's halves, for x and y, in pairs)")
        if self.pooling_kernel_size == 1:
            # transformers skips the pooling then and returns its padding mask as the mask of valid tokens,
            # so its output is the padding rows: there is no right answer to be exact to.
            raise MlxGemmaError(f"{where}: pooling_kernel_size 1 is not supported (transformers' Gemma 4 "
                                "returns the padding patches then)")


class Gemma4VisionPatchEmbedder(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixel_values: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # Pixels come in [0, 1]; the model wants [-1, 1] (the processor does not normalise). In the pixels'
        # dtype, then cast, as transformers does.
        x = (2 * (pixel_values - 0.5)).astype(self.position_embedding_table.dtype)
        # One learned vector per x and per y, summed; padding (-1) is looked up at 0 and then zeroed.
        clamped = mx.maximum(positions, 0)
        table = self.position_embedding_table
        pos = table[0][clamped[..., 0]] + table[1][clamped[..., 1]]
        return self.input_proj(x) + mx.where(padding[..., None], mx.array(0, pos.dtype), pos)


def axial_rope(positions: mx.array, head_dim: int, theta: float, dtype) -> tuple:
    """cos and sin (B, L, 1, 2, head_dim // 4) of each patch: axis 0 turns by x, axis 1 by y, at frequencies
    theta^(-2i / (head_dim / 2)) (transformers' inv_freq over head_dim // 2), in float32 and then cast to the
    activations' dtype as transformers casts them. Padding keeps its -1 positions (its rows are dropped)."""
    half = head_dim // 2
    inv_freq = 1.0 / (mx.array(theta, dtype=mx.float32) ** (mx.arange(0, half, 2).astype(mx.float32) / half))
    angles = positions[..., None].astype(mx.float32) * inv_freq  # (B, L, 2, head_dim // 4)
    return mx.cos(angles)[:, :, None].astype(dtype), mx.sin(angles)[:, :, None].astype(dtype)


def apply_multidimensional_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (B, L, heads, head_dim): each axis' half of the head rotated as rotate_half rotates a whole head
    (channel j with j + head_dim // 4 of that half): transformers' apply_multidimensional_rope for 2 axes."""
    shape = x.shape
    x = x.reshape(*shape[:-1], 2, 2, shape[-1] // 4)  # (..., axis, which half of the axis' channels, pairs)
    a, b = x[..., 0, :], x[..., 1, :]
    return mx.stack([a * cos - b * sin, b * cos + a * sin], axis=-2).reshape(shape)


class Gemma4VisionAttention(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = Gemma4ClippableLinear(config, D, self.n_heads * d)
        self.k_proj = Gemma4ClippableLinear(config, D, self.n_kv_heads * d)
        self.v_proj = Gemma4ClippableLinear(config, D, self.n_kv_heads * d)
        self.o_proj = Gemma4ClippableLinear(config, self.n_heads * d, D)
        self.q_norm = Gemma4RMSNorm(d, config.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(d, config.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, rope: tuple, mask: Optional[mx.array]) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim))
        q, k = apply_multidimensional_rope(q, *rope), apply_multidimensional_rope(k, *rope)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # Scale 1: the norms fix the logits' size. The mask hides padding keys only; padding queries see the
        # valid patches and give finite rows, which the pooler zeroes, so no softmax row is all masked.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Gemma4VisionMLP(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        D, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = Gemma4ClippableLinear(config, D, hidden)
        self.up_proj = Gemma4ClippableLinear(config, D, hidden)
        self.down_proj = Gemma4ClippableLinear(config, hidden, D)
        self.act = activation(config.hidden_activation, "vision_config.hidden_activation")

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma4VisionEncoderLayer(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4VisionAttention(config)
        self.mlp = Gemma4VisionMLP(config)
        self.input_layernorm = Gemma4RMSNorm(D, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps)

    def __call__(self, x: mx.array, rope: tuple, mask: Optional[mx.array]) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma4VisionEncoder(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.layers = [Gemma4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class Gemma4VisionModel(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = Gemma4VisionPatchEmbedder(config)
        self.encoder = Gemma4VisionEncoder(config)
        # (transformers' pooler has no weights: the pooling is done in __call__)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def __call__(self, pixel_values, pixel_position_ids) -> mx.array:
        """pixel_values (images, patches, 3 * patch_size**2) in [0, 1] and pixel_position_ids (images, patches,
        2) of (x, y), (-1, -1) for padding, as the processor makes them (numpy or MLX) -> the soft tokens of
        every image, one image after the other: (sum of soft_tokens_per_image, hidden_size), in the model's
        dtype. Equal to transformers' Gemma4VisionModel(...).last_hidden_state."""
        if not isinstance(pixel_values, mx.array):
            pixel_values = mx.array(np.asarray(pixel_values, dtype=np.float32))
        positions, padding, cells, rows = self._layout(pixel_values.shape, pixel_position_ids)
        positions, padding_mx = mx.array(positions), mx.array(padding)
        h = self.patch_embedder(pixel_values, positions, padding_mx)
        rope = axial_rope(positions, self.config.head_dim, self.config.rope_parameters["rope_theta"], h.dtype)
        mask = ~padding_mx[:, None, None, :] if padding.any() else None
        for layer in self.encoder.layers:
            h = layer(h, rope, mask)
        return self._pool(h, padding_mx, mx.array(cells), mx.array(rows))

    def _layout(self, shape: tuple, pixel_position_ids) -> tuple:
        """The index bookkeeping, in numpy (it decides the output's shape): positions, padding, each patch's
        pooling cell and the flat indices of the (image, cell) rows kept."""
        positions = np.asarray(pixel_position_ids)
        shape, p = tuple(shape), self.config.patch_size
        k2 = self.config.pooling_kernel_size ** 2
        if positions.ndim != 3 or positions.shape[-1] != 2 or not np.issubdtype(positions.dtype, np.integer):
            raise MlxGemmaError(f"pixel_position_ids has shape {positions.shape} and dtype {positions.dtype}; "
                                "expected integers of shape (images, patches, 2): use the model's processor")
        if shape != (*positions.shape[:2], 3 * p * p):
            raise MlxGemmaError(f"pixel_values has shape {shape}; with these position ids the vision tower takes "
                                f"{(*positions.shape[:2], 3 * p * p)}: use the model's processor")
        if shape[1] % k2:
            raise MlxGemmaError(f"{shape[1]} patches per image is not a multiple of pooling_kernel_size**2 ({k2})")
        padding = (positions == -1).all(-1)
        if padding.all(-1).any():
            raise MlxGemmaError(f"image {int(np.argmax(padding.all(-1)))} has no patches (only padding)")
        clamped = np.maximum(positions, 0)
        if clamped.max() >= self.config.position_embedding_size:
            raise MlxGemmaError(f"a patch position reaches {int(clamped.max())}; the vision tower has "
                                f"{self.config.position_embedding_size} positions per axis")
        # transformers' _avg_pool_by_positions: the cell of patch (x, y) is (x // k, y // k) in a grid of
        # (width // k) cells a row, width taken over the patches (padding counts as 0). Padding falls into
        # cell 0, which makes cell 0 count as used (it always is: patch (0, 0) is valid).
        k, length = self.config.pooling_kernel_size, shape[1] // k2
        width = clamped[..., 0].max(-1, keepdims=True) + 1
        cells = clamped[..., 0] // k + (width // k) * (clamped[..., 1] // k)
        if cells.max() >= length:
            raise MlxGemmaError("the patch positions do not fit the pooling grid: each image's patch grid must be "
                                f"a multiple of {k} patches a side and hold at most {shape[1]} patches")
        used = np.zeros((shape[0], length), dtype=bool)
        np.put_along_axis(used, cells, True, axis=1)
        return positions, padding, cells.astype(np.int32), np.flatnonzero(used).astype(np.int32)

    def _pool(self, h: mx.array, padding: mx.array, cells: mx.array, rows: mx.array) -> mx.array:
        """Gemma4VisionPooler, then the padding rows dropped and standardize: the average of each cell's
        patches by a one-hot matmul in float32 (padding zeroed first), rounded to the model's dtype, scaled
        by sqrt(hidden_size) in float32 (it can pass float16's range), standardised in float32, cast back."""
        B, L, D = h.shape
        k2, dtype = self.config.pooling_kernel_size ** 2, h.dtype
        h = mx.where(padding[..., None], mx.array(0, dtype), h)
        weights = (cells[..., None] == mx.arange(L // k2)).astype(mx.float32) / k2  # (B, L, cells)
        pooled = (weights.swapaxes(1, 2) @ h.astype(mx.float32)).astype(dtype)
        out = pooled.reshape(-1, D)[rows].astype(mx.float32) * math.sqrt(D)
        if self.config.standardize:
            out = (out - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return out.astype(dtype)

    def soft_tokens_per_image(self, pixel_position_ids) -> List[int]:
        """How many of __call__'s rows belong to each image: its valid patches // pooling_kernel_size**2, as
        transformers' get_image_features splits them."""
        valid = (np.asarray(pixel_position_ids) != -1).all(-1)
        return [int(n) // self.config.pooling_kernel_size ** 2 for n in valid.sum(-1)]

    def sanitize(self, weights: dict) -> dict:
        """Weights under this tower's prefix. transformers' and mlx-vlm's names are ours. Dropped: the rotary
        inv_freq (not a weight) and clip bounds where the config does not clip, which transformers ignores
        and mlx-vlm's sanitize drops (a checkpoint may carry them whatever its config says)."""
        out = {}
        for k, v in weights.items():
            if ".rotary_emb." in k or k.startswith("rotary_emb."):
                continue
            if k.rsplit(".", 1)[-1] in CLIP_BOUNDS and not self.config.use_clipped_linears:
                continue
            out[k] = v
        return out

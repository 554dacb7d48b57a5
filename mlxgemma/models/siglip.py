"""SigLIP vision tower (the image encoder of T5Gemma 2 and Gemma 3): a ViT without a class token. Patches
by a strided convolution, a learned position per patch, pre-LayerNorm blocks of biased multi-head attention
and a tanh-GELU MLP, a final LayerNorm. T5Gemma 2 reads `last_hidden_state`; the attention-pooling head is
never used there, so it is not built. Reference: transformers/models/siglip (SiglipVisionModel)."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import activation, heads
from .config import BaseConfig


@dataclass
class SiglipVisionConfig(BaseConfig):
    model_type: str = "siglip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    def resolve(self, legacy: dict) -> None:
        self.check_divisible_heads("vision_config")
        if self.image_size % self.patch_size:
            raise MlxGemmaError(f"vision_config: image_size {self.image_size} is not a multiple of patch_size "
                                f"{self.patch_size}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=True)
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(N, C, H, W) channels-first, as processors make them -> (N, patches, D) in row-major patch order."""
        x = pixel_values.transpose(0, 2, 3, 1).astype(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding(mx.arange(x.shape[1]))  # (quantized or not)


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (D // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def __call__(self, x: mx.array) -> mx.array:
        q, k, v = (heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act, "vision_config.hidden_act")

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = [SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class SiglipVisionModel(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """pixel_values (N, C, image_size, image_size) -> last_hidden_state (N, patches, D)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, size, size):
            raise MlxGemmaError(f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower takes "
                                f"(images, {self.config.num_channels}, {size}, {size}): prepare images with the "
                                "model's processor")
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)

    def sanitize(self, weights: dict) -> dict:
        """Weights under this tower's prefix: PyTorch's OIHW convolution becomes MLX's OHWI; an extra
        `vision_model.` level (older checkpoints) is dropped, as is the unused pooling head."""
        out = {}
        for k, v in weights.items():
            k = k.removeprefix("vision_model.")
            if k.startswith("head."):
                continue
            if k == "embeddings.patch_embedding.weight" and v.ndim == 4 and v.shape[-1] != self.config.num_channels:
                v = v.transpose(0, 2, 3, 1)  # OIHW -> OHWI (MLX checkpoints are OHWI already)
            out[k] = v
        return out

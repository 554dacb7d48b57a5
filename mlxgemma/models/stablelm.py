"""StableLM: LayerNorm (with bias) pre-norm decoder, unscaled embeddings, untied lm_head, SiLU gated MLP,
partial rotary (only the first rotary_ndims channels of each head turn, half-split among themselves),
optional q/k/v bias, optional per-head q/k LayerNorm (a weight per head), optional parallel residual.
Reference: transformers/models/stablelm."""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, Attention, PreTrainedModel, RoPE, activation, as_input_ids, layer_masks, make_caches
from .config import FULL, BaseConfig, single_rope
from .heads import CausalLM, SequenceClassification, TokenClassification


@dataclass
class StableLmConfig(BaseConfig):
    model_type: str = "stablelm"
    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: Optional[dict] = None
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: Optional[int] = 0
    eos_token_id: Any = 0
    pad_token_id: Optional[int] = None

    def resolve(self, legacy: dict) -> None:
        self.rope_parameters = single_rope(self.rope_parameters, legacy, 10000.0, partial_rotary_factor=0.25)
        self.check_divisible_heads()
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.layer_types = [FULL] * self.num_hidden_layers
        self.sliding_window = None
        if self.classifier_dropout is None:
            self.classifier_dropout = self.hidden_dropout


class StableLmLayerNormPerHead(nn.Module):
    """A bias-free LayerNorm over head_dim with its own weight for each head (weights: norms.{h}.weight)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norms = [nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(num_heads)]
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:  # x: (B, H, L, d)
        weight = mx.stack([n.weight for n in self.norms])[None, :, None, :]
        return mx.fast.layer_norm(x, None, None, self.eps) * weight


class StableLmAttention(Attention):
    """The shared attention with StableLM's projections (o_proj never biased) and per-head q/k LayerNorm."""

    def __init__(self, config: StableLmConfig):
        nn.Module.__init__(self)
        D, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale, self.softcap = d**-0.5, None
        bias = config.use_qkv_bias
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(D, D, bias=False)
        if config.qk_layernorm:
            self.q_layernorm = StableLmLayerNormPerHead(d, self.n_heads, config.layer_norm_eps)
            self.k_layernorm = StableLmLayerNormPerHead(d, self.n_kv_heads, config.layer_norm_eps)
        self.rope = RoPE(d, config.rope_parameters)  # rotates int(d * partial_rotary_factor) channels

    def normalize(self, q: mx.array, k: mx.array):
        return (self.q_layernorm(q), self.k_layernorm(k)) if "q_layernorm" in self else (q, k)

    def keep_heads(self, q_heads: slice, kv_heads: slice) -> None:
        """Tensor parallelism (distributed.shard_attention): this rank's heads keep their LayerNorms."""
        if "q_layernorm" in self:
            self.q_layernorm.norms = self.q_layernorm.norms[q_heads]
            self.k_layernorm.norms = self.k_layernorm.norms[kv_heads]


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config: StableLmConfig, layer_idx: int):
        super().__init__()
        self.attention_type = FULL
        self.parallel = config.use_parallel_residual
        self.self_attn = StableLmAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, activation(config.hidden_act, "hidden_act"))
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        normed = self.input_layernorm(x)
        if self.parallel:  # attention and MLP read the same normed input
            return x + self.self_attn(normed, mask, cache) + self.mlp(normed)
        h = x + self.self_attn(normed, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class StableLmModel(PreTrainedModel):
    def __init__(self, config: StableLmConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [StableLmDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids, attention_mask=None, cache=None) -> mx.array:
        input_ids = as_input_ids(input_ids, self.config.vocab_size)
        h = self.embed_tokens(input_ids)  # no sqrt(D) scaling in StableLM
        masks = layer_masks(self.config.layer_types, cache, h.shape[1], attention_mask, None)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, masks[FULL], c)
        return self.norm(h)

    def make_cache(self, max_kv_size=None) -> list:
        return make_caches(self.config.layer_types, None, max_kv_size)

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


class StableLmForCausalLM(CausalLM):
    base_model_class = StableLmModel


class StableLmForSequenceClassification(SequenceClassification):
    base_model_class = StableLmModel


class StableLmForTokenClassification(TokenClassification):
    base_model_class = StableLmModel

"""Gemma (v1): pre-norm decoder, Gemma RMSNorm (1 + w), scaled embeddings, tied lm_head, full causal
attention scaled by head_dim^-0.5, tanh-GELU gated MLP. Reference: transformers/models/gemma."""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import MLP, Attention, RMSNorm, activation, as_input_ids, layer_masks, make_caches, scaled_embedding
from .config import FULL, BaseConfig, single_rope
from .heads import CausalLM, SequenceClassification, TokenClassification


@dataclass
class GemmaConfig(BaseConfig):
    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_bidirectional_attention: Optional[bool] = None

    def resolve(self, legacy: dict) -> None:
        if self.hidden_act == "gelu":  # the official releases say "gelu" and mean the tanh approximation
            self.hidden_act = "gelu_pytorch_tanh"
        self.rope_parameters = single_rope(self.rope_parameters, legacy, 10000.0)
        if self.use_bidirectional_attention:
            # transformers' eager and sdpa paths disagree on this flag for Gemma v1: there is no reference.
            raise MlxGemmaError("config.json: use_bidirectional_attention is not supported for Gemma (v1)")
        self.layer_types = [FULL] * self.num_hidden_layers
        self.sliding_window = None


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, config.rope_parameters, scale=config.head_dim**-0.5)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, activation(config.hidden_act, "hidden_act"))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaModel(nn.Module):
    """Embeddings, decoder layers, final norm. Gemma 2 and Gemma 3 reuse this forward with their own layers."""

    decoder_layer_class = GemmaDecoderLayer

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None, cache=None, inputs_embeds=None, blocks=None) -> mx.array:
        """inputs_embeds (B, L, D) stand in for the scaled embeddings of input_ids (Gemma 3 with images:
        image features spliced in); blocks (B, L) let each image block attend within itself (image_blocks)."""
        config = self.config
        if inputs_embeds is None:
            input_ids = as_input_ids(input_ids, config.vocab_size)
            h = scaled_embedding(self.embed_tokens, input_ids, config.hidden_size)
        else:
            h = inputs_embeds
        masks = layer_masks(config.layer_types, cache, h.shape[1], attention_mask, config.sliding_window,
                            bool(getattr(config, "use_bidirectional_attention", False)), blocks)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, masks[layer.attention_type], c)
        return self.norm(h)

    def make_cache(self, max_kv_size=None) -> list:
        return make_caches(self.config.layer_types, self.config.sliding_window, max_kv_size)

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


class GemmaForCausalLM(CausalLM):
    base_model_class = GemmaModel


class GemmaForSequenceClassification(SequenceClassification):
    base_model_class = GemmaModel


class GemmaForTokenClassification(TokenClassification):
    base_model_class = GemmaModel

"""Gemma 2: Gemma with sandwich norms (a post-norm on each sublayer's output before the residual add),
sliding-window layers alternating with full ones (layer 0 slides), attention scaled by
query_pre_attn_scalar^-0.5 and softcapped before the mask, and softcapped final logits.
Reference: transformers/models/gemma2. (mlx-lm's gemma2 has no sliding window at all.)"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import MLP, Attention, RMSNorm, activation
from .config import FULL, SLIDING, check_layer_types, single_rope
from .gemma import GGUF_BLOCK_NAMES, GemmaConfig, GemmaModel, read_gguf_config
from .heads import CausalLM, SequenceClassification, TokenClassification


@dataclass
class Gemma2Config(GemmaConfig):
    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = 30.0
    attn_logit_softcapping: Optional[float] = 50.0

    def resolve(self, legacy: dict) -> None:
        self.rope_parameters = single_rope(self.rope_parameters, legacy, 10000.0)
        if self.use_bidirectional_attention:
            raise MlxGemmaError("config.json: use_bidirectional_attention is not supported for Gemma 2")
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers)]
        check_layer_types(self.layer_types, self.num_hidden_layers)
        if SLIDING in self.layer_types and not self.sliding_window:
            raise MlxGemmaError("config.json: sliding layers need a positive sliding_window")

    gguf_architecture = "gemma2"
    gguf_block_names = GGUF_BLOCK_NAMES

    @classmethod
    def from_gguf(cls, gguf) -> dict:
        config = read_gguf_config(gguf)
        config.update(gguf_attention(gguf, config, big_layers=46))
        config.update(attn_logit_softcapping=gguf.hparam("attn_logit_softcapping", 50.0, float),
                      final_logit_softcapping=gguf.hparam("final_logit_softcapping", 30.0, float))
        return config


def gguf_attention(gguf, config: dict, big_layers: int) -> dict:
    """query_pre_attn_scalar and sliding_window of a llama.cpp Gemma 2 or 3 file. llama.cpp scales queries by
    hidden_size / heads for the 27B, which it tells by its layer count (big_layers), else by head_dim."""
    big = config["num_hidden_layers"] == big_layers
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    return {"query_pre_attn_scalar": scalar, "sliding_window": gguf.hparam("attention.sliding_window", 4096)}


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Gemma2Config, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = self.make_attention(config)
        act = activation(config.hidden_activation, "hidden_activation")
        self.mlp = MLP(config.hidden_size, config.intermediate_size, act)
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def make_attention(self, config: Gemma2Config) -> Attention:
        return Attention(config, config.rope_parameters, scale=config.query_pre_attn_scalar**-0.5,
                         softcap=config.attn_logit_softcapping)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def scaling_groups(self) -> list:
        """As Gemma's (gemma.py), the MLP read through pre_feedforward_layernorm."""
        return [("mlp.up_proj", ["mlp.down_proj"]),
                ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]


class Gemma2Model(GemmaModel):
    decoder_layer_class = Gemma2DecoderLayer


class Gemma2ForCausalLM(CausalLM):
    base_model_class = Gemma2Model


class Gemma2ForSequenceClassification(SequenceClassification):
    base_model_class = Gemma2Model


class Gemma2ForTokenClassification(TokenClassification):
    base_model_class = Gemma2Model

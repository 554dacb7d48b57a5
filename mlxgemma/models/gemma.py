"""Gemma (v1): pre-norm decoder, Gemma RMSNorm (1 + w), scaled embeddings, tied lm_head, full causal
attention scaled by head_dim^-0.5, tanh-GELU gated MLP. Also what llama.cpp's Gemma files (GGUF) of every
Gemma generation name alike. Reference: transformers/models/gemma."""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import (MLP, Attention, PreTrainedModel, RMSNorm, activation, as_input_ids, layer_masks, make_caches,
                     scaled_embedding)
from .config import FULL, BaseConfig, single_rope
from .heads import CausalLM, SequenceClassification, TokenClassification

# llama.cpp's tensor names -> transformers', in each block (blk.N.*) and at the top, as every Gemma has them.
GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


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

    gguf_architecture = "gemma"
    gguf_norm_offset = 1.0  # llama.cpp stores the RMSNorm weights of Gemma 1 to 3 as 1 + w
    gguf_block_names = dict(GGUF_BLOCK_NAMES, ffn_norm="post_attention_layernorm")  # (Gemma 1's second norm)

    @classmethod
    def from_gguf(cls, gguf) -> dict:
        return read_gguf_config(gguf)

    @classmethod
    def gguf_weight_name(cls, name: str) -> Optional[str]:
        return gguf_weight_name(name, cls.gguf_block_names)

    @classmethod
    def gguf_stop_tokens(cls, has_eot: bool) -> tuple:
        """Gemma chat ends turns with <end_of_turn>: the file's eot id, else that token."""
        return () if has_eot else (b"<end_of_turn>",)


def read_gguf_config(gguf) -> dict:
    """The config.json fields a llama.cpp file of Gemma 1 to 3 gives alike (gguf: gguf_import.GGUFFile)."""
    heads, hidden, layers = (gguf.hparam(k, required=True) for k in ("attention.head_count", "embedding_length",
                                                                      "block_count"))
    if heads <= 0 or hidden <= 0:
        raise MlxGemmaError(f"GGUF metadata: {gguf.architecture}.attention.head_count and embedding_length must be "
                            "positive")
    head_dim = gguf.hparam("attention.key_length", hidden // heads)
    return {
        "vocab_size": len(gguf.required("tokenizer.ggml.tokens", list)), "hidden_size": hidden,
        "intermediate_size": gguf.hparam("feed_forward_length", required=True), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": gguf.hparam("attention.head_count_kv", heads),
        "head_dim": head_dim, "rms_norm_eps": gguf.hparam("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": gguf.hparam("context_length", 8192),
        "rope_theta": gguf.hparam("rope.freq_base", 10000.0, float),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": gguf.field("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": gguf.field("tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": gguf.field("tokenizer.ggml.padding_token_id", 0),
    }


def gguf_weight_name(name: str, block_names: dict = GGUF_BLOCK_NAMES) -> Optional[str]:
    """The transformers name of a llama.cpp Gemma tensor; None if it is not one of those."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


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

    def scaling_groups(self) -> list:
        """For AWQ's input scaling (checkpoints/awq.py): (what divides its outputs, the linears that read
        them), by path in the layer; up_proj divides by its rows, down_proj reads act(gate) * up."""
        return [("mlp.up_proj", ["mlp.down_proj"]),
                ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]


class GemmaModel(PreTrainedModel):
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

"""Gemma 3 (text): Gemma 2's sandwich layer with per-head q/k RMSNorm before RoPE, no attention softcap
(the config field is ignored, as in transformers), five sliding layers to one full by default, and a rope
per layer type (full: theta 1e6 plus any linear scaling; sliding: theta 1e4, unscaled). Also the text part of
multimodal `gemma3` checkpoints, and the bidirectional (EmbeddingGemma) variant.
Reference: transformers/models/gemma3."""

from dataclasses import dataclass
from typing import Optional

from .common import Attention
from .config import FULL, SLIDING, check_layer_types, check_rope, pattern_layer_types
from .gemma2 import Gemma2Config, Gemma2DecoderLayer, gguf_attention
from .gemma import GemmaModel, read_gguf_config
from .heads import CausalLM, SequenceClassification

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                    "multi_modal_projector.")


@dataclass
class Gemma3TextConfig(Gemma2Config):
    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[bool] = False

    def resolve(self, legacy: dict) -> None:
        if self.use_bidirectional_attention:
            self.sliding_window = self.sliding_window // 2 + 1  # transformers' exclusive |i - j| bound
        if self.layer_types is None:
            self.layer_types = pattern_layer_types(self.num_hidden_layers, legacy.get("sliding_window_pattern", 6))
        check_layer_types(self.layer_types, self.num_hidden_layers)
        self.rope_parameters = rope_per_layer_type(self.rope_parameters, legacy)

    gguf_architecture = "gemma3"

    @classmethod
    def from_gguf(cls, gguf) -> dict:
        """Gemma 2's reading without its softcaps (Gemma 3 has none); llama.cpp fixes a local rope theta of 1e4
        and five sliding layers to one full for Gemma 3."""
        config = read_gguf_config(gguf)
        config.update(gguf_attention(gguf, config, big_layers=62))
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
        if gguf.hparam("rope.scaling.type", kind=str) == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": gguf.hparam("rope.scaling.factor", kind=float)}
        return config


def rope_per_layer_type(rope_parameters: Optional[dict], legacy: dict) -> dict:
    """A rope per layer type, nested by type, as transformers' Gemma 3 and Gemma 3n read it: a flat dict is
    one rope for every type; legacy rope_scaling applies to full layers only, rope_theta is the full layers'
    theta and rope_local_base_freq the sliding layers'."""
    params = {t: dict(p) for t, p in (rope_parameters or {}).items() if isinstance(p, dict)}
    if rope_parameters and not params:  # a flat dict: one rope for every type
        params = {FULL: dict(rope_parameters), SLIDING: dict(rope_parameters)}
    full = params.setdefault(FULL, {"rope_type": "default"})
    sliding = params.setdefault(SLIDING, {"rope_type": "default"})
    full.update(legacy.get("rope_scaling") or {})
    full.setdefault("rope_theta", legacy.get("rope_theta", 1_000_000.0))
    sliding.setdefault("rope_theta", legacy.get("rope_local_base_freq", 10_000.0))
    for name, p in params.items():
        p.setdefault("rope_type", p.get("type", "default"))
        check_rope(p, f"rope_parameters.{name}")
    return params


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def make_attention(self, config: Gemma3TextConfig) -> Attention:
        return Attention(config, config.rope_parameters[self.attention_type],
                         scale=config.query_pre_attn_scalar**-0.5, qk_norm=True)


class Gemma3TextModel(GemmaModel):
    decoder_layer_class = Gemma3DecoderLayer

    def sanitize(self, weights: dict) -> dict:
        """Multimodal checkpoints: keep the language model (either hub layout), drop the vision parts."""
        return language_model_part(super().sanitize(weights), _VISION_PREFIXES)


def language_model_part(weights: dict, drop: tuple) -> dict:
    """The weights of a multimodal checkpoint's language model, named as its CausalLM's (model.*, lm_head.*),
    from either layout (model.language_model.* or language_model.model.*); keys starting with `drop` go."""
    out = {}
    for k, v in weights.items():
        if k.startswith(drop):
            continue
        for prefix in _TEXT_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                k = k if k.startswith("lm_head.") else "model." + k
                break
        out[k] = v
    return out


class Gemma3ForCausalLM(CausalLM):
    base_model_class = Gemma3TextModel


class Gemma3TextForSequenceClassification(SequenceClassification):
    base_model_class = Gemma3TextModel

"""Gemma 4's assistant drafters (model_type gemma4_assistant; gemma4_unified_assistant for the 12B Unified):
multi-token prediction heads that draft for a Gemma 4 target.

A drafter has no keys or values of its own: every layer is a KV-shared Gemma 4 layer (q_proj, q_norm, o_proj
and the MLP) that attends over what the target's last full-attention and last sliding layer computing keys
hold (its "store" layers, config.kv_stores). Its input is concat(target's scaled embedding of the last token,
target's last hidden state after the final norm), projected to its width (pre_projection); its output is the
next token's logits and a state projected back to the target's width (post_projection), which stands in for
the target's hidden state at the next drafting step. Within a round every query sits at the position of the
last token the target has seen the token before (the target's cache offset), and reads:
- on full layers, every key the target's store layer holds (bidirectional: all of them are in the past);
- on sliding layers, the last `sliding_window` of them (transformers flips a bidirectional window mask to
  look back; the target's ring holds exactly those).
E2B/E4B's drafters score only the tokens of the top centroid_intermediate_top_k clusters (masked_embedding,
use_ordered_embeddings): the rest of the vocabulary gets the smallest computed logit minus 1.

Reference: transformers/models/gemma4_assistant (Gemma4AssistantForCausalLM, Gemma4AssistantMaskedEmbedder)
and generation/candidate_generator.py (Gemma4AssistantCandidateGenerator). Weights keep transformers' names.
"""

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import scaled_embedding
from .config import FULL, SLIDING, BaseConfig
from .gemma4 import Gemma4PreTrainedModel, Gemma4TextModel
from .gemma4_config import Gemma4TextConfig


class _AllShared:
    """Every layer of a drafter reads the target's keys and values (transformers: num_kv_shared_layers ==
    num_hidden_layers; unset means so), and a drafter has none of per-layer inputs, experts or wide MLPs."""

    def _kv_sharing(self) -> None:
        n = self.num_hidden_layers
        if self.num_kv_shared_layers in (0, None):
            self.num_kv_shared_layers = n
        if self.num_kv_shared_layers != n:
            raise MlxGemmaError(f"config.json text_config: every layer of a Gemma 4 assistant reads the target's keys "
                                f"(num_kv_shared_layers {n}), got {self.num_kv_shared_layers}")
        for name in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block",
                     "use_double_wide_mlp"):
            if getattr(self, name):
                raise MlxGemmaError(f"config.json text_config: a Gemma 4 assistant has no {name} (got "
                                    f"{getattr(self, name)!r}, expected 0/false)")
        self.first_kv_shared_layer_idx, self.kv_stores, self.kv_donors = 0, {}, {}


@dataclass
class Gemma4AssistantTextConfig(_AllShared, Gemma4TextConfig):
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0


def _unified_text_config():
    from .gemma4_unified import Gemma4UnifiedTextConfig

    @dataclass
    class Gemma4UnifiedAssistantTextConfig(_AllShared, Gemma4UnifiedTextConfig):
        vocab_size_per_layer_input: int = 0

    return Gemma4UnifiedAssistantTextConfig


@dataclass
class Gemma4AssistantConfig(BaseConfig):
    model_type: str = "gemma4_assistant"
    text_config: Any = None
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    writes_legacy_rope_keys = False
    target_model_types = ("gemma4", "gemma4_text")  # what it drafts for (config.json model_type)

    def text_config_class(self):
        return Gemma4AssistantTextConfig

    def resolve(self, legacy: dict) -> None:
        text = self.text_config if self.text_config is not None else {}
        if not isinstance(text, dict):
            raise MlxGemmaError("config.json: text_config must be an object")
        cls = self.text_config_class()
        text = dict(text, model_type=cls.model_type, tie_word_embeddings=self.tie_word_embeddings)
        if text.get("vocab_size_per_layer_input") == 0:  # (0 is a drafter's, and its default: not a size to check)
            del text["vocab_size_per_layer_input"]
        self.text_config = cls.from_dict(text, "config.json text_config", require=False)
        if self.use_ordered_embeddings:
            C, k, V = self.num_centroids, self.centroid_intermediate_top_k, self.text_config.vocab_size
            if not (isinstance(C, int) and C > 0 and V % C == 0 and isinstance(k, int) and 0 < k <= C):
                raise MlxGemmaError(f"config.json: num_centroids {C!r} must divide vocab_size {V} and "
                                    f"centroid_intermediate_top_k {k!r} be 1..num_centroids")

    def __getattr__(self, name: str):
        """What generation reads of a config (vocab_size, eos_token_id, ...) is the text model's."""
        if name.startswith("__") or "text_config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.text_config, name)


@dataclass
class Gemma4UnifiedAssistantConfig(Gemma4AssistantConfig):
    model_type: str = "gemma4_unified_assistant"

    target_model_types = ("gemma4_unified",)

    def text_config_class(self):
        return _unified_text_config()


class Gemma4AssistantMaskedEmbedder(nn.Module):
    """Logits of the tokens in the top-k clusters only: centroid scores pick k clusters, token_ordering lists
    each cluster's tokens (vocab_size / num_centroids of them), their rows of the head give their logits."""

    def __init__(self, config: Gemma4AssistantConfig):
        super().__init__()
        D, V = config.text_config.hidden_size, config.text_config.vocab_size
        self.top_k, self.num_centroids = config.centroid_intermediate_top_k, config.num_centroids
        self.centroids = nn.Linear(D, self.num_centroids, bias=False)
        self.token_ordering = mx.zeros((V,), dtype=mx.int32)

    def __call__(self, h: mx.array, head_rows) -> mx.array:
        """h (B, L, D), head_rows(ids) -> the head's rows of ids (..., D): logits (B, L, vocab)."""
        B, L, _ = h.shape
        scores = self.centroids(h)
        top = mx.argpartition(-scores, self.top_k - 1, axis=-1)[..., : self.top_k]  # (their order is irrelevant)
        clusters = self.token_ordering.reshape(self.num_centroids, -1)
        ids = clusters[top].reshape(B, L, -1)  # (B, L, k * tokens per cluster)
        selected = (h[..., None, :] @ head_rows(ids).swapaxes(-1, -2))[..., 0, :]
        # transformers fills with one minimum over the whole batch; per row, a row's draft does not depend on
        # the other rows of a batch (the same at batch 1, where transformers drafts).
        fill = selected.min(axis=-1, keepdims=True) - 1.0
        out = mx.broadcast_to(fill, (B, L, self.token_ordering.shape[0]))
        return mx.put_along_axis(out, ids, selected, axis=-1)


class Gemma4AssistantForCausalLM(Gemma4PreTrainedModel):
    """model(inputs_embeds, shared_kv_states, offset) -> (logits, state): see the module's docstring. The
    decoding side is decode/proposers.py's Assistant; target_states and inputs read what the target gives."""

    is_drafter = True

    def __init__(self, config: Gemma4AssistantConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.model = Gemma4TextModel(text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = Gemma4AssistantMaskedEmbedder(config)

    def check_calibration(self) -> None:
        raise MlxGemmaError("a Gemma 4 assistant runs on its target's states, which calibration does not have: "
                            "quantize it with -q, without --calibrate")

    @property
    def layers(self) -> list:
        """(mlx-lm's quantization recipes count the layers here)"""
        return self.model.layers

    def __call__(self, inputs_embeds: mx.array, shared_kv_states: dict, offset) -> tuple:
        """inputs_embeds (B, L, 2 x backbone_hidden_size); shared_kv_states {layer type: (keys, values, mask)};
        offset: the queries' position (an int, or (B,) for a batch). -> (logits (B, L, vocab), the state
        (B, L, backbone_hidden_size) for the next step)."""
        h = self.pre_projection(inputs_embeds)
        for layer in self.model.layers:
            keys, values, mask = shared_kv_states[layer.attention_type]
            h, _ = layer(h, mask, None, None, (keys, values, offset))
        h = self.model.norm(h)
        if "masked_embedding" in self:
            logits = self.masked_embedding(h, self._head_rows)
        elif self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return logits, self.post_projection(h)

    def _head_rows(self, ids: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens(ids)  # (a quantized table gives its rows dequantized)
        head = self.lm_head
        if isinstance(head, nn.QuantizedLinear):
            return mx.dequantize(head.weight[ids], head.scales[ids], head.biases[ids], head.group_size, head.bits)
        return head.weight[ids]

    # What the target gives it.

    def check_target(self, target) -> None:
        """One clear line where this drafter cannot draft for target (another family, size or vocabulary)."""
        name = type(self.config).__name__.replace("Config", "")
        target_type = getattr(target.config, "model_type", None)
        if target_type not in self.config.target_model_types:
            raise MlxGemmaError(f"a {name} drafts for {' or '.join(self.config.target_model_types)} models; the "
                                f"model is {target_type}")
        text, mine = target.get_decoder().config, self.config.text_config
        if self.config.backbone_hidden_size != text.hidden_size or mine.vocab_size != text.vocab_size:
            raise MlxGemmaError(f"this drafter was made for a Gemma 4 of hidden size {self.config.backbone_hidden_size} "
                                f"and {mine.vocab_size} tokens; the model has {text.hidden_size} and "
                                f"{text.vocab_size}: use the drafter of this model")
        for t in set(mine.layer_types):
            if t not in text.kv_stores or mine.head_dims[t] != text.head_dims[t] or \
                    mine.num_attention_heads % text.kv_heads[t]:
                raise MlxGemmaError(f"this drafter's {t} layers do not fit the model's keys: use the drafter of this "
                                    "model")

    @staticmethod
    def target_states(target, cache) -> tuple:
        """(shared_kv_states, offset): the target's store layers' keys, values and masks, read from its caches
        (which hold each row's tokens but the last), and the last token's position (int, or (B,))."""
        stores = target.get_decoder().config.kv_stores
        shared = {t: cache[i].peek() for t, i in stores.items()}
        return shared, cache[next(iter(stores.values()))].offset

    @staticmethod
    def inputs(target, tokens: mx.array, state: mx.array) -> mx.array:
        """inputs_embeds: the target's scaled embeddings of tokens (B, 1) next to state (B, 1, D), the target's
        hidden state before them (or, within a round, the drafter's own)."""
        text = target.get_decoder()
        embeds = scaled_embedding(text.embed_tokens, tokens, text.config.hidden_size)
        return mx.concatenate([embeds, state.astype(embeds.dtype)], axis=-1)

    def sanitize(self, weights: dict) -> dict:
        """transformers' checkpoint: its rope tables and embedding scale are recomputed, a tied head's copy goes,
        token_ordering (int64 there) is int32."""
        drop = ("rotary_emb.", "embed_scale")
        out = {k: v for k, v in weights.items() if not any(d in k for d in drop)}
        if self.config.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        if "masked_embedding.token_ordering" in out:
            out["masked_embedding.token_ordering"] = out["masked_embedding.token_ordering"].astype(mx.int32)
        return out

    def checkpoint(self, weights: dict, config: dict) -> tuple:
        """transformers' names (mlx-vlm's too). The text config also states the head sizes as mlx-vlm reads them
        (global_head_dim: transformers 5 writes the full layers' size only in per_layer_config, which mlx-vlm
        ignores, taking its own default of 512) and the resolved layer types."""
        text, parsed = dict(config.get("text_config") or {}), self.config.text_config
        text.update(layer_types=list(parsed.layer_types), num_kv_shared_layers=parsed.num_hidden_layers)
        if SLIDING in parsed.head_dims:
            text["head_dim"] = parsed.head_dims[SLIDING]
        if FULL in parsed.head_dims:
            text["global_head_dim"] = parsed.head_dims[FULL]
        return weights, dict(config, text_config=text)


class Gemma4UnifiedAssistantForCausalLM(Gemma4AssistantForCausalLM):
    """The 12B Unified's drafter: the same model over the Unified text config."""

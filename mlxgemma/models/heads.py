"""The heads transformers puts on a decoder (causal LM, sequence and token classification) and their losses,
with transformers' conventions: the causal-LM loss shifts, -100 is ignored, losses are computed in float32,
sequences are pooled at their rightmost non-pad token. A family declares its heads in three lines:

    class GemmaForCausalLM(CausalLM):
        base_model_class = GemmaModel
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import PreTrainedModel, as_input_ids


def cross_entropy(logits: mx.array, labels: mx.array, ignore_index: int = -100,
                  num_items_in_batch: Optional[int] = None) -> mx.array:
    """Mean (or sum / num_items_in_batch) cross-entropy in float32 over the labels that are not ignored."""
    logits = logits.astype(mx.float32).reshape(-1, logits.shape[-1])
    labels = mx.array(labels).reshape(-1)
    keep = labels != ignore_index
    target = mx.take_along_axis(logits, mx.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    total = ((mx.logsumexp(logits, axis=-1) - target) * keep).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else keep.sum())


def causal_lm_loss(logits: mx.array, labels, num_items_in_batch: Optional[int] = None) -> mx.array:
    """transformers' causal-LM loss: logits[t] predicts labels[t + 1]; -100 is ignored."""
    labels = mx.array(labels)
    shifted = mx.concatenate([labels[:, 1:], mx.full((labels.shape[0], 1), -100, labels.dtype)], 1)
    return cross_entropy(logits, shifted, num_items_in_batch=num_items_in_batch)


def softcap(logits: mx.array, cap: Optional[float]) -> mx.array:
    """Gemma 2's final logit softcap, tanh(x / cap) * cap (none when cap is unset)."""
    return mx.tanh(logits / cap) * cap if cap else logits


def last_non_pad(ids: mx.array, pad: int) -> mx.array:
    """Each row's rightmost position whose id is not pad (0 if all are), for left and right padding alike."""
    return mx.argmax(mx.arange(ids.shape[1]) * (ids != pad), axis=-1)


def at_positions(x: mx.array, positions: mx.array) -> mx.array:
    """x (B, L, ...) at one position per row -> (B, ...)."""
    return mx.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]


def sequence_classification_loss(pooled: mx.array, labels, config) -> mx.array:
    """transformers' rule: MSE for one label (regression), cross-entropy for integer labels, else BCE with
    logits (config.problem_type, when set, decides)."""
    pooled = pooled.astype(mx.float32)
    labels = mx.array(labels)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif mx.issubdtype(labels.dtype, mx.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        diff = pooled.squeeze() - labels.astype(mx.float32).squeeze()
        return (diff * diff).mean()
    if problem == "single_label_classification":
        return cross_entropy(pooled, labels)
    if problem == "multi_label_classification":
        return nn.losses.binary_cross_entropy(pooled, labels.astype(mx.float32), reduction="mean")
    raise MlxGemmaError(f"config.json: problem_type {problem!r} is not one transformers knows")


class _Head(PreTrainedModel):
    base_model_class = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.base_model_class(config)

    @property
    def layers(self):
        return self.model.layers

    def get_decoder(self):
        return self.model.get_decoder()

    def make_cache(self, max_kv_size=None):
        return self.model.make_cache(max_kv_size)

    def sanitize(self, weights: dict) -> dict:
        return self.model.sanitize(weights)


class CausalLM(_Head):
    """model(input_ids, attention_mask=None, cache=None) -> logits (B, L, vocab). Also mlx-lm's model
    interface (__call__(inputs, cache=None), layers, make_cache), so mlx_lm.stream_generate runs it."""

    def __init__(self, config):
        super().__init__(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, input_ids, attention_mask=None, cache=None, return_hidden: bool = False, **inputs):
        """inputs: what the base model takes besides ids (Gemma 3 with images: inputs_embeds, blocks).
        return_hidden: (logits, the last hidden state after the final norm), which Gemma 4's assistant reads."""
        h = self.model(input_ids, attention_mask=attention_mask, cache=cache, **inputs)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        logits = softcap(logits, getattr(self.config, "final_logit_softcapping", None))
        return (logits, h) if return_hidden else logits

    def loss(self, input_ids, labels, attention_mask=None, num_items_in_batch=None) -> mx.array:
        return causal_lm_loss(self(input_ids, attention_mask=attention_mask), labels, num_items_in_batch)

    def sanitize(self, weights: dict) -> dict:
        weights = super().sanitize(weights)
        if self.config.tie_word_embeddings:  # a stored copy of the table (mlx-vlm quantizes one) goes
            for part in ("weight", "scales", "biases"):
                weights.pop(f"lm_head.{part}", None)
        return weights


class SequenceClassification(_Head):
    """model(input_ids, attention_mask=None) -> (B, num_labels), pooled at each row's rightmost non-pad token."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def __call__(self, input_ids, attention_mask=None, **inputs) -> mx.array:
        input_ids = as_input_ids(input_ids, self.config.vocab_size)
        logits = self.score(self.model(input_ids, attention_mask=attention_mask, **inputs))
        B, L = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:  # transformers' own error
                raise MlxGemmaError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = mx.array([L - 1])
        else:
            last = last_non_pad(input_ids, pad)
        return at_positions(logits, last)

    def loss(self, input_ids, labels, attention_mask=None) -> mx.array:
        return sequence_classification_loss(self(input_ids, attention_mask=attention_mask), labels, self.config)


class TokenClassification(_Head):
    """model(input_ids, attention_mask=None) -> (B, L, num_labels)."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def __call__(self, input_ids, attention_mask=None) -> mx.array:
        return self.score(self.model(input_ids, attention_mask=attention_mask))

    def loss(self, input_ids, labels, attention_mask=None) -> mx.array:
        """Cross-entropy over every position (no shift); -100 is ignored."""
        return cross_entropy(self(input_ids, attention_mask=attention_mask), labels)

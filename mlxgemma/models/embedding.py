"""Sentence embeddings: a bidirectional encoder's token states pooled into one vector per input, as
sentence-transformers computes it (its modules.json pipeline: Transformer, Pooling, Dense..., Normalize).

EmbeddingGemma (300M) is that pipeline over a bidirectional Gemma 3 text model: the mean of every token state
the attention mask keeps (prompt, <bos> and <eos> included: include_prompt), two linear maps without bias or
activation (768 -> 3072 -> 768), then L2 normalisation. EmbeddingGemma 2 is the mean of its (already projected)
token states, normalised. A Matryoshka dimension keeps the first `dim` values of the result, normalised again
(sentence-transformers' truncate_dim with normalize_embeddings; Ollama's `dimensions`).

The pooling accumulates in float32 and divides by max(count, 1e-9); normalisation divides by max(norm, 1e-12)
(torch's F.normalize), as the references do.
"""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError

POOLING_MODES = ("mean",)  # (what the Gemma embedders use; the others are refused where the pipeline is read)


class SentenceEmbedding(nn.Module):
    """model(input_ids, attention_mask=None, **media) -> (B, D) embeddings. `model` is the encoder (token states
    (B, L, H)); `dense` the sentence-transformers Dense modules (kept in float by quantization: see
    checkpoints/quantize.py's layer rules); prompts {name: text} and default_prompt_name as
    config_sentence_transformers.json says; max_seq_length the tokenizer's truncation length."""

    is_embedder = True

    def __init__(self, model: nn.Module, dense_shapes: List[tuple] = (), normalize: bool = True,
                 prompts: Optional[dict] = None, default_prompt_name: Optional[str] = None,
                 max_seq_length: Optional[int] = None):
        super().__init__()
        self.model = model
        self.dense = [nn.Linear(i, o, bias=False) for i, o in dense_shapes]
        self.normalize, self.prompts = normalize, dict(prompts or {})
        self.config = model.config
        # (sentence-transformers cuts at the smaller of its max_seq_length and the positions the model has)
        limits = [n for n in (max_seq_length, getattr(self.config, "max_position_embeddings", None)) if n]
        self.default_prompt_name, self.max_seq_length = default_prompt_name, min(limits) if limits else None

    def load_processor(self, path, tokenizer):
        return self.model.load_processor(path, tokenizer)

    @property
    def dimensions(self) -> int:
        """The embedding's full size."""
        if self.dense:
            return self.dense[-1].weight.shape[0]
        return getattr(self.model, "embedding_dim", None) or self.config.hidden_size

    def __call__(self, input_ids, attention_mask=None, **media) -> mx.array:
        ids = mx.array(input_ids) if not isinstance(input_ids, mx.array) else input_ids
        mask = mx.ones(ids.shape, dtype=mx.bool_) if attention_mask is None else mx.array(attention_mask)
        states = self.model(ids, attention_mask=mask, **media)
        x = mean_pool(states, mask)
        for layer in self.dense:
            x = layer(x.astype(layer.weight.dtype) if "scales" not in layer else x)
        return l2_normalize(x) if self.normalize else x


def mean_pool(states: mx.array, mask: mx.array) -> mx.array:
    """(B, L, H) states -> (B, H): the mean over the positions the mask keeps, in float32."""
    keep = mask.astype(mx.float32)[..., None]
    total = (states.astype(mx.float32) * keep).sum(axis=1)
    return total / mx.maximum(keep.sum(axis=1), 1e-9)


def l2_normalize(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x.astype(mx.float32), axis=-1, keepdims=True), 1e-12).astype(x.dtype)


def truncated(x: mx.array, dim: Optional[int], full: int, normalize: bool) -> mx.array:
    """The first `dim` values of each embedding (Matryoshka), normalised again when asked."""
    if dim is None or dim == full:
        return x
    if not (isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim <= full):
        raise MlxGemmaError(f"dimensions must be 1..{full} (this model's embedding size), got {dim!r}")
    x = x[:, :dim]
    return l2_normalize(x) if normalize else x

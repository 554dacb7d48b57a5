"""EmbeddingGemma 2 (model_type embedding_gemma2; its text part alone: embedding_gemma2_text): an encoder for
embeddings built of Gemma 4's pieces. Each layer is Gemma 4's sandwich (attention unscaled, q and k
RMS-normalised per head, v without a weight; full layers with their own head size and KV heads), then a
per-layer block that gates the residual with the layer's slice of the per-layer inputs, then `layer_scalar`.
The per-layer inputs are projection-only: norm(per_layer_model_projection(embeddings) / sqrt(hidden_size)),
no token table (Gemma 4's E models add one). Attention is bidirectional: a full layer sees every key that is
not padding, a sliding layer those with |q - k| <= sliding_window (an inclusive radius). There is no cache
and no vocabulary head: the output, last_hidden_state (B, L, embedding_dim), is embedding_projection(norm(h)),
per token; a sentence's embedding is its mean over the real tokens, L2-normalised (transformers' recipe,
what sentence-transformers' Pooling and Normalize modules do).

With Gemma 4's vision and audio towers (gemma4_multimodal.Gemma4MediaTowers), images, video frames and clips
are encoded and their features replace the embeddings at the placeholder tokens, which are otherwise
embedded as the pad token; the per-layer inputs then project the merged embeddings.

Modules and weights are named as transformers names them (language_model.*, vision_tower.*, audio_tower.*,
embed_vision.*, embed_audio.*), so transformers' checkpoints load as they are, the sentence-transformers
release too (its transformer module's weights sit at the folder's root).
The configs (EmbeddingGemma2TextConfig, EmbeddingGemma2Config) have transformers' fields and defaults, resolved
as Gemma 4's are (gemma4_config.py) to one rope, head size and KV head count per layer type; the whole model's
nests the text config beside optional gemma4_vision and gemma4_audio configs, as Gemma4Config does.
Reference: transformers/models/embedding_gemma2 (EmbeddingGemma2TextConfig, EmbeddingGemma2Config,
EmbeddingGemma2TextModel, EmbeddingGemma2Model)."""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import MLP, PreTrainedModel, activation, as_input_ids, layer_masks, scaled_embedding
from .config import FULL, MAX_SIZE, SLIDING, BaseConfig, check_layer_types, pattern_layer_types
from .gemma4 import Gemma4RMSNorm, Gemma4TextAttention
from .gemma4_config import attention_shapes, per_layer_overrides, rope_per_type
from .gemma4_multimodal import Gemma4Config, Gemma4MediaTowers

# Both types take the plain rope by default (Gemma 4's full layers take a proportional one).
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "default", "rope_theta": 1_000_000.0}}


@dataclass
class EmbeddingGemma2TextConfig(BaseConfig):
    model_type: str = "embedding_gemma2_text"
    vocab_size: int = 262_144
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = 2
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # The inclusive radius of the bidirectional window: a sliding layer's token sees |q - k| <= sliding_window
    # (not the one-sided width of the causal Gemmas).
    sliding_window: int = 512
    layer_types: Optional[list] = None
    hidden_size_per_layer_input: int = 512
    embedding_dim: int = 768
    # Read by transformers' __post_init__ but not kept (sliding_window_pattern too, a legacy key here): they
    # become per_layer_config overrides of the full layers, which is what save_pretrained writes instead.
    global_head_dim: Optional[int] = 512
    num_global_key_value_heads: Optional[int] = 1
    per_layer_config: Optional[dict] = None

    writes_legacy_rope_keys = False
    # What Gemma 4's attention (Gemma4TextAttention) asks of a config beyond these fields: here no layer takes
    # its keys as values, and (first_kv_shared_layer_idx, set by resolve) none shares another's.
    attention_k_eq_v = False

    def resolve(self, legacy: dict) -> None:
        n = self.num_hidden_layers
        layer_types = list(self.layer_types or pattern_layer_types(n, legacy.get("sliding_window_pattern", 6)))
        check_layer_types(layer_types, n)
        layer_types[-1] = FULL  # transformers forces the last layer to full attention (with a warning)
        self.layer_types = layer_types
        self.rope_parameters = rope_per_type(self.rope_parameters, layer_types, DEFAULT_ROPE)
        if self.per_layer_config is None:  # (unlike Gemma 4, the full layers' KV heads apply whatever else)
            full = {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_key_value_heads}
            overrides = {i: full for i, t in enumerate(layer_types) if t == FULL}
        else:
            overrides = per_layer_overrides(self.per_layer_config, n)
        self.head_dims, self.kv_heads = attention_shapes(self, overrides)
        self.first_kv_shared_layer_idx = n
        per_layer, dim = self.hidden_size_per_layer_input, self.embedding_dim
        if not (isinstance(per_layer, int) and 0 < per_layer and per_layer * n <= MAX_SIZE):
            raise MlxGemmaError(f"config.json: hidden_size_per_layer_input is {per_layer!r}, expected a positive size "
                                "that fits num_hidden_layers times in an MLX dimension")
        if not (isinstance(dim, int) and 0 < dim <= MAX_SIZE):
            raise MlxGemmaError(f"config.json: embedding_dim is {dim!r}, expected a positive size")


@dataclass
class EmbeddingGemma2Config(Gemma4Config):
    """The text config beside optional Gemma 4 vision and audio tower configs, with Gemma 4's token ids."""
    model_type: str = "embedding_gemma2"
    tie_word_embeddings: bool = False  # (no vocabulary head to tie: the embedding table is only an input)

    text_config_class = EmbeddingGemma2TextConfig


class EmbeddingGemma2PreTrainedModel(PreTrainedModel):
    """What an embedder answers differently from a decoder."""

    is_embedder = True  # encodes inputs into embeddings: no head, no cache, nothing to generate
    # (pipeline stages know a decoder layer's call, and each layer here takes its own slice of the per-layer
    # inputs: by heads and widths only)
    supports_pipeline = False
    readme_usage = ("```python\nimport mlxgemma\nmodel, processor = mlxgemma.load(\"path/to/this/folder\")\n"
                    "last_hidden_state = model(**processor([\"A sentence to embed.\"]))  # (B, L, embedding_dim)\n"
                    "```\n")

    def check_calibration(self) -> None:
        raise MlxGemmaError(f"{type(self).__name__} is an embedder: --calibrate measures next-token logits, which it "
                            "has none of")

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim


class EmbeddingGemma2TextPLE(nn.Module):
    """The per-layer inputs (B, L, layers, P), from the embeddings alone."""

    def __init__(self, config: EmbeddingGemma2TextConfig):
        super().__init__()
        D, self.n, self.p = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.per_layer_model_projection = nn.Linear(D, self.n * self.p, bias=False)
        self.per_layer_projection_norm = Gemma4RMSNorm(self.p, config.rms_norm_eps)
        self.scale = D**-0.5

    def __call__(self, h: mx.array) -> mx.array:
        projected = self.per_layer_model_projection(h) * self.scale
        return self.per_layer_projection_norm(projected.reshape(*h.shape[:-1], self.n, self.p))


class EmbeddingGemma2TextPLEBlock(nn.Module):
    """A layer's third residual block: down to P, gated by the layer's per-layer input, back up, normalised."""

    def __init__(self, config: EmbeddingGemma2TextConfig, act):
        super().__init__()
        D, P = config.hidden_size, config.hidden_size_per_layer_input
        self.act = act
        self.per_layer_input_gate = nn.Linear(D, P, bias=False)
        self.per_layer_projection = nn.Linear(P, D, bias=False)
        self.post_per_layer_input_norm = Gemma4RMSNorm(D, config.rms_norm_eps)

    def __call__(self, h: mx.array, per_layer_input: mx.array) -> mx.array:
        g = self.act(self.per_layer_input_gate(h)) * per_layer_input
        return h + self.post_per_layer_input_norm(self.per_layer_projection(g))


class EmbeddingGemma2EncoderLayer(nn.Module):
    def __init__(self, config: EmbeddingGemma2TextConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = Gemma4TextAttention(config, layer_idx)
        act = activation(config.hidden_activation, "hidden_activation")
        D, eps = config.hidden_size, config.rms_norm_eps
        self.mlp = MLP(D, config.intermediate_size, act)
        self.input_layernorm = Gemma4RMSNorm(D, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.layer_scalar = mx.ones((1,))
        self.ple_block = EmbeddingGemma2TextPLEBlock(config, act)

    def __call__(self, x: mx.array, per_layer_input: mx.array, mask=None) -> mx.array:
        a, _ = self.self_attn(self.input_layernorm(x), mask)
        h = x + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return self.ple_block(h, per_layer_input) * self.layer_scalar


class EmbeddingGemma2TextModel(EmbeddingGemma2PreTrainedModel):
    """model(input_ids, attention_mask=None) -> last_hidden_state (B, L, embedding_dim). attention_mask (B, L):
    1 for real tokens, 0 for padding (keys no token sees; the rows of padding are not meant to be read).
    inputs_embeds (B, L, hidden_size), the scaled embeddings with media features merged, stand in for input_ids
    (EmbeddingGemma2Model passes them)."""

    def __init__(self, config: EmbeddingGemma2TextConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = [EmbeddingGemma2EncoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = Gemma4RMSNorm(D, config.rms_norm_eps)
        self.ple = EmbeddingGemma2TextPLE(config)
        self.embedding_projection = nn.Linear(D, config.embedding_dim, bias=False)

    def embed(self, input_ids: mx.array) -> mx.array:
        """The input embeddings: the table's rows times sqrt(hidden_size) rounded to the weights' dtype."""
        return scaled_embedding(self.embed_tokens, input_ids, self.config.hidden_size)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> mx.array:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise MlxGemmaError("give input_ids or inputs_embeds, one of them")
        h = self.embed(as_input_ids(input_ids, config.vocab_size)) if inputs_embeds is None else inputs_embeds
        B, L, _ = h.shape
        if attention_mask is not None:
            if not isinstance(attention_mask, mx.array):
                attention_mask = mx.array(np.asarray(attention_mask))
            if tuple(attention_mask.shape) != (B, L):
                raise MlxGemmaError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({B}, {L}), one "
                                    "entry per token (1 real, 0 padding)")
        per_layer = self.ple(h)
        # bidirectional: |q - k| < window, so the inclusive radius sliding_window is a window of sliding_window + 1
        masks = layer_masks(config.layer_types, None, L, attention_mask, config.sliding_window + 1,
                            bidirectional=True)
        for i, layer in enumerate(self.layers):
            h = layer(h, per_layer[:, :, i], masks[layer.attention_type])
        return self.embedding_projection(self.norm(h))

    def sanitize(self, weights: dict) -> dict:
        """transformers' names; a base-model prefix ("model.") dropped, the rope's buffers too (not weights)."""
        return {k.removeprefix("model."): v for k, v in weights.items() if "rotary_emb." not in k}


class EmbeddingGemma2Model(Gemma4MediaTowers, EmbeddingGemma2PreTrainedModel):
    """model(input_ids, attention_mask=None, pixel_values=..., image_position_ids=..., input_features=...,
    input_features_mask=..., pixel_values_videos=..., video_position_ids=..., num_frames_per_video=...)
    -> last_hidden_state (B, L, embedding_dim), with transformers' keyword names (the processor's outputs).
    media_features (n, D): every placeholder's features already encoded, in prompt order (encode_media's output,
    concatenated), stand in for the media."""

    checkpoint_name = "EmbeddingGemma 2"
    vision_tower_name = "vision_tower"

    def __init__(self, config: EmbeddingGemma2Config):
        super().__init__()
        self.config = config
        self.language_model = EmbeddingGemma2TextModel(config.text_config)
        self.add_towers(config, config.text_config.hidden_size)

    @property
    def layers(self):
        return self.language_model.layers

    def get_decoder(self):
        return self.language_model

    def load_processor(self, path, tokenizer):
        from ..media.embedding_gemma2_processor import EmbeddingGemma2Processor

        return EmbeddingGemma2Processor.from_pretrained(path, tokenizer, self.config)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_position_ids=None,
                 input_features=None, input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
                 num_frames_per_video=None, media_features=None) -> mx.array:
        text = self.config.text_config
        _, h = self.embed_with_media(as_input_ids(input_ids, text.vocab_size), self.language_model.embed,
                                     text.pad_token_id, pixel_values, image_position_ids, input_features,
                                     input_features_mask, pixel_values_videos, video_position_ids,
                                     num_frames_per_video, media_features)
        return self.language_model(attention_mask=attention_mask, inputs_embeds=h)

    def sanitize(self, weights: dict) -> dict:
        """transformers' layout (a "model." prefix dropped where a wrapper saved one); the text part through
        EmbeddingGemma2TextModel.sanitize, each tower's through its own; a tower the config leaves out not
        used (transformers ignores its weights)."""
        out, text = {}, {}
        for k, v in weights.items():
            k = k.removeprefix("model.")
            if k.startswith("language_model."):
                text[k.removeprefix("language_model.")] = v
            else:
                out[k] = v
        out.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(text).items()})
        return self.sanitize_towers(out)

"""Gemma 3n (text): Gemma 4's attention (q, k and v normalised per head, v without a weight, scale 1, plain-weight
RMSNorms in float32) and KV sharing, inside a layer of its own: AltUp keeps altup_num_inputs copies ("streams")
of the hidden state, predicts all of them from each other before the layer (a router over the active stream
mixes them), runs the layer on the active one and corrects every stream by what the layer changed; LAuReL adds
a low-rank residual beside the attention; each layer's per-layer input (a second token table plus a
projection of the embedding) is gated into the other streams; the MLPs of the first layers keep only the
activations above a Gaussian quantile (activation sparsity). Also the text part of multimodal `gemma3n`
checkpoints without tower weights (those with them: gemma3n_multimodal.py).
Reference: transformers/models/gemma3n (Gemma3nTextConfig, Gemma3nTextModel, Gemma3nForCausalLM)."""

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import MLP, PreTrainedModel, activation, as_input_ids, layer_masks, make_caches, scaled_embedding
from .config import MAX_SIZE, BaseConfig, check_layer_types, kv_sharing, of_type, pattern_layer_types
from .distributed import world
from .gemma3 import language_model_part, rope_per_layer_type
from .gemma4 import Gemma4RMSNorm, Gemma4TextAttention, is_shared_kv_weight
from .heads import CausalLM

NON_TEXT = tuple(p + part for p in ("model.", "") for part in ("vision_tower.", "audio_tower.", "embed_vision.",
                                                                 "embed_audio."))


@dataclass
class Gemma3nTextConfig(BaseConfig):
    model_type: str = "gemma3n_text"
    vocab_size: int = 262_400
    hidden_size: int = 2048
    intermediate_size: Any = 16_384  # one width, or one per layer (MatFormer's sliced models)
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
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
    sliding_window: int = 512
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = 30.0
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_active_idx: int = 0
    # Read, not applied: transformers clips AltUp's coefficient weights in training only (as a trained
    # checkpoint's already are); mlx-lm and mlx-vlm clip them at inference too.
    altup_coef_clip: Optional[float] = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: Optional[list] = None

    attention_k_eq_v = False  # (what Gemma 4's attention asks: Gemma 3n's full layers have their own values)

    def resolve(self, legacy: dict) -> None:
        n = self.num_hidden_layers
        for name in ("head_dim", "sliding_window", "altup_num_inputs", "laurel_rank", "hidden_size_per_layer_input",
                     "vocab_size_per_layer_input", "altup_active_idx"):
            value = getattr(self, name)
            if not (of_type(value, int) and (value >= 0 if name == "altup_active_idx" else value > 0)):
                raise MlxGemmaError(f"config.json: {name} is {value!r}, expected a "
                                    f"{'stream index' if name == 'altup_active_idx' else 'positive size'}")
        self.check_divisible_heads()  # transformers' validate_architecture
        if self.head_dim % 2:
            raise MlxGemmaError(f"config.json: head_dim is {self.head_dim}, expected an even size (RoPE rotates pairs)")
        if n * self.hidden_size_per_layer_input > MAX_SIZE or self.altup_num_inputs**2 > MAX_SIZE:
            raise MlxGemmaError("config.json: num_hidden_layers x hidden_size_per_layer_input (or altup_num_inputs "
                                "squared) is more than an MLX dimension holds")
        self.intermediate_size = self._per_layer("intermediate_size", self.intermediate_size, n)
        self.layer_types = list(self.layer_types or pattern_layer_types(n, 5))
        check_layer_types(self.layer_types, n)
        sparsity = self.activation_sparsity_pattern
        if sparsity is None:  # transformers' default: the first 10 layers at 0.95 (none with 10 layers or fewer)
            sparse = 10 if n > 10 else 0
            sparsity = [0.95] * sparse + [0.0] * (n - sparse)
        if not (isinstance(sparsity, list) and len(sparsity) == n and all(of_type(p, float) and 0 <= p < 1
                                                                          for p in sparsity)):
            raise MlxGemmaError(f"config.json: activation_sparsity_pattern must give each of the {n} layers a "
                                f"sparsity in [0, 1), got {sparsity!r}"[:200])
        self.activation_sparsity_pattern = sparsity
        # transformers reads only nested (per layer type) rope_parameters: a flat dict is ignored there, and here.
        nested = {t: p for t, p in (self.rope_parameters or {}).items() if isinstance(p, dict)}
        self.rope_parameters = rope_per_layer_type(nested, legacy)
        for t, p in self.rope_parameters.items():
            if p.get("partial_rotary_factor", 1.0) != 1.0 and p["rope_type"] != "default":  # "default" ignores it
                raise MlxGemmaError(f"config.json: rope_parameters.{t} is a partial {p['rope_type']} rope, which "
                                    "transformers' Gemma 3n cannot apply either (its cos/sin would not cover the head)")
        self.head_dims = dict.fromkeys(self.rope_parameters, self.head_dim)  # Gemma 4's attention reads these
        self.kv_heads = dict.fromkeys(self.rope_parameters, self.num_key_value_heads)
        kv_sharing(self)
        if self.altup_active_idx >= self.altup_num_inputs:
            raise MlxGemmaError(f"config.json: altup_active_idx is {self.altup_active_idx}, expected one of the "
                                f"{self.altup_num_inputs} AltUp streams (0..{self.altup_num_inputs - 1})")

    @staticmethod
    def _per_layer(name: str, value, n: int) -> list:
        sizes = value if isinstance(value, list) else [value] * n
        if len(sizes) != n or not all(of_type(v, int) for v in sizes):
            raise MlxGemmaError(f"config.json: {name} must be one size or one for each of the {n} layers, got "
                                f"{value!r}"[:200])
        return sizes


class Gemma3nTextAttention(Gemma4TextAttention):
    """Gemma 4's attention, as transformers' Gemma3nTextAttention computes it (one head size and KV head count,
    a default or linear rope per layer type). A KV-shared layer has only q_proj, q_norm and o_proj and attends
    over what its donor's attention got back from its cache (passed in as `shared`)."""


class Gemma3nTextMLP(MLP):
    """The gated MLP; with activation sparsity p > 0 the gate keeps only what lies above its row's mean plus
    icdf(p) standard deviations (a Gaussian top-k), shifted down by that cutoff, before the activation."""

    def __init__(self, config: Gemma3nTextConfig, layer_idx: int):
        super().__init__(config.hidden_size, config.intermediate_size[layer_idx],
                         activation(config.hidden_activation, "hidden_activation"))
        self.activation_sparsity = config.activation_sparsity_pattern[layer_idx]
        if self.activation_sparsity > 0:
            self._std_multiplier = std_multiplier(self.activation_sparsity)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.activation_sparsity:
            return super().__call__(x)
        gate = self.gate_proj(x)
        mean, std = mx.mean(gate, axis=-1, keepdims=True), mx.std(gate, axis=-1, keepdims=True)  # (biased, ddof 0)
        cutoff = mean + std * self._std_multiplier  # (a float32 value: in bf16, rounded once, as torch's)
        return self.down_proj(self.act(nn.relu(gate - cutoff)) * self.up_proj(x))


def std_multiplier(sparsity: float) -> float:
    """torch's Normal(0, 1).icdf(p) on a float32 p, to the bit: erfinv(2p - 1) * sqrt(2), each step rounded to
    float32 as torch computes it. erfinv comes from the double-precision quantile: MLX's float32 erfinv is a
    few ulps off torch's (1.6448534 against 1.6448536 at 0.95), this matches it over p in [0.01, 0.99]."""
    f32 = np.float32
    t = f32(f32(2) * f32(sparsity) - f32(1))
    erfinv = f32(NormalDist().inv_cdf((float(t) + 1) / 2) / math.sqrt(2))
    return float(f32(erfinv * f32(math.sqrt(2))))


class Gemma3nTextLaurelBlock(nn.Module):
    """Learned Augmented Residual Layer: x + norm(right(left(x))), left and right of rank laurel_rank."""

    def __init__(self, config: Gemma3nTextConfig):
        super().__init__()
        self.linear_left = nn.Linear(config.hidden_size, config.laurel_rank, bias=False)
        self.linear_right = nn.Linear(config.laurel_rank, config.hidden_size, bias=False)
        self.post_laurel_norm = Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nTextAltUp(nn.Module):
    """Alternating Updates over the streams h (n, B, L, D). A router (norm, a scale of 1/D, a linear map, tanh in
    float32) reads one stream and gives each token n coefficients; predict mixes the streams by an n x n matrix
    made from them, correct adds each stream its coefficient (+1) times the layer's change of the active one."""

    def __init__(self, config: Gemma3nTextConfig):
        super().__init__()
        n, D = config.altup_num_inputs, config.hidden_size
        self.active = config.altup_active_idx
        self.correct_output_scale = mx.zeros((D,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(D, n, bias=False)
        self.router_norm = Gemma4RMSNorm(D, config.rms_norm_eps)
        self.router_input_scale = D**-1.0

    def compute_router_modalities(self, x: mx.array) -> mx.array:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def predict(self, h: mx.array) -> mx.array:
        modalities = self.compute_router_modalities(h[self.active])
        n = h.shape[0]
        # prediction j = h_j + sum_i coefs[j, i] h_i, as transformers' one matmul over (B, L, D, n) streams
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], n, n).swapaxes(-1, -2)
        return (h.transpose(1, 2, 3, 0) @ coefs).transpose(3, 0, 1, 2) + h

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        coefs = self.correction_coefs(self.compute_router_modalities(activated)) + 1.0
        innovation = activated - predictions[self.active]
        return innovation * coefs.transpose(2, 0, 1)[..., None] + predictions

    def scale_corrected_output(self, corrected: mx.array) -> mx.array:
        return corrected * self.correct_output_scale


class Gemma3nTextDecoderLayer(nn.Module):
    def __init__(self, config: Gemma3nTextConfig, layer_idx: int):
        super().__init__()
        D, P, eps = config.hidden_size, config.hidden_size_per_layer_input, config.rms_norm_eps
        self.attention_type = config.layer_types[layer_idx]
        self.active, self.correct_scale = config.altup_active_idx, config.altup_correct_scale
        self.self_attn = Gemma3nTextAttention(config, layer_idx)
        self.mlp = Gemma3nTextMLP(config, layer_idx)
        self.input_layernorm = Gemma4RMSNorm(D, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.act = activation(config.hidden_activation, "hidden_activation")
        self.altup = Gemma3nTextAltUp(config)
        self.laurel = Gemma3nTextLaurelBlock(config)
        self.per_layer_input_gate = nn.Linear(D, P, bias=False)
        self.per_layer_projection = nn.Linear(P, D, bias=False)
        self.post_per_layer_input_norm = Gemma4RMSNorm(D, eps)

    def __call__(self, h: mx.array, mask=None, cache=None, per_layer_input=None, shared=None):
        """h: the streams (n, B, L, D) -> (the streams, (keys, values, offset) this layer attended over)."""
        predictions = self.altup.predict(h)
        active = predictions[self.active]
        x = self.input_layernorm(active)
        laurel = self.laurel(x)
        attn, kv = self.self_attn(x, mask, cache, shared)
        x = (active + self.post_attention_layernorm(attn) + laurel) / math.sqrt(2)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, x)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        first = self.act(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        # (streams 1.., as transformers: with altup_active_idx > 0, stream 0 rather than the active one goes without)
        return mx.concatenate([corrected[:1], corrected[1:] + first]), kv


class Gemma3nPreTrainedModel(PreTrainedModel):
    """What Gemma 3n answers differently (Gemma3nTextModel and Gemma3nForCausalLM)."""

    supports_pipeline = False  # its last layers read earlier layers' keys and values: split by heads only
    vocab_sharded_tables = ("embed_tokens", "embed_tokens_per_layer")

    def shard(self, group=None) -> nn.Module:
        if world(group).size() > 1 and any(self.config.activation_sparsity_pattern):
            raise MlxGemmaError("Gemma 3n's sparse MLPs take the mean and spread of their whole width, which an MLP "
                                "split by width over ranks has not: run it on one machine")
        return super().shard(group)


class Gemma3nTextModel(Gemma3nPreTrainedModel):
    """Embeddings and per-layer inputs, the AltUp streams (the embedding and projections of it scaled to its
    size), decoder layers, the streams merged back (the average of the first and the projections of the others,
    scaled to its size), the final norm. The cache holds one entry per layer that computes keys and values (the
    first num_hidden_layers - num_kv_shared_layers): the shared layers read what the last earlier layer of their
    type got back from its cache, whatever kind of cache that is, as Gemma 4's do."""

    def __init__(self, config: Gemma3nTextConfig):
        super().__init__()
        self.config = config
        D, N, P = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = [Gemma3nTextDecoderLayer(config, i) for i in range(N)]
        self.norm = Gemma4RMSNorm(D, config.rms_norm_eps)
        self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, N * P)
        self.per_layer_model_projection = nn.Linear(D, N * P, bias=False)
        self.per_layer_projection_norm = Gemma4RMSNorm(P, config.rms_norm_eps)
        self.altup_projections = [nn.Linear(D, D, bias=False) for _ in range(1, config.altup_num_inputs)]
        self.altup_unembed_projections = [nn.Linear(D, D, bias=False) for _ in range(1, config.altup_num_inputs)]

    def __call__(self, input_ids, attention_mask=None, cache=None, inputs_embeds=None) -> mx.array:
        """inputs_embeds (B, L, D) stand in for the scaled embeddings of input_ids, which still give the
        per-layer inputs (transformers' multimodal model does the same)."""
        config = self.config
        input_ids = as_input_ids(input_ids, config.vocab_size)
        h0 = scaled_embedding(self.embed_tokens, input_ids, config.hidden_size) if inputs_embeds is None \
            else inputs_embeds
        per_layer = self.per_layer_inputs(input_ids, h0)
        owners = config.first_kv_shared_layer_idx
        if cache is not None and len(cache) != owners:
            raise MlxGemmaError(f"this Gemma 3n model takes {owners} layer caches (one per layer that computes keys "
                                f"and values, from model.make_cache()), got {len(cache)}")
        types = config.layer_types if cache is None else config.layer_types[:owners]
        masks = layer_masks(types, cache, h0.shape[1], attention_mask, config.sliding_window)
        target = mx.mean(h0**2, axis=-1, keepdims=True) ** 0.5
        h = mx.stack([h0] + [rescaled(proj(h0), target) for proj in self.altup_projections])
        donors, shared = set(config.kv_donors.values()), {}
        for i, layer in enumerate(self.layers):
            t = layer.attention_type
            c = cache[i] if cache is not None and i < owners else None
            h, kv = layer(h, masks[t], c, per_layer[:, :, i], shared.get(t) if i >= owners else None)
            if i in donors:
                shared[t] = kv
        target = mx.mean(h[0] ** 2, axis=-1, keepdims=True) ** 0.5
        streams = [h[0]] + [rescaled(proj(h[i + 1]), target) for i, proj in enumerate(self.altup_unembed_projections)]
        return self.norm(mx.mean(mx.stack(streams), axis=0))

    def per_layer_inputs(self, input_ids: mx.array, h: mx.array) -> mx.array:
        """(B, L, layers, P): each token's own per-layer embedding (ids past the per-layer table, Gemma 3n's
        image and audio tokens, read row 0) plus a projection of its embedding h, normalised; the sum scaled by
        1/sqrt(2)."""
        config = self.config
        shape = (*input_ids.shape, config.num_hidden_layers, config.hidden_size_per_layer_input)
        ids = mx.where(input_ids < config.vocab_size_per_layer_input, input_ids, 0)
        tokens = scaled_embedding(self.embed_tokens_per_layer, ids, shape[-1]).reshape(shape)
        projected = (self.per_layer_model_projection(h) * config.hidden_size**-0.5).reshape(shape)
        return (self.per_layer_projection_norm(projected) + tokens) * 2.0**-0.5

    def make_cache(self, max_kv_size=None) -> list:
        owners = self.config.first_kv_shared_layer_idx
        return make_caches(self.config.layer_types[:owners], self.config.sliding_window, max_kv_size)

    def sanitize(self, weights: dict) -> dict:
        """Multimodal checkpoints: the language model only (transformers' model.language_model.* or mlx-vlm's
        language_model.model.*), the towers and their embedders dropped. The k/v projections and norms of
        shared layers, which the released checkpoints and mlx-vlm's hold, go as transformers ignores them."""
        weights = language_model_part(weights, NON_TEXT)
        first = self.config.first_kv_shared_layer_idx
        return {k: v for k, v in weights.items()
                if "rotary_emb.inv_freq" not in k and not is_shared_kv_weight(k, first)}


def rescaled(x: mx.array, target: mx.array) -> mx.array:
    """x scaled to the root-mean-square size target (its own floored at sqrt(1e-5)), as transformers does."""
    return x * target / mx.sqrt(mx.maximum(mx.mean(x**2, axis=-1, keepdims=True), 1e-5))


class Gemma3nForCausalLM(Gemma3nPreTrainedModel, CausalLM):
    base_model_class = Gemma3nTextModel


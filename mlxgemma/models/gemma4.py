"""Gemma 4 (text): Gemma 3's sandwich layer with plain-weight RMSNorms (w, not 1 + w), attention unscaled
(q and k are RMS-normalised per head, v too, without a weight), and on full-attention layers their own head
size (global_head_dim), KV heads and a "proportional" partial RoPE. Optional parts, each as in a released
checkpoint: per-layer inputs (E2B/E4B: a second embedding table feeding every layer), KV sharing (the last
num_kv_shared_layers layers reuse an earlier layer's keys and values), keys as values on full layers
(attention_k_eq_v, 31B), double-wide MLPs on the shared layers, and a mixture-of-experts block beside the
MLP (gemma4_moe.py). Also the text part of multimodal `gemma4` checkpoints.
Reference: transformers/models/gemma4 (Gemma4TextConfig, Gemma4TextModel, Gemma4ForCausalLM)."""

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .common import (MLP, PreTrainedModel, activation, as_input_ids, attention, heads, layer_masks, make_caches,
                     scaled_embedding)
from .config import FULL, SLIDING
from .distributed import world
from .gemma3 import language_model_part
from .gemma4_checkpoint import checkpoint_of, experts_from_checkpoint
from .gemma4_config import Gemma4TextConfig
from .gemma4_moe import Gemma4TextExperts, Gemma4TextRouter, SummedExperts, dequantize_experts, router_bits
from .heads import CausalLM

_NON_TEXT = tuple(p + part for p in ("model.", "") for part in ("vision_tower.", "audio_tower.", "embed_vision.",
                                                                  "embed_audio.", "multi_modal_projector.",
                                                                  "vision_embedder."))


class Gemma4PreTrainedModel(PreTrainedModel):
    """What Gemma 4 answers differently (Gemma4TextModel and Gemma4ForCausalLM)."""

    supports_pipeline = False  # its last layers read earlier layers' keys and values: split by heads only
    # The E models' per-layer token table, as large as the rest of the model at 2B, splits by vocabulary too.
    vocab_sharded_tables = ("embed_tokens", "embed_tokens_per_layer")

    def layer_bits(self, path: str, bits: int) -> Optional[int]:
        """The router at ROUTER_BITS (gemma4_moe.py). The per-layer token table of the E models
        (vocab_size_per_layer_input x layers x hidden_size_per_layer_input: 262144 x 8960 in E2B, 2.35 G
        weights, more than the rest of the model) gets what the recipe gives it (4 bits at the default, in a
        token table's groups of 128; mlx-lm's converter does the same), not more: measured on a random-weight model of E2B's widths
        (benchmarks/gemma4_quant.py), 4 bits put 4.0% of error into the per-layer inputs (8 bits: 0.24%), but
        with the rest of the model at mixed_4_6 the next-token KL goes from 0.2020 (table in float) to 0.2025
        (table at 4 bits) -- 0.3% more -- while 8 bits would add 1.1 GiB (2380 against 1260 MiB) to a 4-bit
        E2B of about 2.5 GiB."""
        return router_bits(path, bits)

    def dequantize(self) -> nn.Module:
        """mlx-lm's dequantize_model knows only its own expert layers: ours are dequantized here."""
        return dequantize_experts(super().dequantize())

    def shard(self, group=None) -> nn.Module:
        """By heads and widths as every family; then each expert block by its intermediate width, its
        outputs summed over the ranks."""
        group = world(group)
        super().shard(group)
        if group.size() > 1:
            for path, m in list(self.named_modules()):
                if "router" in m and "experts" in m:
                    m.experts.shard_width(group, f"{path}.experts")
                    m.experts = SummedExperts(m.experts, group)
        return self

    def checkpoint(self, weights: dict, config: dict) -> tuple:
        """(weights, config.json) as mlxgemma.convert writes them; see checkpoint_of."""
        return checkpoint_of(self, weights, config)


class Gemma4RMSNorm(nn.Module):
    """RMSNorm scaled by its weight as stored (not 1 + w), or by nothing (with_scale=False: v_norm and the
    router's norm have no weight). As in transformers, all of it runs in float32."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        if with_scale:
            self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight.astype(mx.float32) if "weight" in self else None
        if x.dtype == mx.float32:
            return mx.fast.rms_norm(x, weight, self.eps)
        return mx.fast.rms_norm(x.astype(mx.float32), weight, self.eps).astype(x.dtype)


class Gemma4ClippableLinear(nn.Module):
    """A bias-free linear (`linear`), its input and output clamped to scalar bounds when the config (a tower's:
    use_clipped_linears) says so. The bounds start infinite (no clamp) and come from the checkpoint."""

    def __init__(self, config, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if config.use_clipped_linears:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        # MLX promotes a float32 0-d bound with bf16 values to float32; torch's clamp keeps the values' dtype.
        if "input_min" in self:
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        x = self.linear(x)
        if "input_min" in self:
            x = mx.clip(x, self.output_min.astype(x.dtype), self.output_max.astype(x.dtype))
        return x


class Gemma4RoPE(nn.Module):
    """Half-split RoPE over the whole head. "proportional" (full layers) rotates only the first
    partial_rotary_factor / 2 of the frequency pairs, with exponents over the WHOLE head size
    (theta^(2i/head_dim)), the other pairs not at all (an infinite period): so channel j pairs with
    j + head_dim/2, not with j + rotated/2 as a partial rope over the first channels would.
    "default" ignores partial_rotary_factor, as transformers' Gemma 4 does; "linear" divides positions."""

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.dims = head_dim
        theta = mx.array(float(params["rope_theta"]), dtype=mx.float32)
        factor = float(params.get("factor", 1.0)) if params["rope_type"] != "default" else 1.0
        pairs = head_dim // 2
        if params["rope_type"] == "proportional":
            pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        exponents = mx.arange(0, 2 * pairs, 2).astype(mx.float32) / head_dim
        still = mx.full((head_dim // 2 - pairs,), math.inf, dtype=mx.float32)
        self._freqs = mx.concatenate([factor * theta**exponents, still])

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


class Gemma4TextAttention(nn.Module):
    """Scale 1 (the norms fix the logits' size). A KV-shared layer has only q_proj, q_norm and o_proj and
    attends over the keys and values its donor layer attended over (passed in as `shared`)."""

    def __init__(self, config: Gemma4TextConfig, layer_idx: int):
        super().__init__()
        t = config.layer_types[layer_idx]
        d, D, eps, bias = config.head_dims[t], config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.kv_heads[t]
        self.is_kv_shared_layer = layer_idx >= config.first_kv_shared_layer_idx
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=bias)
        self.q_norm = Gemma4RMSNorm(d, eps)
        if not self.is_kv_shared_layer:
            self.k_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
            if not (config.attention_k_eq_v and t == FULL):  # else the values are the keys' projection
                self.v_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
            self.k_norm = Gemma4RMSNorm(d, eps)
            self.v_norm = Gemma4RMSNorm(d, eps, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=bias)
        self.rope = Gemma4RoPE(d, config.rope_parameters[t])

    def __call__(self, x: mx.array, mask=None, cache=None, shared=None):
        """-> (output, (keys, values, offset)): what this layer attended over, for the layers sharing it."""
        q = self.q_norm(heads(self.q_proj(x), self.n_heads))
        if shared is not None:
            k, v, offset = shared
        else:
            offset = cache.offset if cache is not None else 0
            k = heads(self.k_proj(x), self.n_kv_heads)
            v = heads(self.v_proj(x), self.n_kv_heads) if "v_proj" in self else k
            k, v = self.rope(self.k_norm(k), offset), self.v_norm(v)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        out = attention(self.rope(q, offset), k, v, 1.0, mask)
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (k, v, offset)


class Gemma4TextDecoderLayer(nn.Module):
    def __init__(self, config: Gemma4TextConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = Gemma4TextAttention(config, layer_idx)
        act = activation(config.hidden_activation, "hidden_activation")
        wide = config.use_double_wide_mlp and self.self_attn.is_kv_shared_layer
        self.mlp = MLP(config.hidden_size, config.intermediate_size * (2 if wide else 1), act)
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma4RMSNorm(D, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps)
        self.layer_scalar = mx.ones((1,))
        if config.hidden_size_per_layer_input:
            self.act = act
            self.per_layer_input_gate = nn.Linear(D, config.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, D, bias=False)
            self.post_per_layer_input_norm = Gemma4RMSNorm(D, eps)
        if config.enable_moe_block:
            self.router = Gemma4TextRouter(config)
            self.experts = Gemma4TextExperts(config, act)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(D, eps)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(D, eps)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(D, eps)

    def __call__(self, x: mx.array, mask=None, cache=None, per_layer_input=None, shared=None):
        a, kv = self.self_attn(self.input_layernorm(x), mask, cache, shared)
        h = x + self.post_attention_layernorm(a)
        f = self.mlp(self.pre_feedforward_layernorm(h))
        if "experts" in self:  # the experts run beside the MLP, routed on the un-normalised residual
            moe = self.experts(self.pre_feedforward_layernorm_2(h), *self.router(h))
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(f)
        if per_layer_input is not None:
            g = self.act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar, kv


class Gemma4TextModel(Gemma4PreTrainedModel):
    """Embeddings (and per-layer inputs), decoder layers, final norm. The cache holds one entry per layer that
    computes keys and values: layers 0..first_kv_shared_layer_idx - 1, so cache[i] is layer i's; the shared
    layers at the end read what their donor's attention got back from its cache (whatever kind of cache
    that is), with the mask of their common type."""

    # Where the tokens of an image block (use_bidirectional_attention "vision") see each other: on the sliding
    # layers, within the window (transformers' create_masks_for_vision_model). Gemma 4 unified differs.
    block_types = (SLIDING,)
    blocks_in_window = True

    def __init__(self, config: Gemma4TextConfig):
        super().__init__()
        self.config = config
        D, N, P = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = [Gemma4TextDecoderLayer(config, i) for i in range(N)]
        self.norm = Gemma4RMSNorm(D, config.rms_norm_eps)
        if P:
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, N * P)
            self.per_layer_model_projection = nn.Linear(D, N * P, bias=False)
            self.per_layer_projection_norm = Gemma4RMSNorm(P, config.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None, cache=None, inputs_embeds=None, blocks=None) -> mx.array:
        """inputs_embeds (B, L, D) stand in for the scaled embeddings of input_ids (with images: their features
        spliced in; input_ids, placeholders as the pad token, still give the per-layer inputs); blocks (B, L)
        let each image block attend within itself on the sliding layers (gemma4_multimodal.py)."""
        config = self.config
        input_ids = as_input_ids(input_ids, config.vocab_size)
        h = scaled_embedding(self.embed_tokens, input_ids, config.hidden_size) if inputs_embeds is None \
            else inputs_embeds
        per_layer = self.per_layer_inputs(input_ids, h) if config.hidden_size_per_layer_input else None
        owners = config.first_kv_shared_layer_idx
        if cache is not None and len(cache) != owners:
            raise MlxGemmaError(f"this Gemma 4 model takes {owners} layer caches (one per layer that computes keys "
                                f"and values, from model.make_cache()), got {len(cache)}")
        window = config.sliding_window + 1 if config.bidirectional else config.sliding_window  # |i - j| <= W there
        types = config.layer_types if cache is None else config.layer_types[:owners]
        masks = layer_masks(types, cache, h.shape[1], attention_mask, window, config.bidirectional, blocks,
                            block_types=self.block_types, blocks_in_window=self.blocks_in_window)
        donors, shared = set(config.kv_donors.values()), {}
        for i, layer in enumerate(self.layers):
            t = layer.attention_type
            c = cache[i] if cache is not None and i < owners else None
            h, kv = layer(h, masks[t], c, None if per_layer is None else per_layer[:, :, i],
                          shared.get(t) if i >= owners else None)
            if i in donors:
                shared[t] = kv
        return self.norm(h)

    def per_layer_inputs(self, input_ids: mx.array, h: mx.array) -> mx.array:
        """(B, L, layers, P): each token's own per-layer embedding plus a projection of its embedding h,
        normalised, the sum scaled by 1/sqrt(2)."""
        config = self.config
        shape = (*input_ids.shape, config.num_hidden_layers, config.hidden_size_per_layer_input)
        tokens = scaled_embedding(self.embed_tokens_per_layer, input_ids, shape[-1]).reshape(shape)
        projected = (self.per_layer_model_projection(h) * config.hidden_size**-0.5).reshape(shape)
        return (self.per_layer_projection_norm(projected) + tokens) * 2.0**-0.5

    def make_cache(self, max_kv_size=None) -> list:
        owners = self.config.first_kv_shared_layer_idx
        return make_caches(self.config.layer_types[:owners], self.config.sliding_window, max_kv_size)

    def sanitize(self, weights: dict) -> dict:
        """Multimodal checkpoints: the language model only (either layout, mlx-lm's language_model.model.*
        included). Shared layers' k/v projections and norms, where a checkpoint has them, are dropped, as
        transformers ignores them. Experts from transformers' tensors or mlx-lm's split layers (see
        experts_from_checkpoint)."""
        weights = language_model_part(weights, _NON_TEXT)
        first = self.config.first_kv_shared_layer_idx
        weights = {k: v for k, v in weights.items()
                   if "rotary_emb.inv_freq" not in k and not is_shared_kv_weight(k, first)}
        return experts_from_checkpoint(weights) if self.config.enable_moe_block else weights


def is_shared_kv_weight(key: str, first_shared: int) -> bool:
    """Whether key is a k/v projection or norm of a KV-shared layer (first_shared on), which transformers builds
    without and ignores in a checkpoint (Gemma 3n's and Gemma 4's released ones, and mlx-vlm's, hold them)."""
    parts = key.split(".")
    if "layers" not in parts or "self_attn" not in parts:
        return False
    i = parts.index("layers")
    return (i + 3 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= first_shared
            and parts[i + 2] == "self_attn" and parts[i + 3] in ("k_proj", "v_proj", "k_norm", "v_norm"))


class Gemma4ForCausalLM(Gemma4PreTrainedModel, CausalLM):
    base_model_class = Gemma4TextModel

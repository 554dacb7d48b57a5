"""The blocks every family here shares: the Gemma RMSNorm, RoPE per layer type, the attention core (scale,
softcap, GQA, masks), the gated MLP, the per-forward mask and cache bookkeeping, and PreTrainedModel, the base
of every model class: what convert, quantize, calibrate, the loaders and distributed.py ask of a family."""

import math
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from . import distributed
from .cache import KVCache, RotatingKVCache, causal_mask, uncached_mask
from .config import FULL, SLIDING

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "relu": nn.relu,
}


def activation(name: str, field: str):
    if name not in ACTIVATIONS:
        raise MlxGemmaError(
            f"config.json: {field} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Gemma's RMSNorm. The stored weight is an offset (the scale is 1 + w) and, as in transformers, the
    whole computation, 1 + w included, runs in float32 and is cast back only at the end. 1 + w is not kept
    between calls: a kept copy is one more resident array per norm and, as an evaluated leaf, it changes
    the order MLX schedules the graph in, which raised the prefill's peak memory above mlx-lm's."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def divide_output(self, s: mx.array) -> None:
        """Divide each output channel by s (checkpoints/awq.py moves s into the next linears' columns):
        1 + w becomes (1 + w) / s, kept in float32 as the norm computes."""
        self.weight = (1.0 + self.weight.astype(mx.float32)) / s.astype(mx.float32) - 1.0

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        if x.dtype == mx.float32:
            return mx.fast.rms_norm(x, scale, self.eps)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class RoPE(nn.Module):
    """Half-split (NeoX) rotary embedding over the first `dims` channels of each head, with transformers'
    exact frequencies theta^(2i/dims) in float32 ("linear" scaling divides the positions by its factor)."""

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.dims = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.scale = 1.0 / params["factor"] if params.get("rope_type") == "linear" else 1.0
        exponents = mx.arange(0, self.dims, 2).astype(mx.float32) / self.dims
        self._freqs = mx.array(float(params["rope_theta"]), dtype=mx.float32) ** exponents

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=self.scale,
                            offset=offset, freqs=self._freqs)


def attention(q, k, v, scale: float, mask, softcap: Optional[float] = None) -> mx.array:
    """softmax(q k^T * scale [softcapped] + mask) v over (B, H, L, d) queries and (B, Hkv, S, d) keys
    (or quantized (packed, scales, biases) keys and values: a quantized cache's)."""
    if isinstance(k, tuple):
        return quantized_attention(q, k, v, scale, mask, softcap)
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # The fused kernel cannot softcap (Gemma 2): the eager path of transformers, GQA by grouping queries.
    B, H, L, d = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, H // n_kv, L, d)
    probs = _probs((q @ k[:, :, None].swapaxes(-1, -2)) * scale, mask, softcap, q.dtype)
    return (probs @ v[:, :, None]).reshape(B, H, L, d)


def _probs(scores: mx.array, mask, softcap: Optional[float], dtype) -> mx.array:
    """Grouped scores (B, Hkv, rep, L, S) -> softcapped, masked, softmax in float32 (transformers' eager path)."""
    L, S = scores.shape[-2:]
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(dtype)


def quantized_attention(q, k: tuple, v: tuple, scale: float, mask, softcap: Optional[float] = None) -> mx.array:
    """attention on quantized keys and values: the scores and the output by quantized matmuls (the group
    size and bits follow from the shapes), GQA by grouping queries, the softmax in float32."""
    B, H, L, d = q.shape
    n_kv = k[0].shape[1]
    group, bits = d // k[1].shape[-1], k[0].shape[-1] * 32 // d
    value_bits = v[0].shape[-1] * 32 // (v[1].shape[-1] * group)  # keys and values may differ in bits
    q = (q * scale).reshape(B, n_kv, H // n_kv, L, d)
    k, v = tuple(x[:, :, None] for x in k), tuple(x[:, :, None] for x in v)
    probs = _probs(mx.quantized_matmul(q, *k, transpose=True, group_size=group, bits=bits), mask, softcap, q.dtype)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=group, bits=value_bits)  # (one group size)
    return out.reshape(B, H, L, -1)


def heads(x: mx.array, n: int) -> mx.array:
    """(B, L, n * d) -> (B, n, L, d)."""
    B, L, _ = x.shape
    return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Gemma-lineage self-attention: q/k/v/o projections (biased iff attention_bias), optional per-head
    q/k RMSNorm before RoPE (Gemma 3), RoPE for this layer's type, GQA, optional score softcap (Gemma 2)."""

    def __init__(self, config, rope_params: dict, scale: float, qk_norm: bool = False,
                 softcap: Optional[float] = None):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scale, self.softcap = scale, softcap
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.rope = RoPE(d, rope_params)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        q, k, v = self.project(x, cache)
        return self.output(attention(q, k, v, self.scale, mask, self.softcap))

    def project(self, x: mx.array, cache=None):
        """Query, key and value heads (B, heads, L, d) of x: q/k normalised and rotated at the cache's
        offset; keys and values joined to what the cache holds."""
        q = heads(self.q_proj(x), self.n_heads)
        k, v = heads(self.k_proj(x), self.n_kv_heads), heads(self.v_proj(x), self.n_kv_heads)
        q, k = self.normalize(q, k)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return q, k, v

    def output(self, out: mx.array) -> mx.array:
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def normalize(self, q: mx.array, k: mx.array):
        return (self.q_norm(q), self.k_norm(k)) if "q_norm" in self else (q, k)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases. A SiLU gate goes through mlx-lm's compiled swiglu (one kernel,
    as mlx-lm's StableLM). The tanh GELU is left as two ops: compiled with the product (shapeless), MLX
    still splits it in two kernels, and tiny Gemma 3's prefill peak rose (44.12 against 43.99 MiB)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up) if self.act is nn.silu else self.act(gate) * up)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x in one compiled kernel: mlx-lm's models.activations.swiglu, restated because importing
    mlx-lm imports transformers (see cache.py)."""
    return nn.silu(gate) * x


def scaled_embedding(embed_tokens, input_ids: mx.array, hidden_size: int) -> mx.array:
    """Gemma scales embeddings by sqrt(hidden_size) rounded to the weights' dtype (25.25 for D=640 in bf16)."""
    h = embed_tokens(input_ids)
    return h * mx.array(math.sqrt(hidden_size), dtype=mx.float32).astype(h.dtype)


def padding_of(attention_mask, L: int) -> Optional[mx.array]:
    """The new tokens' rows of a 2-D attention mask (B, L) or (B, past + L), as booleans; None if all real."""
    if attention_mask is None:
        return None
    mask = mx.array(attention_mask) if not isinstance(attention_mask, mx.array) else attention_mask
    if mask.ndim != 2 or mask.shape[1] < L:
        raise MlxGemmaError(
            f"attention_mask has shape {tuple(mask.shape)}; expected (batch, {L}) or (batch, past + {L})"
        )
    return mask[:, -L:].astype(mx.bool_)


def layer_masks(layer_types, caches, L: int, attention_mask, window: Optional[int],
                bidirectional: bool = False, blocks: Optional[mx.array] = None, block_types=None,
                blocks_in_window: bool = True) -> dict:
    """One mask per layer type, computed once from the first cache of that type; every cache then records
    which new tokens are padding. blocks (B, L): image blocks among the new tokens (image_blocks), which
    the layers of block_types (all when None) let attend within themselves: on sliding layers within the
    window, or with blocks_in_window=False across the whole block (the window bounds only the rest)."""
    valid = padding_of(attention_mask, L)
    if caches is None:
        masks = {t: uncached_mask(L, valid, window if t == SLIDING else None, bidirectional)
                 for t in set(layer_types)}
    else:
        if bidirectional:
            raise MlxGemmaError("a bidirectional model (use_bidirectional_attention) takes no cache")
        masks = {}
        for t, c in zip(layer_types, caches):
            if t not in masks:
                masks[t] = c.mask(L, valid)  # a cache's size is its layer's window
        for c in caches:
            c.record_padding(L, valid)
    if blocks is not None:
        offset = caches[0].offset if caches else 0
        masks = {t: with_blocks(m, blocks, offset, window if t == SLIDING and blocks_in_window else None)
                 if block_types is None or t in block_types else m for t, m in masks.items()}
    return masks


def image_blocks(token_type_ids, kinds=(1,)) -> mx.array:
    """transformers' block ids for the mask: each run of image tokens (a type in kinds: 1, and Gemma 4's
    video frames, 2) numbered 0, 1, ... per row, -1 for text (get_block_sequence_ids_for_mask)."""
    types = mx.array(np.asarray(token_type_ids)) if not isinstance(token_type_ids, mx.array) else token_type_ids
    types = types if types.ndim == 2 else types[None]
    is_image = mx.zeros(types.shape, dtype=mx.bool_)
    for kind in kinds:
        is_image = is_image | (types == kind)
    before = mx.pad(is_image, [(0, 0), (1, 0)])[:, :-1]
    starts = mx.cumsum((is_image & ~before).astype(mx.int32), axis=1) - 1
    return mx.where(is_image, starts, -1)


def with_blocks(mask, blocks: mx.array, offset: int, window: Optional[int]):
    """A layer's mask, plus attention between the tokens of one image block (future ones included), as
    transformers' Gemma 3 does: OR(causal, block), and on sliding layers AND(window, OR(causal, block)).
    The new tokens are the mask's last L keys; a block never spans two forwards (generation prefills
    whole blocks), so keys already cached need no overlay."""
    L = blocks.shape[1]
    if L == 1:
        return mask
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    if window is not None:
        same = same & (mx.arange(L)[None] > mx.arange(L)[:, None] - window)
    if mask is None:  # bidirectional already
        return mask
    if isinstance(mask, str):
        mask = causal_mask(offset, L, 0, offset + L)
    mask = mx.broadcast_to(mask if mask.ndim == 4 else mask[None, None], (blocks.shape[0], 1, *mask.shape[-2:]))
    S = mask.shape[-1]
    return mx.concatenate([mask[..., : S - L], mask[..., S - L:] | same[:, None]], axis=-1)


def make_caches(layer_types, window: Optional[int], max_kv_size: Optional[int] = None) -> list:
    """Sliding layers: a cache of one window. Full layers: a growing cache, or with max_kv_size a window of
    that many tokens (a bound on memory that turns full attention into sliding attention, as in mlx-lm)."""
    def sliding(size):
        return RotatingKVCache(min(size, max_kv_size) if max_kv_size else size)
    return [sliding(window) if t == SLIDING else sliding(max_kv_size) if max_kv_size else KVCache()
            for t in layer_types]


def as_input_ids(input_ids, vocab_size: int) -> mx.array:
    """Token ids as a (B, L) int array. Ids are range-checked where user input enters (a list, a numpy
    array, or a multi-token mx.array), not on the one-token decode steps of the generation loop."""
    from_user = not isinstance(input_ids, mx.array)
    if from_user:
        input_ids = mx.array(np.asarray(input_ids))
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2:
        raise MlxGemmaError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise MlxGemmaError("input_ids is empty: give at least one token")
    if mx.issubdtype(input_ids.dtype, mx.floating):
        raise MlxGemmaError("input_ids must be integer token ids, got floats")
    if input_ids.size and (from_user or input_ids.shape[1] > 1):
        lo, hi = mx.stack([mx.min(input_ids), mx.max(input_ids)]).tolist()
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise MlxGemmaError(
                f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}): "
                "was the prompt tokenized with this model's tokenizer?"
            )
    return input_ids


LM_USAGE = ("```python\nimport mlxgemma\nmodel, tokenizer = mlxgemma.load(\"path/to/this/folder\")\n```\n"
            "It also loads with `mlx_lm.load`.\n")


class PreTrainedModel(nn.Module):
    """The base of every model class (transformers' name): what the rest of mlxgemma asks of a family, with the
    answers of the common case, a text decoder. A family overrides what differs, once for all its classes."""

    is_encoder_decoder = False  # T5Gemma 2: encodes once per request, has no chat cache
    has_vision = False  # a decoder whose prompts hold images (Gemma 3 with its tower): loads with a processor
    vision_tower_name = None  # its image encoder's module: quantized at --q-vision-bits, whole on every rank
    lm_head_name = "lm_head"  # the vocabulary head's linear (calibration takes its input only)
    vocab_sharded_tables = ("embed_tokens",)  # get_decoder()'s token tables that shard and pipeline split
    supports_pipeline = True  # pipeline() can give each rank a run of decoder layers
    readme_usage = LM_USAGE  # how the README of a converted checkpoint says to load it

    def get_decoder(self):
        """The decoder stack (embed_tokens, layers, config): a base model itself; its heads return theirs."""
        return self

    def in_vision_tower(self, path: str) -> bool:
        """Whether path is in a media tower (quantized at its own bits, whole on every rank)."""
        return self.vision_tower_name is not None and f".{self.vision_tower_name}." in f".{path}"

    def in_audio_tower(self, path: str) -> bool:
        """Whether path is in an audio tower (in_vision_tower too; quantized at the audio bits)."""
        return False

    def layer_bits(self, path: str, bits: int) -> Optional[int]:
        """The bits the layer at path gets whatever the quantization recipe; None: the recipe decides."""
        return None

    def is_tied_head(self, path: str) -> bool:
        """Whether the token table at path is also the vocabulary head (calibration rounds it as the head)."""
        return path.endswith("model.embed_tokens") and bool(getattr(self.config, "tie_word_embeddings", False))

    def check_calibration(self) -> None:
        """One clear line where --calibrate cannot run this model (before anything is read for it)."""

    def calibration_forward(self, input_ids: mx.array) -> mx.array:
        """A forward over text alone: calibration's pass."""
        return self(input_ids)

    def part_for(self, weights: dict):
        """(the model that sanitized weights fill, the weights in its names): this one, with all of them."""
        return self, weights

    def load_processor(self, path, tokenizer):
        """What load() returns beside the model: the tokenizer, or a family's processor holding it."""
        return tokenizer

    def dequantize(self) -> nn.Module:
        """Every quantized layer back to float, in place (mlx-lm's dequantize_model, which imports transformers)."""
        from mlx_lm.utils import dequantize_model

        return dequantize_model(self)

    def shard(self, group=None) -> nn.Module:
        """Tensor parallelism across group's ranks, in place (mlx-lm's Model.shard): attention by heads, MLPs
        by width, the token tables by vocabulary (distributed.py). Nothing to do on one rank."""
        group = distributed.world(group)
        if group.size() > 1:
            distributed.shard_modules(self, group)
        return self

    def pipeline(self, group=None) -> nn.Module:
        """Pipeline parallelism across group's ranks, in place: rank r keeps the r-th run of decoder layers
        (distributed.py). Nothing to do on one rank."""
        group = distributed.world(group)
        if group.size() > 1:
            if not self.supports_pipeline:
                raise MlxGemmaError(f"{type(self).__name__} runs across ranks by tensor parallelism only: leave out "
                                    "--pipeline")
            distributed.split_layers(self, group)
        return self


class WithLanguageModel:
    """A model whose decoder is its `language_model` (the media models): layers, caches and the decoder stack
    are the language model's."""

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self, max_kv_size=None):
        return self.language_model.make_cache(max_kv_size)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def with_language_model_weights(self, weights: dict) -> dict:
        """Both layouts' names in ours (transformers' model.language_model.*, mlx-vlm's language_model.model.*,
        a bare lm_head), the language model's part through its own sanitize; the rest as they are."""
        out = {}
        for k, v in weights.items():
            k = k.removeprefix("model.")
            if k.startswith("language_model.") and not k.startswith(("language_model.model.",
                                                                      "language_model.lm_head.")):
                k = "language_model.model." + k.removeprefix("language_model.")
            elif k.startswith("lm_head."):
                k = "language_model." + k
            out[k] = v
        text = {k.removeprefix("language_model."): v for k, v in out.items() if k.startswith("language_model.")}
        out = {k: v for k, v in out.items() if not k.startswith("language_model.")}
        out.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(text).items()})
        return out

    def part_for(self, weights: dict):
        """A checkpoint without its towers (mlx-lm's converter drops them; `media_weights` names their prefixes)
        fills the text model alone."""
        if any(k.startswith(self.media_weights) for k in weights):
            return self, weights
        return self.language_model, {k.removeprefix("language_model."): v for k, v in weights.items()}


__all__ = ["FULL", "SLIDING"]

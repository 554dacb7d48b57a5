"""Tensor and pipeline parallelism over mlx.distributed (`mlx.launch -n N ... python -m mlxgemma.generate`).

Tensor parallelism (shard): every rank holds 1/N of each attention's heads and each MLP's intermediate
width, and of the token table.

Attention splits by heads: the query heads and, where there are at least as many key/value heads as ranks,
the key/value heads (each rank keeps its own); with fewer (Gemma 3 270M has one), each rank keeps the one
key/value head its query heads read. The MLP splits gate/up by rows and down by columns. One all-reduce after
each attention and each MLP (mlx.nn's sharded linears, quantized ones included). The token table (which
Gemma ties to the head, two thirds of a small Gemma) splits by vocabulary: a lookup is summed over the ranks,
the head's logits are gathered. Norms, softcaps, rotary, masks and caches are per head or per token, so
they work unchanged on every rank; a rank's caches hold its own heads. T5Gemma 2's encoder and decoder shard
the same way; its vision tower and token table stay whole on every rank. Gemma 4's KV-shared layers split their
query heads as their donors split the keys they read; its experts split by intermediate width, their outputs
summed over the ranks; its per-layer token table splits by vocabulary.

Pipeline parallelism (pipeline): rank r holds the r-th contiguous run of decoder layers, and its caches and
masks follow its own layer types (a rank may hold only sliding layers). Each rank's first layer receives the
hidden states from the rank before (send/recv), its last sends them on; the last rank's output reaches every
rank (an all-gather), so each computes the logits of its share of the token table, split as above.

The model classes drive both, as mlx-lm's do: model.shard(group) and model.pipeline(group) (PreTrainedModel,
common.py) run shard_modules and split_layers below with what the family says of itself (its vision tower,
its token tables, whether it pipelines); Gemma 4 adds its experts (gemma4_moe.py), StableLM its per-head norms.
shard() and pipeline() here are the same methods, called as functions.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..errors import MlxGemmaError


def world(group=None):
    """The distributed group (a single process is a group of one)."""
    return group or mx.distributed.init()


def shard(model: nn.Module, group=None) -> nn.Module:
    """Shard model in place across group's ranks (nothing to do on one): model.shard, the family's own split;
    one clear error where a model's sizes do not split."""
    return model.shard(group)


def pipeline(model: nn.Module, group=None) -> nn.Module:
    """Split a decoder's layers into contiguous runs, one per rank, in place: model.pipeline (split_layers)."""
    return model.pipeline(group)


def shard_modules(model: nn.Module, group) -> None:
    """What PreTrainedModel.shard does for every family: each attention by heads, each MLP by width, the
    family's token tables by vocabulary; a vision tower stays whole. A family with more (Gemma 4's experts)
    shards that in its own shard()."""
    for path, m in list(model.named_modules()):
        if model.in_vision_tower(path):
            continue
        if all(k in m for k in ("q_proj", "o_proj")) and hasattr(m, "n_heads"):
            shard_attention(m, group, path)
        elif all(k in m for k in ("gate_proj", "up_proj", "down_proj")):
            shard_mlp(m, group, path)
    decoder = model.get_decoder()
    for name in model.vocab_sharded_tables:
        if name in decoder:
            decoder[name] = VocabShardedEmbedding(decoder[name], group)


def split_layers(model: nn.Module, group) -> None:
    """What PreTrainedModel.pipeline does: rank r keeps the r-th contiguous run of decoder layers (the first
    ranks get one more where they do not divide); the token tables split by vocabulary as in shard."""
    N, r = group.size(), group.rank()
    base = model.get_decoder()
    n = len(base.layers)
    if n < N:
        raise MlxGemmaError(f"{n} decoder layers do not split over {N} ranks")
    sizes = [n // N + (k < n % N) for k in range(N)]
    start = sum(sizes[:r])
    stop = start + sizes[r]
    layers = list(base.layers[start:stop])  # the others' go before their weights, still lazy, are read
    layers[-1] = _Stage(layers[-1], group, receives=r > 0 and len(layers) == 1, ends=True)
    if r > 0 and len(layers) > 1:
        layers[0] = _Stage(layers[0], group, receives=True)
    base.layers = layers
    base.config.layer_types = list(base.config.layer_types[start:stop])  # what masks and caches are made of
    for name in model.vocab_sharded_tables:
        base[name] = VocabShardedEmbedding(base[name], group)


class _Stage(nn.Module):
    """A rank's first (receives) or last (ends) decoder layer in a pipeline. Its point-to-point transfers
    run here and now (mx.eval), in the order the program builds its forwards, the same on every rank.
    Left lazy, their order would be the scheduler's: recv has no inputs, so nothing would keep it after the
    token lookup (a sum over every rank) it must follow, and a forward built but never evaluated (the
    prefill evaluates only the caches, which do not depend on a rank's send) would leave a send or a recv
    unmatched: either way the ranks would wait on each other, or read each other's wrong message."""

    def __init__(self, layer, group, receives: bool = False, ends: bool = False):
        super().__init__()
        self.layer, self.group, self.receives, self.ends = layer, group, receives, ends
        self.attention_type = layer.attention_type

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        N, r = self.group.size(), self.group.rank()
        if self.receives:
            mx.eval(x)  # the token lookup, a sum over every rank, comes before this rank waits for its input
            x = mx.distributed.recv_like(x, r - 1, group=self.group)
            mx.eval(x)
        h = self.layer(x, mask, cache)
        if not self.ends:
            return h
        if r < N - 1:
            h = mx.distributed.send(h, r + 1, group=self.group)
            mx.eval(h)
        B = h.shape[0]
        return mx.distributed.all_gather(h, group=self.group)[(N - 1) * B:]  # the last rank's, on every rank


def shard_attention(m, group, path: str) -> None:
    """An attention by heads: queries and outputs split; the key/value heads split too, or with fewer of them
    than ranks each rank keeps the one its query heads read. A module with per-head parameters of its own
    (StableLM's q/k LayerNorms) keeps its heads' in keep_heads(query heads, key/value heads)."""
    N, r = group.size(), group.rank()
    H, K = m.n_heads, m.n_kv_heads
    if H % N:
        raise MlxGemmaError(f"{path}: {H} attention heads do not split over {N} ranks (--pipeline splits by "
                            "layers instead)")
    check_columns(m.o_proj, N, f"{path}.o_proj")
    m.q_proj = shard_linear(m.q_proj, "all-to-sharded", group=group)
    m.o_proj = shard_linear(m.o_proj, "sharded-to-all", group=group)
    # (Gemma 4: a KV-shared layer has no k/v of its own and reads its donor's, split the same way; full
    # layers with attention_k_eq_v have no v_proj)
    kvs = [name for name in ("k_proj", "v_proj") if name in m]
    if K % N == 0:
        for name in kvs:
            m[name] = shard_linear(m[name], "all-to-sharded", group=group)
        kv = slice(r * K // N, (r + 1) * K // N)
    elif N % K == 0:  # fewer key/value heads than ranks: each keeps the one its query heads read
        head = r * K // N
        for name in kvs:
            _keep_rows(m[name], head * m[name].weight.shape[0] // K, (head + 1) * m[name].weight.shape[0] // K)
        kv = slice(head, head + 1)
    else:
        raise MlxGemmaError(f"{path}: {K} key/value heads do not split over {N} ranks (nor {N} over {K})")
    if hasattr(m, "keep_heads"):
        m.keep_heads(slice(r * H // N, (r + 1) * H // N), kv)
    m.n_heads, m.n_kv_heads = H // N, kv.stop - kv.start


def check_columns(linear, N: int, path: str) -> None:
    """A sharded-to-all linear splits its input: each rank's part must hold whole quantization groups."""
    width = input_width(linear)
    group = getattr(linear, "group_size", 1) if "scales" in linear else 1
    if width % N or (width // N) % group:
        raise MlxGemmaError(f"{path}: an input width of {width} does not split over {N} ranks"
                            + (f" in whole quantization groups of {group}" if group > 1 else ""))


def input_width(linear) -> int:
    """A linear's (or per-expert linear's) input width, float or quantized (packed in 32-bit words)."""
    return linear.weight.shape[-1] * 32 // linear.bits if "scales" in linear else linear.weight.shape[-1]


def _keep_rows(linear, start: int, stop: int) -> None:
    """A linear (float or quantized) keeping only output rows start:stop (no communication: its input is whole)."""
    linear.update({k: v[start:stop] for k, v in linear.parameters().items() if k in ("weight", "scales", "biases",
                                                                                     "bias")})


def shard_mlp(m, group, path: str) -> None:
    width = m.gate_proj.weight.shape[0]
    if width % group.size():
        raise MlxGemmaError(f"{path}: an intermediate width of {width} does not split over {group.size()} ranks")
    check_columns(m.down_proj, group.size(), f"{path}.down_proj")
    m.gate_proj = shard_linear(m.gate_proj, "all-to-sharded", group=group)
    m.up_proj = shard_linear(m.up_proj, "all-to-sharded", group=group)
    m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)


def keep_columns(linear, start: int, stop: int) -> None:
    """A linear or per-expert linear (float or quantized) keeping only input columns start:stop."""
    if "scales" not in linear:
        linear.weight = linear.weight[..., start:stop]
        return
    bits, group = linear.bits, linear.group_size  # (start and stop are whole groups: whole 32-bit words)
    parts = {"weight": slice(start * bits // 32, stop * bits // 32), "scales": slice(start // group, stop // group)}
    parts["biases"] = parts["scales"]
    linear.update({k: v[..., parts[k]] for k, v in linear.parameters().items() if k in parts})


class VocabShardedEmbedding(nn.Module):
    """A token table (float or quantized) split by vocabulary rows over the ranks: a lookup gives the rows
    a rank holds (zeros elsewhere), summed over the ranks; as_linear gives each rank's logits, gathered."""

    def __init__(self, table, group):
        super().__init__()
        N, r = group.size(), group.rank()
        V = table.weight.shape[0]
        if V % N:
            raise MlxGemmaError(f"a vocabulary of {V} does not split over {N} ranks")
        self.group, self.start, self.rows = group, r * V // N, V // N
        _keep_rows(table, self.start, self.start + self.rows)
        self.table = table

    @property
    def weight(self):
        return self.table.weight

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        here = (local >= 0) & (local < self.rows)
        h = self.table(mx.where(here, local, 0)) * here[..., None].astype(self.table_dtype)
        return mx.distributed.all_sum(h, group=self.group)

    @property
    def table_dtype(self):
        return self.table.scales.dtype if "scales" in self.table else self.table.weight.dtype

    def as_linear(self, h: mx.array) -> mx.array:
        logits = self.table.as_linear(h)  # (..., V / N)
        moved = mx.moveaxis(logits, -1, 0)
        return mx.moveaxis(mx.distributed.all_gather(moved, group=self.group), 0, -1)

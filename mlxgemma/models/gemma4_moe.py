"""Gemma 4's mixture-of-experts block (26B-A4B): a router picking top_k_experts of num_experts per token, and
the experts. Only the chosen experts run: a gather-based matmul (mx.gather_mm, or mx.gather_qmm on quantized
experts) multiplies each token by its own experts' weights, as mlx-lm's SwitchGLU / QuantizedSwitchLinear do
(restated here: importing mlx-lm imports transformers, see cache.py).

The experts hold two per-expert linears named as transformers names its tensors: gate_up_proj (experts,
2 x moe_intermediate_size, hidden; gate rows then up rows) and down_proj (experts, hidden,
moe_intermediate_size), each a SwitchLinear whose .weight is that tensor, so MLX's quantization (nn.quantize,
mlx-lm's quantize_model and its recipes) quantizes them like any linear. Checkpoint names (transformers'
`experts.gate_up_proj`, mlx-lm's split `experts.switch_glu.{gate,up,down}_proj.*`) are mapped in gemma4.py.
Reference: transformers/models/gemma4 (Gemma4TextRouter, Gemma4TextExperts)."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .distributed import check_columns, input_width, keep_columns

# The router at 8 bits whatever the quantization recipe, as mlx-lm's Gemma 4 recipe has it: it is tiny, and a
# rounding that flips which experts a token goes to is an error of another kind.
ROUTER_BITS = 8


def router_bits(path: str, bits: int) -> Optional[int]:
    """The bits the router gets whatever the recipe (never fewer than asked for); None for every other layer
    (the recipe decides)."""
    return max(bits, ROUTER_BITS) if path.endswith(".router.proj") else None


class Gemma4TextRouter(nn.Module):
    """softmax(proj(rmsnorm(x) * scale / sqrt(hidden))) in float32, the top k of it renormalised to sum to 1,
    then each multiplied by its expert's per_expert_scale. -> (expert ids, weights), each (..., k); the ids in
    no particular order (transformers' are by weight: only the order the k outputs are summed in differs)."""

    def __init__(self, config):
        super().__init__()
        D, E = config.hidden_size, config.num_experts
        self.top_k, self.eps, self.root_size = config.top_k_experts, config.rms_norm_eps, D**-0.5
        self.proj = nn.Linear(D, E, bias=False)
        self.scale = mx.ones((D,))
        self.per_expert_scale = mx.ones((E,))

    def __call__(self, x: mx.array):
        h = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)  # a norm with no weight
        logits = self.proj(h * self.scale * self.root_size).astype(mx.float32)
        top = mx.stop_gradient(mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k :])
        # The top k of the float32 softmax over all experts, renormalised to sum to 1, is the softmax of those
        # k logits (the same function, rounded once less; 4 ops fewer a layer than taking it literally).
        weights = mx.softmax(mx.take_along_axis(logits, top, axis=-1), axis=-1)
        return top, weights * self.per_expert_scale[top]


class SwitchLinear(nn.Module):
    """One bias-free linear per expert, weight (experts, out, in); x (..., 1, in) times the weight of the
    expert idx names for each row."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:  # MLX's CPU gather_mm is float32 only
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx,
                             sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        """(what nn.quantize calls) The quantized twin of this layer, each expert in groups along `in`."""
        E, out, inp = self.weight.shape
        q = QuantizedSwitchLinear(inp, out, E, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with MLX-quantized weights (weight, scales and, in affine mode, biases per expert), as
    mlx-lm's QuantizedSwitchLinear stores them: mx.gather_qmm reads only the chosen experts' groups."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # Placeholders of the stored shapes (lazy: the loader replaces them before anything evaluates them).
        self.weight, self.scales, *biases = mx.quantize(mx.zeros((num_experts, output_dims, input_dims)),
                                                        group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=idx, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)

    def dequantized(self) -> SwitchLinear:
        """The float SwitchLinear holding exactly the weights this layer computes with."""
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        out = SwitchLinear(w.shape[-1], w.shape[-2], w.shape[0])
        out.weight = w
        return out


class Gemma4TextExperts(nn.Module):
    """sum over the chosen experts e of weight_e * down_e(act(gate_e(x)) * up_e(x))."""

    def __init__(self, config, act):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(D, 2 * I, E)
        self.down_proj = SwitchLinear(I, D, E)
        self.act = act

    def __call__(self, x: mx.array, top: mx.array, weights: mx.array) -> mx.array:
        k = top.shape[-1]
        # A few tokens (decoding): each token's row against its own k experts, broadcast over the token axes as
        # mlx-lm's SwitchGLU does (flattening them first cost 0.80 against 0.66 ms a layer on MLX's CPU backend).
        if top.size < 64:
            gate, up = mx.split(self.gate_up_proj(mx.expand_dims(x, (-2, -3)), top), 2, axis=-1)
            y = self.down_proj(self.act(gate) * up, top).squeeze(-2)  # (..., k, D)
        else:  # many: sort the (token, expert) pairs by expert, so that each expert's weights are read once
            shape = x.shape
            order = mx.argsort(top.flatten())
            x, idx = x.reshape(-1, 1, shape[-1])[order // k], top.flatten()[order]
            gate, up = mx.split(self.gate_up_proj(x, idx, True), 2, axis=-1)
            y = self.down_proj(self.act(gate) * up, idx, True)[mx.argsort(order)].reshape(*shape[:-1], k, shape[-1])
        # As transformers: each expert's output times its (float32) weight, cast back, then summed.
        return (y * weights[..., None]).astype(y.dtype).sum(axis=-2)

    def shard_width(self, group, path: str) -> None:
        """Tensor parallelism: each rank keeps its part of every expert's intermediate width, gate and up rows
        (stored fused, gate then up) and down columns; their outputs are summed over the ranks (SummedExperts)."""
        N, r = group.size(), group.rank()
        width = input_width(self.down_proj)
        check_columns(self.down_proj, N, f"{path}.down_proj")
        part = slice(r * width // N, (r + 1) * width // N)
        fused = self.gate_up_proj
        fused.update({k: mx.concatenate([v[:, part], v[:, width + part.start:width + part.stop]], axis=1)
                      for k, v in fused.parameters().items() if k in ("weight", "scales", "biases")})
        keep_columns(self.down_proj, part.start, part.stop)


class SummedExperts(nn.Module):
    """Experts split by width (Gemma4TextExperts.shard_width): each rank's share of every token's expert
    outputs, summed."""

    def __init__(self, experts, group):
        super().__init__()
        self.experts, self.group = experts, group

    def __call__(self, *args) -> mx.array:
        return mx.distributed.all_sum(self.experts(*args), group=self.group)


def dequantize_experts(model: nn.Module) -> nn.Module:
    """Replace every QuantizedSwitchLinear in model by its float twin (mlx-lm's dequantize_model knows only
    its own switch layers)."""
    from mlx.utils import tree_unflatten

    layers = [(name, m.dequantized()) for name, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)]
    if layers:
        model.update_modules(tree_unflatten(layers))
    return model

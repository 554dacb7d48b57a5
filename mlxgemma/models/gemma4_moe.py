"""Gemma 4's mixture-of-experts block (26B-A4B): a router picking top_k_experts of num_experts per token, and
the experts, whose weights are stored as transformers stores them (one (experts, 2 x moe_intermediate_size,
hidden) gate_up_proj, one (experts, hidden, moe_intermediate_size) down_proj). Only the chosen experts run:
a gather-based matmul (mx.gather_mm) multiplies each token by its own experts' weights, as mlx-lm's
SwitchGLU does (restated here: importing mlx-lm imports transformers, see cache.py).
Reference: transformers/models/gemma4 (Gemma4TextRouter, Gemma4TextExperts)."""

import mlx.core as mx
import mlx.nn as nn


class Gemma4TextRouter(nn.Module):
    """softmax(proj(rmsnorm(x) * scale / sqrt(hidden))) in float32, the top k of it renormalised to sum to 1,
    then each multiplied by its expert's per_expert_scale. -> (expert ids, weights), each (..., k)."""

    def __init__(self, config):
        super().__init__()
        D, E = config.hidden_size, config.num_experts
        self.top_k, self.eps, self.root_size = config.top_k_experts, config.rms_norm_eps, D**-0.5
        self.proj = nn.Linear(D, E, bias=False)
        self.scale = mx.ones((D,))
        self.per_expert_scale = mx.ones((E,))

    def __call__(self, x: mx.array):
        h = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)  # a norm with no weight
        probs = mx.softmax(self.proj(h * self.scale * self.root_size).astype(mx.float32), axis=-1)
        top = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, top, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return top, weights * self.per_expert_scale[top]


class Gemma4TextExperts(nn.Module):
    """sum over the chosen experts e of weight_e * down_e(act(gate_e(x)) * up_e(x))."""

    def __init__(self, config, act):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = mx.zeros((E, 2 * I, D))
        self.down_proj = mx.zeros((E, D, I))
        self.act = act

    def __call__(self, x: mx.array, top: mx.array, weights: mx.array) -> mx.array:
        shape, k = x.shape, top.shape[-1]
        x = x.reshape(-1, 1, 1, shape[-1])  # (tokens, 1, 1, D): one row per token, broadcast over its k experts
        idx = top.reshape(-1, k)
        # Many tokens: sort their (token, expert) pairs by expert, so each expert's weights are read once.
        order = mx.argsort(idx.flatten()) if idx.size >= 64 else None
        if order is not None:
            x, idx = x.reshape(-1, 1, shape[-1])[order // k], idx.flatten()[order]
        gate, up = mx.split(self._matmul(x, self.gate_up_proj, idx, order is not None), 2, axis=-1)
        y = self._matmul(self.act(gate) * up, self.down_proj, idx, order is not None)
        if order is not None:
            y = y[mx.argsort(order)].reshape(-1, k, 1, shape[-1])
        # As transformers: each expert's output times its (float32) weight, cast back, then summed.
        y = (y[..., 0, :] * weights.reshape(-1, k, 1)).astype(y.dtype)
        return y.sum(axis=1).reshape(shape)

    @staticmethod
    def _matmul(x: mx.array, w: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:  # MLX's CPU gather_mm is float32 only
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx,
                             sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)

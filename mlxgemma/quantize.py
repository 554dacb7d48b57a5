"""Quantization recipes over mlx-lm's quantize_model (MLX affine groups). mlx-lm's mixed recipes (more bits
for v_proj, down_proj and the head in the first, last and every third layer, llama.cpp Q4_K_M style) plus
ours, which keep the embedding (and so the tied output projection) at 8 bits: in Gemma the embedding is
tied to the head and holds most of a small model's parameters."""

import sys

import mlx.nn as nn
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model

RECIPES = list(QUANT_RECIPES) + ["embed_8"]


def _embed_8(group_size):
    def predicate(path, module):
        if path.endswith(("embed_tokens", "lm_head")):
            return {"group_size": group_size, "bits": 8, "mode": "affine"}
        return True
    return predicate


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, recipe=None):
    """Quantize in place; returns (model, config with mlx-lm's "quantization" block). Layers whose input
    width does not divide by the group size stay in float, and we say which."""
    if recipe is None:
        predicate = None
    elif recipe == "embed_8":
        predicate = _embed_8(group_size)
    else:
        predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    left = [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not hasattr(m, "scales")]
    if left:
        print(f"[mlxgemma] note: {len(left)} layer(s) stay in float (input width not a multiple of "
              f"{group_size}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", file=sys.stderr)
    return model, config

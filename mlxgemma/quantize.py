"""Quantization recipes over mlx-lm's quantize_model (MLX affine groups): "uniform" (every layer at --q-bits)
and mlx-lm's mixed recipes (more bits for v_proj, down_proj and the head in the first, last and every third
layer, llama.cpp Q4_K_M style). At 4 bits the default is mixed_4_6, chosen by measurement on Gemma 3 270M:
perplexity 25.1 at 147 MiB against 28.1 at 144 MiB for uniform 4-bit (README, benchmarks/quality.py)."""

import sys
from typing import Optional

import mlx.nn as nn

# "uniform" and mlx-lm's QUANT_RECIPES (named here, not imported: mlx-lm is imported only when quantizing,
# as importing it imports transformers; a test checks the names against mlx-lm's).
RECIPES = ["uniform", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
# T5Gemma 2's SigLIP tower at 8 bits whatever the language model gets: measured on a random-weight model of
# the real widths (benchmarks/t5gemma2_vision_quant.py, README), 4 bits put 3.3% of error into the image
# features (8 bits: 0.2%) for about 1.5 times the tower's 8-bit saving; 8 bits cost nothing measurable.
VISION_BITS = 8


def default_recipe(bits: int) -> str:
    return "mixed_4_6" if bits == 4 else "uniform"


def in_vision_tower(path: str) -> bool:
    return ".vision_tower." in f".{path}"


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, recipe=None,
             vision_bits: Optional[int] = VISION_BITS):
    """Quantize in place; returns (model, config with mlx-lm's "quantization" block). Layers whose input
    width does not divide by the group size stay in float, and we say which. A vision tower (T5Gemma 2) is
    quantized at vision_bits (None: kept in float), whatever the recipe says for the language model."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    recipe = recipe or default_recipe(bits)
    mixed = None if recipe == "uniform" else mixed_quant_predicate_builder(recipe, model, group_size)

    def predicate(path: str, module: nn.Module):
        if in_vision_tower(path):
            return False if vision_bits is None else {"group_size": group_size, "bits": vision_bits, "mode": "affine"}
        return mixed(path, module) if mixed else True

    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    left = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
            and not hasattr(m, "scales") and (vision_bits is not None or not in_vision_tower(name))]
    if left:
        print(f"[mlxgemma] note: {len(left)} layer(s) stay in float (input width not a multiple of "
              f"{group_size}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", file=sys.stderr)
    return model, config

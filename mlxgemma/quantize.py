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
# Gemma 4. The per-layer embedding table of the E models (vocab_size_per_layer_input x layers x
# hidden_size_per_layer_input: 262144 x 8960 in E2B, 2.35 G weights, more than the rest of the model) gets
# what the recipe gives it (4 bits at the default; mlx-lm's converter does the same), not more: measured on a
# random-weight model of E2B's widths (benchmarks/gemma4_quant.py), 4 bits put 4.0% of error into the
# per-layer inputs (8 bits: 0.24%), but with the rest of the model at mixed_4_6 the next-token KL goes from
# 0.2020 (table in float) to 0.2025 (table at 4 bits) -- 0.3% more -- while 8 bits would add 1.1 GiB (2380
# against 1260 MiB) to a 4-bit E2B of about 2.5 GiB. The router at 8 bits, as mlx-lm's Gemma 4 recipe has
# it: it is tiny, and a rounding that flips which experts a token goes to is an error of another kind.
ROUTER_BITS = 8


def default_recipe(bits: int) -> str:
    return "mixed_4_6" if bits == 4 else "uniform"


def in_vision_tower(path: str) -> bool:
    return ".vision_tower." in f".{path}"


def gemma4_bits(path: str, bits: int) -> Optional[int]:
    """The bits Gemma 4's router gets whatever the recipe (never fewer than asked for); None for every other
    layer (the recipe decides)."""
    return max(bits, ROUTER_BITS) if path.endswith(".router.proj") else None


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, recipe=None,
             vision_bits: Optional[int] = VISION_BITS, overrides: Optional[dict] = None):
    """Quantize in place; returns (model, config with mlx-lm's "quantization" block). Layers whose input
    width does not divide by the group size stay in float, and we say which. A vision tower (T5Gemma 2) is
    quantized at vision_bits (None: kept in float), whatever the recipe says for the language model; Gemma 4's
    router at ROUTER_BITS. Gemma 4's experts are quantized like linears (each projection of every expert, in
    groups along its input: mixed recipes give down_proj their extra bits as they do an MLP's). overrides:
    {path: {"group_size", "bits", "mode"}} that win over the recipe (calibrate.py's choices)."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    recipe = recipe or default_recipe(bits)
    mixed = None if recipe == "uniform" else mixed_quant_predicate_builder(recipe, model, group_size)

    def predicate(path: str, module: nn.Module):
        if overrides and path in overrides:
            return overrides[path]
        if in_vision_tower(path):
            return False if vision_bits is None else {"group_size": group_size, "bits": vision_bits, "mode": "affine"}
        fixed = gemma4_bits(path, bits)
        if fixed is not None:
            return {"group_size": group_size, "bits": fixed, "mode": "affine"}
        return mixed(path, module) if mixed else True

    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    from .models.gemma4_moe import SwitchLinear

    left = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear))
            and not hasattr(m, "scales") and (vision_bits is not None or not in_vision_tower(name))]
    if left:
        print(f"[mlxgemma] note: {len(left)} layer(s) stay in float (input width not a multiple of "
              f"{group_size}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", file=sys.stderr)
    return model, config

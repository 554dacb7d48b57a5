"""Which layers get which bits: the quantization recipes over mlx-lm's quantize_model (MLX affine groups).
"uniform" (every layer at --q-bits), mlx-lm's mixed recipes (more bits for v_proj, down_proj and the head in
the first, last and every third layer, llama.cpp Q4_K_M style), and ours, "budget" (the default at 4 bits:
the token tables at --q-bits in groups of 128, the decoder's layers raised to --q-bits + 1 and + 2 within a
bits-per-weight budget; see budget()). How each layer is then rounded is grids.py's (a searched grid per
group), or calibrate.py's (GPTQ). Measured on the real Gemma 3 270M (docs/convert-and-quantize.md): the budget
recipe at 4.75 bits per weight is 1.13x the float model's perplexity, mixed_4_6 at 4.61 1.30x, and mlx-lm's
convert -q (uniform, round-to-nearest) 1.53x."""

import sys
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .grids import best_grid, quantize_on

# "uniform", ours, and mlx-lm's QUANT_RECIPES (named here, not imported: mlx-lm is imported only when
# quantizing, as importing it imports transformers; a test checks the names against mlx-lm's).
RECIPES = ["uniform", "budget", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
# The budget recipe's default bits per weight above uniform --q-bits' (4.75 at 4 bits in groups of 64 with
# bf16 scales: mlx-lm's convert -q size + 5.5%, 0.30x the bf16 checkpoint), and its token tables' group size.
BUDGET = 0.25
TABLE_GROUP = 128
# A media tower (T5Gemma 2's SigLIP, Gemma 3's, Gemma 4's) at 8 bits whatever the language model gets:
# measured on a random-weight model of the real widths (benchmarks/t5gemma2_vision_quant.py), 4 bits put 3.3%
# of error into the image features (8 bits: 0.2%) for about 1.5 times the tower's 8-bit saving.
VISION_BITS = 8


def default_recipe(bits: int, target_bpw: Optional[float] = None) -> str:
    return "budget" if bits == 4 or target_bpw is not None else "uniform"


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, recipe=None,
             vision_bits: Optional[int] = VISION_BITS, overrides: Optional[dict] = None, search: bool = True,
             audio_bits: Optional[int] = VISION_BITS, target_bpw: Optional[float] = None):
    """Quantize in place; returns (model, config with mlx-lm's "quantization" block). Layers whose input
    width does not divide by the group size stay in float, and we say which. The language model's layers get
    the recipe's bits (layer_specs); a vision tower (T5Gemma 2, Gemma 3, Gemma 4) vision_bits (None: kept in
    float), an audio tower (Gemma 4 E2B/E4B) audio_bits. Gemma 4's experts are quantized like linears (each
    projection of every expert, in groups along its input). overrides: {path: {"group_size", "bits",
    "mode"}} that win over the recipe (calibrate.py's layers, which it rounds itself). search: each group's
    grid by grids.best_grid on the weights alone, else mlx-lm's round-to-nearest from its min and max."""
    from mlx_lm.utils import quantize_model

    specs = layer_specs(model, bits, group_size, recipe, target_bpw)

    def predicate(path: str, module: nn.Module):
        if overrides and path in overrides:
            return overrides[path]
        if model.in_vision_tower(path):
            tower = audio_bits if model.in_audio_tower(path) else vision_bits
            return False if tower is None else {"group_size": group_size, "bits": tower, "mode": "affine"}
        return specs.get(path, True)

    floats = {p: m.weight for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m}
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    if search:
        search_grids(model, {p: w for p, w in floats.items() if p not in (overrides or {})})
    left = [name for name, m in model.named_modules() if hasattr(m, "to_quantized") and not hasattr(m, "scales")
            and not (model.in_vision_tower(name) and (audio_bits if model.in_audio_tower(name) else vision_bits) is None)]
    if left:
        print(f"[mlxgemma] note: {len(left)} layer(s) stay in float (input width not a multiple of "
              f"{group_size}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}", file=sys.stderr)
    return model, config


def layer_specs(model: nn.Module, bits: int, group_size: int, recipe: Optional[str] = None,
                target_bpw: Optional[float] = None) -> Dict[str, dict]:
    """{path: {"group_size", "bits", "mode"}} the recipe gives each quantizable layer of the language model
    (not the towers); a layer the family fixes (model.layer_bits: Gemma 4's router) at its bits."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    recipe = recipe or default_recipe(bits, target_bpw)
    if target_bpw is not None and recipe != "budget":
        raise MlxGemmaError(f"--target-bpw sets the budget recipe's bits per weight; --quant-predicate {recipe} "
                            f"has its own")
    view = _LanguageView(model)
    layers = {p: m for p, m in view.named_modules() if hasattr(m, "to_quantized") and "weight" in m
              and m.weight.shape[-1] % group_size == 0}
    fixed = {p: model.layer_bits(p, bits) for p in layers}
    if recipe == "budget":
        return budget(layers, fixed, view, bits, group_size, target_bpw)
    mixed = None if recipe == "uniform" else mixed_quant_predicate_builder(recipe, view, group_size)
    specs = {}
    for p, m in layers.items():
        chosen = mixed(view.path(p), m) if mixed else True
        if fixed[p] is not None or chosen is True:
            specs[p] = {"group_size": group_size, "bits": fixed[p] or bits, "mode": "affine"}
        elif chosen:
            specs[p] = chosen
    return specs


def budget(layers: Dict[str, nn.Module], fixed: Dict[str, Optional[int]], view, bits: int, group_size: int,
           target: Optional[float] = None) -> Dict[str, dict]:
    """The budget recipe. Every layer starts at `bits`, the token tables (the vocabulary, tied head included,
    and Gemma 3n's and Gemma 4's per-layer tables) in groups of TABLE_GROUP; then the other layers go up to
    bits + 1, those mlx-lm's mixed_4_6 favours (v_proj, down_proj and an untied head in its chosen layers)
    first, then those to bits + 2, each only while the language model stays within `target` bits per weight
    (scales and biases counted; default: BUDGET more than uniform `bits` would take). Why: a table is read one
    row per token (as the head, only the likely tokens' rows matter), so its rounding reaches the output far
    less than a decoder layer's. Measured on the real 270M (float perplexity 13.30): only the table at 4 bits in
    groups of 64, 13.91; only the decoder at mixed_4_6, 16.38; the whole recipe at 4.75 bits per weight 15.05,
    against 17.23 for mixed_4_6 at 4.61 (docs/convert-and-quantize.md)."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    favoured = mixed_quant_predicate_builder("mixed_4_6", view, group_size)
    scale_bits = 2 * 8 * next(iter(layers.values())).weight.dtype.size
    total = sum(m.weight.size for m in layers.values())
    target = bits + scale_bits / group_size + BUDGET if target is None else target

    def spec(p, b):
        table = isinstance(layers[p], nn.Embedding) and layers[p].weight.shape[-1] % TABLE_GROUP == 0
        return {"group_size": TABLE_GROUP if table else group_size, "bits": b, "mode": "affine"}

    plan = {p: spec(p, fixed[p] or bits) for p in layers}
    cost = sum(layers[p].weight.size * (q["bits"] + scale_bits / q["group_size"]) for p, q in plan.items())
    if cost > target * total + 1e-6:
        raise MlxGemmaError(f"--target-bpw {target} is below what {bits}-bit layers take here "
                            f"({cost / total:.3f} bits per weight)")
    rising = sorted((p for p in layers if fixed[p] is None and not isinstance(layers[p], nn.Embedding)),
                    key=lambda p: (next((int(x) for x in p.split(".") if x.isdigit()), -1), p))
    first = [p for p in rising if favoured(view.path(p), layers[p])["bits"] == 6]  # its raised layers
    steps = [(p, bits + 1) for p in first + [p for p in rising if p not in first]] + [(p, bits + 2) for p in first]
    for p, b in steps:
        extra = layers[p].weight.size * (b - plan[p]["bits"])
        if b <= 8 and cost + extra <= target * total + 1e-6:
            plan[p], cost = spec(p, b), cost + extra
    return plan


class _LanguageView:
    """What mlx-lm's mixed recipes read of a model (its modules, its layers), without the towers. They take the
    layer index of a module from the place of the first digit in the path of the first down_proj they meet,
    which in a model whose towers come first (EmbeddingGemma 2) is a tower's, at another depth; and they read
    that place in every path, so a module nested as deep outside the layers (EmbeddingGemma 2's
    language_model.ple.per_layer_model_projection) is passed to them by its leaf name, as layer 0."""

    def __init__(self, model):
        self.model, self.layers = model, model.layers
        first = next((n for n, _ in self.named_modules() if "down_proj" in n), "")
        self.at = next((i for i, part in enumerate(first.split(".")) if part.isdigit()), None)

    def named_modules(self):
        return [(n, m) for n, m in self.model.named_modules() if not self.model.in_vision_tower(n)]

    def path(self, path: str) -> str:
        parts = path.split(".")
        if self.at is None or len(parts) <= self.at or parts[self.at].isdigit():
            return path
        return ".".join(parts[: self.at - 1] + parts[-1:])


def search_grids(model: nn.Module, floats: Dict[str, mx.array]) -> None:
    """Re-round each quantized (affine) layer of `floats` {path: its float weight} on best_grid's grids,
    every weight counting alike."""
    from tqdm import tqdm

    layers = {p: m for p, m in model.named_modules() if p in floats and getattr(m, "mode", None) == "affine"}
    for p, m in tqdm(layers.items(), desc="[mlxgemma] choosing grids", file=sys.stderr, disable=len(layers) < 8):
        w = floats[p].reshape(-1, floats[p].shape[-1])  # experts (E, out, in): rows of every expert
        s, b = best_grid(w, mx.ones((w.shape[1],)), m.bits, m.group_size, m.scales.dtype)
        m.weight = quantize_on(w, s, b, m.bits, m.group_size).reshape(m.weight.shape)
        m.scales, m.biases = s.reshape(m.scales.shape), b.reshape(m.biases.shape)
        mx.eval(m.weight, m.scales, m.biases)

"""What does quantizing Gemma 4's per-layer embedding table cost? The E models look up, for every token, one
row of a (vocab_size_per_layer_input, layers x hidden_size_per_layer_input) table: 262144 x 8960 in E2B
(35 layers x 256), 2.35 G weights, more than the rest of the model. This measures, on a random-weight model
with E2B's widths (hidden 1536, MLP 6144 and double-wide on the KV-shared layers, 8 heads, 1 KV head, head
256 / 512, per-layer width 256 and a per-layer table of 262144 rows, softcap 30) but only --layers layers
(default 4: sliding, full, then the two KV-shared, which read them) and a main vocabulary of --vocab (16384:
its head's matmul is what takes the time on a CPU; the prompt's ids, below it, each read one table row as in
the real model), the table at 8, 4 and 3 bits against float:

  * its size, here and at E2B's 35 layers (bf16 float; affine groups of --group-size with bf16 scales and
    biases, as a released bf16 checkpoint quantizes);
  * the relative L2 error of the per-layer inputs (what each layer receives from the table: this does not
    depend on the layer count) and of the final logits, and the mean KL(float || quantized) of the
    next-token distributions, over a --tokens-token random prompt (top-1 agreement is not shown: a random
    tied model's argmax mostly echoes its input, and stays 100% here whatever is quantized);
  * the same with everything else quantized too (--recipes: mlx-lm's mixed_4_6, mlxgemma's 4-bit default
    until the budget recipe, and mixed_3_6; router at 8 bits): how much the table adds to the error the rest already makes.

Quantized weights are evaluated through their dequantized twins in float32 (exactly the weights a quantized
checkpoint holds): it compares weights, not kernels. Random weights stand in for real ones (none is
reachable here), so read the numbers as relative. Trained-like spread: unit-variance activations (matrices
N(0, 1/fan_in), embedding rows N(0, 1/width) before their sqrt(width) scale), norms 1 + N(0, 0.1).

    python benchmarks/gemma4_quant.py [--layers 4] [--tokens 128] [--group-size 64] [--vocab 16384]
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

E2B = Path(__file__).resolve().parent.parent / "tests" / "real_configs" / "google__gemma-4-E2B-it" / "config.json"
S, F = "sliding_attention", "full_attention"


def build(args):
    import mlxgemma

    text = json.loads(E2B.read_text())["text_config"]
    real_layers = text["num_hidden_layers"]
    n = args.layers
    types = ([S, F] * n)[: n // 2] * 2 if n % 2 == 0 else [S] * (n - 1) + [F]
    config = dict(text, num_hidden_layers=n, layer_types=types, num_kv_shared_layers=n // 2 if n % 2 == 0 else 0,
                  vocab_size=args.vocab)
    model = mlxgemma.build_model(config)
    mx.random.seed(0)
    params = []
    for name, p in _flat(model.parameters()):
        if name.endswith("layer_scalar"):
            v = mx.ones(p.shape)
        elif p.ndim >= 2:
            v = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        else:
            v = 1 + 0.1 * mx.random.normal(p.shape)
        params.append((name, v))
        mx.eval(v)
    model.load_weights(params)
    mx.eval(model.parameters())
    return model, real_layers


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def fake_quantize(module: nn.Module, bits: int, group_size: int) -> None:
    module.weight = mx.dequantize(*mx.quantize(module.weight, group_size, bits), group_size=group_size, bits=bits)
    mx.eval(module.weight)


def quantize_rest(model, recipe: str, group_size: int) -> None:
    """Everything but the per-layer table as mlxgemma quantizes it with that recipe (router at 8 bits)."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    from mlxgemma.models.gemma4_moe import SwitchLinear

    mixed = mixed_quant_predicate_builder(recipe, model, group_size)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear)) or name.endswith("embed_tokens_per_layer"):
            continue
        if m.weight.shape[-1] % group_size:
            continue
        low = mixed(name, m)["bits"]
        fake_quantize(m, model.layer_bits(name, low) or low, group_size)


def run(model, ids):
    from mlxgemma.models.common import scaled_embedding

    inner = model.model
    h = scaled_embedding(inner.embed_tokens, ids, inner.config.hidden_size)
    per_layer = inner.per_layer_inputs(ids, h)
    logits = model(ids)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    mx.eval(per_layer, logits, probs)
    return per_layer, logits, probs


def table_mib(rows: int, cols: int, bits, group_size: int) -> float:
    if bits is None:
        return rows * cols * 2 / 2**20  # bf16
    return rows * cols * (bits / 8 + 2 * 2 / group_size) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=16384, help="the main vocabulary (the head's matmul is most of "
                   "the time on a CPU); the per-layer table keeps E2B's 262144 rows")
    p.add_argument("--recipes", default="mixed_4_6,mixed_3_6", help="recipes for the rest of the model")
    args = p.parse_args()
    t0 = time.perf_counter()
    model, real_layers = build(args)
    inner = model.model
    P, V = inner.config.hidden_size_per_layer_input, inner.config.vocab_size_per_layer_input
    ids = mx.array(np.random.default_rng(0).integers(3, inner.config.vocab_size, (1, args.tokens)))
    table = inner.embed_tokens_per_layer
    float_table = table.weight
    float_rest = {name: m.weight for name, m in model.named_modules() if "weight" in m and m is not table}
    ref = run(model, ids)
    print(f"random-weight Gemma 4 of E2B's widths, {args.layers} layers ({', '.join(inner.config.layer_types)}; "
          f"the last {inner.config.num_kv_shared_layers} KV-shared), vocab {inner.config.vocab_size}, per-layer table "
          f"{V} x {args.layers * P}, {args.tokens}-token prompt, "
          f"groups of {args.group_size}; built and run in float32 in {time.perf_counter() - t0:.0f} s")
    print("| table | rest of the model | table MiB here | table MiB in E2B (35 layers) | per-layer inputs rel. error "
          "| logits rel. error | KL(float \u2016 q) |\n|---|---|---|---|---|---|---|")
    for rest in [None] + args.recipes.split(","):
        if rest is not None:
            restore(model, float_rest)
            quantize_rest(model, rest, args.group_size)
        for bits in (None, 8, 4, 3):
            table.weight = float_table
            if bits:
                fake_quantize(table, bits, args.group_size)
            out = ref if bits is None and rest is None else run(model, ids)
            rel = [(mx.linalg.norm(a - b) / mx.linalg.norm(b)).item() for a, b in zip(out[:2], ref[:2])]
            kl = (ref[2] * (mx.log(ref[2] + 1e-30) - mx.log(out[2] + 1e-30))).sum(-1).mean().item()
            here = table_mib(V, args.layers * P, bits, args.group_size)
            e2b = table_mib(262144, real_layers * P, bits, args.group_size)
            print(f"| {f'{bits}-bit' if bits else 'float (bf16)'} | {rest or 'float'} | {here:.0f} | {e2b:.0f} | "
                  f"{rel[0]:.4f} | {rel[1]:.4f} | {kl:.5f} |", flush=True)


def restore(model, weights: dict) -> None:
    for name, m in model.named_modules():
        if name in weights:
            m.weight = weights[name]


if __name__ == "__main__":
    main()

"""KV-cache bytes against context length for Gemma 3 270M's attention layout (18 layers, five sliding to one
full, window 512, one KV head of 256), after 1x, 4x and 16x the window, for mlxgemma and mlx-lm. KV bytes
depend only on that layout, so the model is narrowed elsewhere (hidden 64, vocab 512) to run fast; values
are float32 (MLX's CPU backend runs bfloat16 ~8x slower; on a Mac in bfloat16 every number halves).
The sliding layers' share must stay flat.

    python benchmarks/kv_memory.py
"""

import mlx.core as mx
from mlx.utils import tree_map

import mlxgemma

CONFIG = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=18,
              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
              query_pre_attn_scalar=256)


def kv_bytes(model, tokens: int, chunk: int = 512):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = mx.random.randint(3, 512, (1, tokens), key=mx.random.key(1))
    for start in range(0, tokens, chunk):
        model(ids[:, start : start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
    for _ in range(3):  # and a few decode steps
        model(ids[:, :1], cache=cache)
    mx.eval([c.state for c in cache])
    types = mlxgemma.Gemma3TextConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}).layer_types
    sliding = sum(c.nbytes for c, t in zip(cache, types) if t == "sliding_attention")
    full = sum(c.nbytes for c, t in zip(cache, types) if t == "full_attention")
    return sliding, full


def main():
    from mlx_lm.models.gemma3_text import Model, ModelArgs

    ours = mlxgemma.build_model(CONFIG)
    ours.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, ours.parameters()))
    theirs = Model(ModelArgs.from_dict(CONFIG))
    theirs.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, theirs.parameters()))
    print("| context | library | sliding layers (15) KiB | full layers (3) KiB | total KiB |\n|---|---|---|---|---|")
    for mult in (1, 4, 16):
        for name, model in (("mlxgemma", ours), ("mlx-lm", theirs)):
            s, f = kv_bytes(model, 512 * mult)
            print(f"| {mult}x window ({512 * mult} + 3) | {name} | {s / 1024:.0f} | {f / 1024:.0f} | {(s + f) / 1024:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

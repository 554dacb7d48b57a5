"""KV-cache bytes against context length for Gemma 3 270M's attention layout (18 layers, five sliding to one
full, window 512, one KV head of 256), after 1x, 4x and 16x the window, for mlxgemma and mlx-lm, float and
quantized (--kv-bits 8 and 4, groups of 64). KV bytes depend only on that layout, so the model is narrowed
elsewhere (hidden 64, vocab 512) to run fast; values are float32 (MLX's CPU backend runs bfloat16 ~8x slower;
on a Mac in bfloat16 the float numbers halve). The sliding layers' share must stay flat.

Then the real Gemma 3 270M (mlxgemma[demo], float32) over --tokens of license text (the Gemma terms, then
CPython's LICENSE.txt, which every CPython install ships: the terms alone are 1,793 tokens; past the window), teacher-forced in chunks of 256 through each cache: perplexity and top-1 agreement with the float
cache, and decode tokens/s after that context (--decode steps) with each cache.

    python benchmarks/kv_memory.py [--tokens 2048] [--decode 32] [--skip-real | --skip-bytes]
"""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

import mlxgemma

CONFIG = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=18,
              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
              query_pre_attn_scalar=256)


def kv_bytes(model, tokens: int, chunk: int = 512, bits=None):
    from mlx_lm.models.cache import make_prompt_cache

    from mlxgemma.models.quantized_cache import quantize_cache

    cache = make_prompt_cache(model)
    ids = mx.random.randint(3, 512, (1, tokens), key=mx.random.key(1))
    for start in range(0, tokens, chunk):
        model(ids[:, start : start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
        if bits:
            quantize_cache(cache, 0, 64, bits)
    for _ in range(3):  # and a few decode steps
        model(ids[:, :1], cache=cache)
    mx.eval([c.state for c in cache])
    types = mlxgemma.Gemma3TextConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}).layer_types
    sliding = sum(c.nbytes for c, t in zip(cache, types) if t == "sliding_attention")
    full = sum(c.nbytes for c, t in zip(cache, types) if t == "full_attention")
    return sliding, full


def mlx_lm_quantizes(model) -> str:
    """Whether mlx-lm's own caches of this model turn quantized (its maybe_quantize_kv_cache's call)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[3, 4, 5]]), cache=cache)
    try:
        [c.to_quantized(group_size=64, bits=8) for c in cache]
        return "yes"
    except Exception as e:  # its RotatingKVCache has no quantized form
        return f"no: {type(e).__name__}: {e}"


def long_text() -> str:
    import sys

    from quality import license_text

    python = sorted(Path(sys.base_prefix).glob("lib/python3*/LICENSE.txt")) + [Path(sys.base_prefix) / "LICENSE.txt"]
    return license_text() + "\n\n" + next(p for p in python if p.exists()).read_text()


def real_quality(tokens: int, decode: int) -> None:
    import time

    import numpy as np

    from mlxgemma.models.quantized_cache import quantize_cache
    from speed import real_checkpoint

    model, tok = mlxgemma.load(real_checkpoint("float32", Path("/tmp/mlxgemma-kv")))
    ids = list(tok.encode(long_text()))[: tokens + 1]
    print(f"\nGemma 3 270M, float32, {len(ids) - 1} tokens of license text (window 512), teacher-forced "
          f"in chunks of 256; decode after that context, {decode} steps:\n")
    print("| KV cache | perplexity | vs float | top-1 agreement | KV MiB | decode tok/s |\n|---|---|---|---|---|---|")
    reference = None
    for bits in (None, 8, 4):
        cache, nll, top = model.make_cache(), [], []
        inputs, targets = mx.array(ids[:-1])[None], mx.array(ids[1:])
        for start in range(0, inputs.shape[1], 256):
            logits = model(inputs[:, start:start + 256], cache=cache)[0].astype(mx.float32)
            t = targets[start:start + 256]
            nll.append(mx.logsumexp(logits, -1) - mx.take_along_axis(logits, t[:, None], -1)[:, 0])
            top.append(mx.argmax(logits, -1))
            mx.eval(nll[-1], top[-1])
            quantize_cache(cache, 0, 64, bits)
        ppl, top = float(mx.exp(mx.concatenate(nll).mean()).item()), np.array(mx.concatenate(top))
        reference = (ppl, top) if reference is None else reference
        kv = sum(c.nbytes for c in cache) / 2**20
        token = mx.array([[int(top[-1])]])
        start = time.perf_counter()
        for _ in range(decode):
            token = mx.argmax(model(token, cache=cache)[:, -1], -1)[:, None]
            mx.eval(token)
        tps = decode / (time.perf_counter() - start)
        print(f"| {'float' if bits is None else f'{bits}-bit'} | {ppl:.3f} | {100 * (ppl / reference[0] - 1):+.2f}% | "
              f"{100 * np.mean(top == reference[1]):.1f}% | {kv:.1f} | {tps:.2f} |", flush=True)


def main():
    import argparse
    import sys

    from mlx_lm.models.gemma3_text import Model, ModelArgs

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-bytes", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.skip_bytes:
        return real_quality(args.tokens, args.decode)

    ours = mlxgemma.build_model(CONFIG)
    ours.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, ours.parameters()))
    theirs = Model(ModelArgs.from_dict(CONFIG))
    theirs.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, theirs.parameters()))
    print("| context | library | sliding layers (15) KiB | full layers (3) KiB | total KiB |\n|---|---|---|---|---|")
    for mult in (1, 4, 16):
        for name, model, bits in (("mlxgemma", ours, None), ("mlx-lm", theirs, None), ("mlxgemma 8-bit", ours, 8),
                                  ("mlxgemma 4-bit", ours, 4)):
            s, f = kv_bytes(model, 512 * mult, bits=bits)
            print(f"| {mult}x window ({512 * mult} + 3) | {name} | {s / 1024:.0f} | {f / 1024:.0f} | {(s + f) / 1024:.0f} |",
                  flush=True)
    print(f"\nmlx-lm's caches of Gemma 3 quantize (--kv-bits): {mlx_lm_quantizes(theirs)}")
    if not args.skip_real:
        real_quality(args.tokens, args.decode)


if __name__ == "__main__":
    main()

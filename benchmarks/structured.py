"""Structured output's cost, one run: decode tokens/s constrained by a 10-field nested schema against
unconstrained, on a tiny random Gemma 3 (tests/structured_util.py) and on the real Gemma 3 270M
(mlxgemma[demo], float32, its 262,144-token vocabulary), rounds interleaved; the mask's time per token; the
time to compile each schema of the test corpus (tests/schemas.py) with Gemma 3's tokenizer, for llguidance
(what mlxgemma uses) and, where installed, xgrammar and outlines-core (the engine comparison behind the choice).

    python benchmarks/structured.py [--tokens 64] [--rounds 3] [--skip-real]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import mlxgemma  # noqa: E402
from mlxgemma.decode import constrained  # noqa: E402
from schemas import NESTED, SCHEMAS  # noqa: E402

PROMPT = "Write the order as JSON: order AB1234 for Ada Lovelace (ada@example.com, a VIP), 2 x SKU-1, EUR 40, paid."


def decode_rate(model, tok, tokens: int, **constraint) -> tuple:
    """(generation tokens/s, tokens) of one greedy run."""
    last = None
    for last in mlxgemma.stream_generate(model, tok, PROMPT, max_tokens=tokens, **constraint):
        pass
    return last.generation_tps, last.generation_tokens


def mask_time(model, tok, tokens: int) -> float:
    """Mean seconds per mask over the constrained greedy output, replayed through a fresh constraint."""
    out = [c.token for c in mlxgemma.stream_generate(model, tok, PROMPT, max_tokens=tokens, json_schema=NESTED)]
    c = constrained.constraint_for(model, tok, json_schema=NESTED)
    for t in out:
        c.mask()
        c.consume(t)
    return c.mask_seconds / max(len(out), 1)


def speed(name, model, tok, tokens, rounds):
    plain, fixed = [], []
    for _ in range(rounds):  # interleaved, so that both see the same machine state
        plain.append(decode_rate(model, tok, tokens)[0])
        fixed.append(decode_rate(model, tok, tokens, json_schema=NESTED)[0])
    p, f = statistics.median(plain), statistics.median(fixed)
    print(f"| {name} | {p:.1f} | {f:.1f} | {f / p:.2f}x | {1e3 * mask_time(model, tok, tokens):.3f} |", flush=True)


def compile_times(hf, vocab: int) -> None:
    start = time.perf_counter()
    constrained.ll_tokenizer(hf, vocab)
    print(f"\nllguidance tokenizer (built once per tokenizer, {vocab} tokens): {time.perf_counter() - start:.2f} s")
    engines = {"llguidance": _llguidance(hf, vocab)}
    for name, make in (("xgrammar", _xgrammar), ("outlines-core", _outlines)):
        try:
            engines[name] = make(hf, vocab)
        except Exception as e:  # not installed, or its API moved
            print(f"{name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    print(f"\nCompile (schema to first mask) over the {len(SCHEMAS) + 1} corpus schemas, Gemma 3's tokenizer:\n")
    print("| engine | median ms | max ms | failed |\n|---|---|---|---|")
    for name, compile_one in engines.items():
        times, failed = [], 0
        for schema in SCHEMAS + [NESTED]:
            start = time.perf_counter()
            try:
                compile_one(schema)
            except Exception:
                failed += 1
                continue
            times.append(1e3 * (time.perf_counter() - start))
        print(f"| {name} | {statistics.median(times):.1f} | {max(times):.1f} | {failed} |", flush=True)


def _llguidance(hf, vocab):
    def one(schema):
        constrained.Constraint(hf, constrained.grammar_of(json_schema=schema), vocab).mask()
    return one


def _xgrammar(hf, vocab):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)

    def one(schema):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        matcher.fill_next_token_bitmask(xgr.allocate_token_bitmask(1, info.vocab_size))
    return one


def _outlines(hf, vocab):
    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    eos, tokens = hf.eos_token_id, {}
    for token, i in hf.get_vocab().items():
        if i != eos and i < vocab:
            text = hf.convert_tokens_to_string([token])
            tokens.setdefault(text, []).append(i)
    vocabulary = Vocabulary(eos, tokens)

    def one(schema):
        Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
    return one


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-real", action="store_true")
    args = p.parse_args()
    from structured_util import structured_checkpoint

    print("| model | unconstrained tok/s | constrained (nested schema) tok/s | ratio | mask ms/token |")
    print("|---|---|---|---|---|")
    tiny = mlxgemma.load(structured_checkpoint("gemma3", Path(tempfile.mkdtemp()) / "tiny"))
    speed("tiny Gemma 3 (hidden 32, 390 tokens)", *tiny, args.tokens, args.rounds)
    if args.skip_real:
        return
    from speed import real_checkpoint

    model, tok = mlxgemma.load(real_checkpoint("float32", Path("/tmp/mlxgemma-kv")))
    speed("Gemma 3 270M float32 (262,144 tokens)", model, tok, args.tokens, args.rounds)
    compile_times(tok._tokenizer, constrained.logits_width(model))


if __name__ == "__main__":
    main()

"""Gemma 4 native tool calls, one run: 50+ tool-calling requests with random schemas (strings, integers, numbers,
booleans, enums, nullable fields, arrays, nested objects; namespaced names) on a tiny random Gemma 4 with Gemma 4's
template and special tokens (tests/gemma4_chat_util.py), through the server's own path (engine.chat, the tool
grammar, the decode core, answer.py): the share of calls that parse and validate against their schema
(jsonschema), constrained (tool_choice "required") and, for comparison, unconstrained (the same prompt with the
call's opening `<|tool_call>call:NAME{` written for the model, which then runs free). Then decode speed with the
call grammar against without it, interleaved rounds of the same length.

    python benchmarks/tools.py [--requests 50] [--rounds 5] [--tokens 96]
"""

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import jsonschema  # noqa: E402

import gemma4_chat_util as g4  # noqa: E402
import mlxgemma  # noqa: E402
from mlxgemma.decode.gemma4_format import call_grammar, parse_call_body  # noqa: E402

WORDS = ["city", "query", "limit", "unit", "when", "tags", "opts", "path", "mode", "count", "note", "ids"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "nullable", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["a", "b c", 'd"e', "f`g", "h{i}"], 3)}
    if kind == "nullable":
        return {"type": ["string", "null"]}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1) if depth < 1 else {"type": "string"}}
    if kind == "object":
        return random_object(rng, depth + 1)
    return {"type": kind}


def random_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 4))
    props = {n: random_schema(rng, depth) for n in names}
    return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names)))}


def random_tool(rng: random.Random, i: int) -> dict:
    name = rng.choice([f"tool_{i}", f"mcp:server:tool-{i}", f"ns.v{i}.run"])
    return {"type": "function", "function": {"name": name, "description": f"Tool {i}",
                                             "parameters": random_object(rng)}}


def strict(schema: dict) -> dict:
    """The schema as the grammar holds calls to it: declared properties only."""
    if schema.get("type") == "object":
        props = {k: strict(v) for k, v in schema.get("properties", {}).items()}
        return dict(schema, properties=props, additionalProperties=False)
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return dict(schema, items=strict(schema["items"]))
    return schema


def valid(calls, tool: dict) -> bool:
    """Whether the calls read back from an output are calls of tool whose arguments match its schema."""
    fn = tool["function"]
    if not calls or any(name != fn["name"] for name, _ in calls):
        return False
    try:
        for _, args in calls:
            jsonschema.validate(args, strict(fn["parameters"]))
        return True
    except jsonschema.ValidationError:
        return False


def run(model, tok, prompt, max_tokens: int, **constraint):
    """(the calls read back, tokens/s, tokens) of one greedy run; calls are mlxgemma's reading of the stream,
    the same reader the server's answers use."""
    calls, last = [], None
    for last in mlxgemma.stream_generate(model, tok, prompt, max_tokens=max_tokens, **constraint):
        calls += last.calls
    return calls, last.generation_tps, last.generation_tokens


def prompt_of(tok, tool) -> list:
    messages = [{"role": "user", "content": "Use the tool."}]
    return tok._tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, return_dict=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()
    rng = random.Random(0)
    path = g4.save(Path(tempfile.mkdtemp()) / "gemma4-tiny")
    model, tok = mlxgemma.load(path)
    tools = [random_tool(rng, i) for i in range(args.requests)]
    ok = returned = free_ok = 0
    for tool in tools:
        fn = tool["function"]
        grammar = call_grammar([fn], "required", parallel=False)
        calls, _, _ = run(model, tok, prompt_of(tok, tool), 400, grammar=grammar)
        returned += bool(calls)  # (none: cut at max_tokens inside a string a random model never closes)
        ok += valid(calls, tool)
        opener = tok.encode(f"<|tool_call>call:{fn['name']}{{", add_special_tokens=False)
        text = "".join(c.text for c in mlxgemma.stream_generate(model, tok, prompt_of(tok, tool) + opener,
                                                                 max_tokens=400))
        try:  # (the reader sees no opener here: the body is parsed as the reader parses a call's)
            free_ok += valid([parse_call_body(f"call:{fn['name']}{{" + text.split("<tool_call|>")[0])], tool)
        except ValueError:
            pass
    print(f"constrained: {returned}/{len(tools)} requests returned a call (the rest hit max_tokens), "
          f"{ok}/{returned} returned calls parse and validate ({100 * ok / max(returned, 1):.0f}%); "
          f"unconstrained: {free_ok}/{len(tools)} parse and validate ({100 * free_ok / len(tools):.0f}%)")

    # Speed: a free-text answer under tool_choice "auto" (the grammar's TEXT, masks every token) against the same
    # request without tools' constraint, same prompt and length (a free-running random model never ends early).
    tool = tools[0]
    grammar = call_grammar([tool["function"]], "auto")
    prompt = prompt_of(tok, tool)
    rates = {"constrained": [], "plain": []}
    run(model, tok, prompt, 8)  # warm-up
    for _ in range(args.rounds):
        rates["plain"].append(run(model, tok, prompt, args.tokens)[1])
        rates["constrained"].append(run(model, tok, prompt, args.tokens, grammar=grammar)[1])
    plain, constrained = statistics.median(rates["plain"]), statistics.median(rates["constrained"])
    print(f"decode: plain {plain:.0f} tokens/s, with the call grammar {constrained:.0f} tokens/s "
          f"(ratio {constrained / plain:.3f}; median of {args.rounds} interleaved rounds of {args.tokens} tokens)")


if __name__ == "__main__":
    main()

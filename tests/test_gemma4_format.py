"""Gemma 4's native output format (mlxgemma/decode/gemma4_format.py), without a model: format_call against Google's
own chat template rendered by transformers (tests/data/gemma4_chat_template.jinja), parse_calls and the streaming
OutputParser on adversarial values split at every point, and call_grammar compiled by llguidance and checked
token by token on a byte-fallback tokenizer that has Gemma 4's special tokens."""

import json
import random
import re
from pathlib import Path

import pytest

from mlxgemma.decode import constrained
from mlxgemma.decode.gemma4_format import (OutputParser, call_grammar, format_call, format_value, parse_call_body,
                                           parse_calls)

TEMPLATE = Path(__file__).parent / "data" / "gemma4_chat_template.jinja"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>",
            "<|tool_response>", "<tool_response|>", "<turn|>", "<|turn>"]
MARKERS = SPECIALS[3:]

STRINGS = ["plain", "", " ", 'say "hi"', "it's", "`ls -la`", "{braces}", "}", "]", "[", "a,b:c", "k:v,", "x}y{z",
           "line1\nline2\n", "\ttab\r\n", "ünïcödé", "中文字符", "emoji 😀🎉👩‍👩‍👧", "back\\slash \\n", "null", "true",
           "123", "-0.5", "<|\"| not quite", "a < b > c", "text <tool_call|> inside", "<|tool_call>call:x{}",
           "<channel|><|channel>thought\n", "<turn|>", "\x00\x01", " leading and trailing "]
NUMBERS = [0, 1, -1, 42, -0.5, 0.1, 1e10, 1e16, 1.5e-7, -2.5e300, 10**30, -10**20, 3.141592653589793, 2**63]
OTHERS = [True, False, None, [], {}, [[[]]], [1, "x", None, True], {"a": {"b": [1, "x", None]}},
          [{"k": "v"}, {"k": ""}], {"Z": 1, "a": 2, "B": 3, "_": 4}, {"my-key": 1, "x.y": [], "ключ": "значение"}]
VALUES = STRINGS + NUMBERS + OTHERS
NAMES = ["f", "get_weather", "mcp:server:tool", "google:mcp:files:create-pdf-file", "a.b.c", "do-it", "ns.tool_v2"]


def corpus():
    """(name, arguments) pairs: each value alone, and all of them in one call."""
    calls = [(NAMES[i % len(NAMES)], {"value": v}) for i, v in enumerate(VALUES)]
    calls.append(("mcp:server:tool", {f"k{i}": v for i, v in enumerate(VALUES)}))
    calls.append(("f", {}))
    return calls


def same(a, b) -> bool:
    """Equal and of the same JSON types (True is not 1, 1.0 is not 1)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def render(messages, **kw) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=TEMPLATE.read_text(), bos_token="<bos>", **kw)
    return rendered[0]


def assistant_calls(calls):
    return {"role": "assistant", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}
        for i, (name, args) in enumerate(calls)]}


# format_call is the template


def test_format_call_is_the_templates_rendering():
    calls = corpus()
    text = render([{"role": "user", "content": "go"}, assistant_calls(calls)], add_generation_prompt=True)
    head = "<bos><|turn>user\ngo<turn|>\n<|turn>model\n"
    assert text == head + "".join(format_call(n, a) for n, a in calls) + "<|tool_response>"


def test_format_call_details():
    assert format_call("f", None) == format_call("f", {}) == "<|tool_call>call:f{}<tool_call|>"
    # dictsort: case-insensitive, ties in insertion order; floats as Python prints them
    assert format_value({"b": 1, "B": 2, "a": 1e10, "A": -0.5}) == "{a:10000000000.0,A:-0.5,b:1,B:2}"
    assert format_value([True, None, 1e16, (1, 2)]) == "[true,null,1e+16,[1,2]]"
    with pytest.raises(TypeError):
        format_call("f", '{"a": 1}')  # the template raises on a JSON string too


def test_render_check():
    """A conversation with tools, a call and its result: the call appears verbatim, the result after it."""
    tools = [{"type": "function", "function": {
        "name": "mcp:weather:get", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}}]
    args = {"days": 2, "city": 'São "Paulo" {}\n'}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                dict(assistant_calls([("mcp:weather:get", args)]), content=""),
                {"role": "tool", "tool_call_id": "c0", "content": '{"temp": 15}'}]
    text = render(messages, tools=tools, add_generation_prompt=True, enable_thinking=True)
    call = format_call("mcp:weather:get", args)
    assert call in text
    assert text.endswith(call + '<|tool_response>response:mcp:weather:get{value:<|"|>{"temp": 15}<|"|>}'
                                '<tool_response|><|channel>thought\n')
    assert "<|tool>declaration:mcp:weather:get{" in text and text.startswith("<bos><|turn>system\n<|think|>\n")


# Reading back


@pytest.mark.parametrize("name, args", corpus())
def test_round_trip(name, args):
    (got_name, got), = parse_calls(format_call(name, args))
    assert got_name == name and same(got, args)


def events_of(pieces, **kw):
    """Events of the pieces fed one by one, consecutive text (or thought) merged, and the parser."""
    parser = OutputParser(**kw)
    merged = []
    for e in [e for p in pieces for e in parser.feed(p)] + parser.finish():
        if merged and e.kind in ("text", "thought") and merged[-1].kind == e.kind:
            merged[-1] = merged[-1]._replace(text=merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged, parser


OUTPUT = ("<|channel>thought\nThe user wants {weather}; call <|\"|>it<|\"|>.\n<channel|>Let me check < that."
          + format_call("mcp:weather:get", {"city": "Paris <tool_call|>", "n": [1, {"x": None}]})
          + format_call("do-it", {}) + "<|tool_response>")


def expected(events):
    return [(e.kind, e.text, e.name, json.dumps(e.arguments)) for e in events]


def test_output_events():
    events, parser = events_of([OUTPUT])
    assert expected(events) == [
        ("thought", 'The user wants {weather}; call <|"|>it<|"|>.', "", "null"),
        ("text", "Let me check < that.", "", "null"),
        ("call", "", "mcp:weather:get", json.dumps({"city": "Paris <tool_call|>", "n": [1, {"x": None}]})),
        ("call", "", "do-it", "{}")]
    assert not parser.incomplete


@pytest.mark.parametrize("seed", range(40))
def test_output_split_anywhere(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(OUTPUT)), rng.randint(1, 30)))
    pieces = [OUTPUT[a:b] for a, b in zip([0] + cuts, cuts + [len(OUTPUT)], strict=True)]
    assert expected(events_of(pieces)[0]) == expected(events_of([OUTPUT])[0])


def test_output_char_by_char_never_leaks():
    text = "Sure<turn|>" + OUTPUT + "<channel|><tool_call|>"
    parser = OutputParser()
    events = [e for c in text for e in parser.feed(c)] + parser.finish()
    answer = "".join(e.text for e in events if e.kind == "text")
    assert answer == "SureLet me check < that."
    assert [e.name for e in events if e.kind == "call"] == ["mcp:weather:get", "do-it"]
    for e in events:  # each piece sent is clean, not just the whole
        assert e.kind == "call" or not any(m in e.text for m in ("<|channel>", "<channel|>", "<|tool_call>"))


def test_output_cut_off_inside_a_call():
    whole = "Hi" + format_call("f", {"a": "x", "b": [1, 2]})
    for end in range(whole.index("<|tool_call>") + len("<|tool_call>"), len(whole)):
        events, parser = events_of([whole[:end]])
        assert [(e.kind, e.text) for e in events] == [("text", "Hi")] and parser.incomplete, end
    events, parser = events_of(["Hi <|tool_c"])  # text that only looks like the start of a marker stays text
    assert [(e.kind, e.text) for e in events] == [("text", "Hi <|tool_c")] and not parser.incomplete


def test_output_thoughts():
    events, _ = events_of(["still thinking\n<channel|>Answer."], start_in_thought=True)
    assert expected(events) == [("thought", "still thinking", "", "null"), ("text", "Answer.", "", "null")]
    events, _ = events_of(["<|channel>thought\n<channel|>Hi"])  # the empty thought of thinking off
    assert expected(events) == [("text", "Hi", "", "null")]
    events, _ = events_of(["<|channel>thought\nhm " + format_call("f", {"q": 1})])  # a call ends a thought
    assert [(e.kind, e.text or e.name) for e in events] == [("thought", "hm "), ("call", "f")]
    events, parser = events_of(["<|channel>thought\nunfinished\n"])
    assert expected(events) == [("thought", "unfinished\n", "", "null")] and not parser.incomplete


def test_lenient_reading():
    assert parse_call_body(' call:f { a : <|"|>x<|"|> , "b" : "q\\"", c : [ 1 , 2 ] , d: None }') == (
        "f", {"a": "x", "b": 'q"', "c": [1, 2], "d": None})
    assert parse_call_body("g{}") == ("g", {})
    for bad in ["call:{}", "call:f", 'call:f{a:<|"|>x}', "call:f{a:1", "call:f{a:1}}", "call:f{a}", "call:f[1]",
                "call:f{a:1 b:2}", "call:f" + "{a:[" * 5000]:
        with pytest.raises(ValueError):
            parse_call_body(bad)
    events, _ = events_of(["<|tool_call>call:f{a:<|tool_call>"])
    assert events == []
    events, _ = events_of(["<|tool_call>call:f{a:}<tool_call|>ok"])
    assert [(e.kind, e.text) for e in events] == [("bad_call", "call:f{a:}"), ("text", "ok")]


# The grammar


FUNCTIONS = [
    {"name": "mcp:weather:get", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f", "ü \"k\""]},
        "opts": {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": ["number", "null"]}},
                 "required": ["x"]},
        "tags": {"type": "array", "items": {"type": "string"}}, "mode": {"const": {"k": [1, "v"]}},
        "ratio": {"type": "number", "nullable": True}, "pick": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "ref": {"$ref": "#/$defs/x"}, "Big": {"type": "boolean"}}, "required": ["city", "Big"]}},
    {"name": "any.thing-v2", "parameters": {"type": "object", "properties": {"value": {}}}},
    {"name": "free", "parameters": {"type": "object"}},
    {"name": "f", "parameters": {"type": "object", "properties": {}}},
]


@pytest.fixture(scope="module")
def tokenizer():
    """Every character as its UTF-8 bytes (<0xNN> byte-fallback pieces, as Gemma spells what it has no piece
    for), and Gemma 4's special tokens: the grammar is checked character by character."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS[:3] + ["<unk>"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def token_ids(tokenizer, text: str):
    """text's tokens as the model would write them: the markers outside strings as special tokens, the rest
    (string bodies included, whatever they hold) byte by byte."""
    special = re.compile("(" + "|".join(map(re.escape, MARKERS)) + ")")
    ids = []
    for i, part in enumerate(text.split('<|"|>')):
        if i:
            ids.append(tokenizer.convert_tokens_to_ids('<|"|>'))
        for piece in (special.split(part) if i % 2 == 0 else [part]):
            if piece in MARKERS and i % 2 == 0:
                ids.append(tokenizer.convert_tokens_to_ids(piece))
            else:
                ids += byte_ids(tokenizer, piece)
    return ids


def byte_ids(tokenizer, text: str):
    return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])


def accepts(tokenizer, grammar: str, text: str, ids=None) -> bool:
    """Whether the Constraint of grammar lets the model write text (or the tokens ids) and stop there."""
    c = constrained.Constraint(tokenizer, constrained.grammar_of(grammar=grammar), len(tokenizer))
    for t in token_ids(tokenizer, text) if ids is None else ids:
        if not c.allows(t, c.mask()):
            return False
        c.consume(t)
    return c.accepting


def test_grammar_compiles():
    import llguidance

    for choice in ("auto", "required", "mcp:weather:get", "free"):
        for parallel in (True, False):
            for kw in ({}, {"thinking": True}, {"in_thought": True}):
                grammar = constrained.grammar_of(grammar=call_grammar(FUNCTIONS, choice, parallel, **kw))
                error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
                assert not error and all("special_token" in m for m in messages), messages
    with pytest.raises(ValueError):
        call_grammar(FUNCTIONS, "nope", True)


def test_grammar_accepts_every_value(tokenizer):
    grammar = call_grammar(FUNCTIONS, "required", True)
    for _, args in corpus():
        text = format_call("any.thing-v2", {"value": args.get("value", args)})
        assert accepts(tokenizer, grammar, text), text
    many = "".join(format_call("free", args) for _, args in corpus())
    assert accepts(tokenizer, grammar, many)
    typed = {"city": 'Pa"ris}{\n😀', "days": -3, "unit": 'ü "k"', "opts": {"x": True, "y": None}, "tags": ["", "<"],
             "mode": {"k": [1, "v"]}, "ratio": None, "pick": "x", "ref": [{"any": 1e+16}], "Big": False}
    for keep in (list(typed), ["city", "Big"], ["Big", "city", "pick"], ["city", "Big", "opts"]):
        assert accepts(tokenizer, grammar, format_call("mcp:weather:get", {k: typed[k] for k in keep})), keep
    assert accepts(tokenizer, grammar, format_call("mcp:weather:get", {"city": "", "Big": True, "pick": 7,
                                                                       "ratio": -0.5, "opts": {"x": False, "y": 1}}))


def test_grammar_refuses(tokenizer):
    grammar = call_grammar(FUNCTIONS, "required", False)
    ok = {"city": "x", "Big": True}
    for args in [{"city": "x"}, {"Big": True}, dict(ok, days=1.5), dict(ok, days="1"), dict(ok, unit="k"),
                 dict(ok, opts={}), dict(ok, opts={"x": 1}), dict(ok, tags=[1]), dict(ok, mode={"k": [1]}),
                 dict(ok, pick=True), dict(ok, extra=1), dict(ok, ratio=float("inf"))]:
        assert not accepts(tokenizer, grammar, format_call("mcp:weather:get", args)), args
    assert accepts(tokenizer, grammar, format_call("mcp:weather:get", ok))
    call = format_call("f", {})
    assert not accepts(tokenizer, grammar, call + call)  # parallel False
    assert not accepts(tokenizer, grammar, format_call("g", {}))  # not declared
    assert not accepts(tokenizer, grammar, format_call("f", {"a": 1}))  # properties {}: no arguments
    assert not accepts(tokenizer, grammar, "text")  # required
    assert not accepts(tokenizer, grammar, call.replace("{}", "{ }"))  # the template writes no whitespace
    # a string's body never holds the text <|"|> spelled in bytes (it would not read back)
    head, quote = token_ids(tokenizer, '<|tool_call>call:any.thing-v2{value:<|"|>'), token_ids(tokenizer, '<|"|>')
    tail = quote + token_ids(tokenizer, "}<tool_call|>")
    assert accepts(tokenizer, grammar, "", head + byte_ids(tokenizer, '<|"| b') + tail)
    assert not accepts(tokenizer, grammar, "", head + byte_ids(tokenizer, '<|"|> b') + tail)


def test_grammar_choices(tokenizer):
    call, other = format_call("f", {}), format_call("free", {"a": 1})
    auto = call_grammar(FUNCTIONS, "auto", True)
    for text in ["Just text, {braces} and <|\"| too.", "", "Let me look." + call + other, call]:
        assert accepts(tokenizer, auto, text), text
    assert not accepts(tokenizer, auto, call + "then text")
    named = call_grammar(FUNCTIONS, "free", True)
    assert accepts(tokenizer, named, other) and not accepts(tokenizer, named, call)
    assert not accepts(tokenizer, named, other + other)  # a named function is called once
    thinking = call_grammar(FUNCTIONS, "required", True, thinking=True)
    for text in [call, "<|channel>thought\nHm.\n<channel|>" + call, "<|channel>thought\n<channel|>" + call]:
        assert accepts(tokenizer, thinking, text), text
    in_thought = call_grammar(FUNCTIONS, "auto", True, in_thought=True)
    assert accepts(tokenizer, in_thought, "Hm.\n<channel|>Answer.")
    assert accepts(tokenizer, in_thought, "<channel|>" + call)
    assert not accepts(tokenizer, in_thought, "Answer.")

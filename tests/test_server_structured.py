"""Structured output and tool calls through a live server, with the real openai and ollama clients, on a tiny
random Gemma 3 whose tokenizer can spell JSON: response_format json_schema (whole, streamed, n > 1) and
json_object; a tool round trip (call, tool message, final answer), tool_choice required / named / none,
parallel_tool_calls false, calls streamed as OpenAI streams them; Ollama's format and tools; constrained rows
batched with plain ones leave the plain ones as they are alone; every bad input a 400, the server unharmed."""

import json
import threading

import httpx
import jsonschema
import ollama
import openai
import pytest

from schemas import NESTED, SCHEMAS
from server_util import serve
from structured_util import structured_checkpoint
from mlxgemma.server.tools import Tools, read_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "a + b",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = serve(structured_checkpoint("gemma3", tmp_path_factory.mktemp("st") / "m"), "--max-tokens", "120")
    yield s
    s.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(server, text="What is the weather in Paris?", **kw):
    return client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": text}], **kw)


def _valid(text, schema):
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(json.loads(text))


def _format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_response_format_json_schema(server):
    for schema in (SCHEMAS[15], SCHEMAS[20], NESTED):
        r = ask(server, response_format=_format(schema), max_tokens=400)
        assert r.choices[0].finish_reason == "stop"
        _valid(r.choices[0].message.content, schema)
    r = ask(server, response_format=_format(SCHEMAS[12]), n=3, temperature=1.0, seed=4)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        _valid(choice.message.content, SCHEMAS[12])
    assert len({c.message.content for c in r.choices}) > 1  # each choice its own grammar state
    obj = ask(server, response_format={"type": "json_object"}, max_tokens=120, temperature=0.7, seed=1)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_response_format_streamed(server):
    stream = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], response_format=_format(NESTED), stream=True,
        max_tokens=400, temperature=0.8, seed=3)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    _valid(text, NESTED)


def test_constrained_rows_leave_plain_rows_alone(server):
    """A plain request's output batched next to constrained ones equals its output alone."""
    alone = ask(server, "t9 t10", max_tokens=30).choices[0].message.content
    out = {}

    def run(key, **kw):
        out[key] = ask(server, "t9 t10", max_tokens=30, **kw).choices[0].message.content

    threads = [threading.Thread(target=run, args=("plain",))] + [
        threading.Thread(target=run, args=(i,), kwargs=dict(response_format=_format(SCHEMAS[i]))) for i in (0, 13, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out["plain"] == alone
    for i in (0, 13, 16):
        _valid(out[i], SCHEMAS[i])


def _check_calls(message, names=None):
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_tool_round_trip(server):
    c = client(server)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = c.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required")
    assert first.choices[0].finish_reason == "tool_calls"
    _check_calls(first.choices[0].message)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    final = c.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)
    # the same conversation through auto: either text or calls that parse
    again = c.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=60, temperature=1.0,
                                      seed=2)
    if again.choices[0].finish_reason == "tool_calls":
        _check_calls(again.choices[0].message)
    else:
        assert not (again.choices[0].message.content or "").startswith("{")


def test_tool_choice_named_and_single(server):
    r = ask(server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0,
            seed=5)
    _check_calls(r.choices[0].message, names={"add"})
    assert len(r.choices[0].message.tool_calls) == 1
    for seed in range(3):
        r = ask(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.5, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1


def test_tool_calls_streamed(server):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.2, seed=9)
    whole = ask(server, **kw).choices[0].message
    stream = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}], stream=True, **kw)
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": None, "arguments": "", "id": None})
            entry["id"] = d.id or entry["id"]
            entry["name"] = (d.function.name if d.function and d.function.name else entry["name"])
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_ollama_format_and_tools(server):
    o = ollama.Client(host=server.url)
    r = o.chat(model="m", messages=[{"role": "user", "content": "hi"}], format=SCHEMAS[23])
    assert r.done_reason == "stop"
    _valid(r.message.content, SCHEMAS[23])
    g = o.generate(model="m", prompt="hi", format="json", options={"temperature": 0.5, "seed": 2, "num_predict": 120})
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)
    parts = list(o.chat(model="m", messages=[{"role": "user", "content": "hi"}], format=SCHEMAS[20], stream=True,
                        options={"num_predict": 400}))
    assert parts[-1].done_reason == "stop"
    _valid("".join(p.message.content for p in parts), SCHEMAS[20])
    for stream in (False, True):  # a random model under "auto" answers in text
        out = o.chat(model="m", messages=[{"role": "user", "content": "Add 2 and 3"}], tools=[ADD, WEATHER],
                     options={"temperature": 1.0, "seed": 11, "num_predict": 20}, stream=stream)
        last = list(out)[-1] if stream else out
        assert last.done_reason == "length" and not last.message.tool_calls


def test_ollama_tool_calls(server, monkeypatch):
    """Ollama has no tool_choice: with the call forced (as "required" would), its answer's tool_calls carry
    the arguments as an object, whole and streamed alike. (The ollama client sends a parameter's type, enum
    and description only: bounds never reach the server, so the arguments are checked against those.)"""
    from mlxgemma.server import ollama_api, tools

    def forced(*args, **kw):
        return dataclasses.replace(tools.parse_tools(*args, **kw), choice="required", parallel=False)

    import dataclasses

    monkeypatch.setattr(ollama_api, "parse_tools", forced)
    o = ollama.Client(host=server.url)
    got = []
    for stream in (False, True):
        out = o.chat(model="m", messages=[{"role": "user", "content": "Add 2 and 3"}], tools=[ADD, WEATHER],
                     options={"temperature": 1.0, "seed": 11}, stream=stream)
        parts = list(out) if stream else [out]
        assert parts[-1].done_reason == "stop" and parts[-1].message.tool_calls
        assert all(not p.message.content for p in parts)  # a call is not streamed as text
        calls = [(c.function.name, dict(c.function.arguments)) for c in parts[-1].message.tool_calls]
        for name, arguments in calls:
            props = {k: {f: v[f] for f in ("type", "enum") if f in v} for k, v in SCHEMA_OF[name]["properties"].items()}
            jsonschema.validate(arguments, dict(SCHEMA_OF[name], properties=props))
        got.append(calls)
    assert got[0] == got[1]


def test_auto_grammar_takes_text_or_calls(server):
    """Under "auto" the grammar lets the answer be text (not starting with "{") or calls, one per line."""
    from mlxgemma.server.tools import parse_tools

    engine = server.engine
    constraint = engine.constraint(parse_tools(TOOLS, "auto", True, "").grammar())
    calls = '{"name":"add","parameters":{"a":1,"b":2}}\n{"name":"get_weather","parameters":{"city":"Oslo","unit":"C"}}'
    for text, ok in (("It is sunny.", True), (calls, True), ("", True), ('{"name":"add","parameters":{"a":1}}', False),
                     ('{"name":"nope","parameters":{}}', False), ('{"name":"add", "parameters":{"a":1,"b":2}}', False)):
        c = constraint.copy()
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        done = c.matcher.try_consume_tokens(ids) == len(ids) and c.accepting
        assert done == ok, text


BAD = [
    ({"response_format": _format({"type": "integer", "minimum": 3, "maximum": 1})}, "Unsatisfiable"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "xml"}}, "json_schema"),
    ({"tools": [dict(WEATHER, function=dict(WEATHER["function"], parameters={"type": "object", "properties": {
        "a": {"type": "foo"}}}))]}, "get_weather"),
    ({"tools": [dict(ADD, function=dict(ADD["function"], parameters={"type": "array"}))]}, "type object"),
    ({"tools": [ADD, ADD]}, "two functions"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "letters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "response_format": _format(SCHEMAS[0])}, "cannot be combined"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "must answer an earlier tool call"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_requests(server, extra, message):
    body = dict({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, **extra)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_ollama_bad_format(server):
    for fmt, message in ((3, "format must be"), ({"type": "integer", "minimum": 3, "maximum": 1}, "Unsatisfiable")):
        r = httpx.post(server.url + "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                       "format": fmt, "stream": False}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]


def test_native_calls_parsed():
    """FunctionGemma's calls: strings between <escape> tokens, bare numbers, booleans, nested objects, lists."""
    tools = Tools([], "auto", native=True)
    text = ("Sure.<start_function_call>call:get_weather{city:<escape>Tokyo, Japan<escape>,days:3,"
            "opts:{metric:true,tags:[<escape>a<escape>,2]}}<end_function_call>")
    content, calls = read_calls(text, tools)
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Tokyo, Japan", "days": 3, "opts": {"metric": True, "tags": ["a", 2]}})]
    assert read_calls("no calls here", tools) == ("no calls here", [])


def test_native_template_gets_tools_and_history():
    """A template that takes tools (FunctionGemma's) gets them, the past calls with their arguments as objects
    and the tool results with the function's name, rendered by the template itself."""
    from jinja2 import Template

    from mlxgemma.server.tools import conversation, parse_tools

    template = ("{% for t in tools %}<start_function_declaration>declaration:{{ t.function.name }}"
                "<end_function_declaration>{% endfor %}{% for m in messages %}{% if m.tool_calls %}"
                "{% for c in m.tool_calls %}<start_function_call>call:{{ c.function.name }}{{ c.function.arguments.a }}"
                "<end_function_call>{% endfor %}{% elif m.role == 'tool' %}<start_function_response>response:"
                "{{ m.name }}{{ m.content }}<end_function_response>{% else %}{{ m.content }}{% endif %}{% endfor %}")
    tools = parse_tools(TOOLS, "auto", True, template)
    assert tools.native and tools.grammar() is None
    turns = [{"role": "user", "content": "add"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out, extra = conversation(turns, tools)
    text = Template(template).render(messages=out, **extra)
    assert "declaration:get_weather" in text and "declaration:add" in text
    assert "call:add1<end_function_call>" in text and "response:add3" in text

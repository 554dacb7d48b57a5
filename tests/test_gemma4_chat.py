"""Gemma 4 as users chat with it, through the server: prompts rendered as transformers renders Google's template
(tools, tool results, thinking on/off, earlier thoughts), thoughts and native tool calls read back from real
token streams (a tiny Gemma 4 forced to emit them: gemma4_chat_util.force), whole and streamed, in the OpenAI
and Ollama APIs; 30+ adversarial argument values round-tripping exactly; tool_choice; cut calls; bad requests."""

import json

import httpx
import pytest

import gemma4_chat_util as g4
from server_util import serve
from mlxgemma.decode.gemma4_format import format_value
from mlxgemma.server.schemas import ChatRequest, parse
from mlxgemma.server.tools import parse_tools

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
RUN = {"type": "function", "function": {
    "name": "mcp:srv:run", "description": "Run a command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = g4.save(tmp_path_factory.mktemp("g4") / "ckpt")
    s = serve(path)
    yield s
    s.stop()


@pytest.fixture
def forced(served):
    """force(text) -> the Forced constraints of the requests that follow (each must keep refused empty)."""
    log = []
    yield lambda text, **kw: (g4.force(served.engine, text, log=log, **kw), log)[1]
    g4.unforce(served.engine)


def post(served, path, body):
    return httpx.post(served.url + path, json=body, timeout=120)


def chat(served, body):
    r = post(served, "/v1/chat/completions", dict({"max_tokens": 300}, **body))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def stream_chat(served, body):
    """(message assembled from the stream's deltas, finish_reason, the deltas)."""
    deltas, finish = [], None
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=dict({"max_tokens": 300, "stream": True},
                                                                              **body), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["delta"])
                finish = choice["finish_reason"] or finish
    message = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": []}
    for d in deltas:
        for key in ("content", "reasoning_content", "reasoning"):
            message[key] += d.get(key) or ""
        for call in d.get("tool_calls") or []:
            if "id" in call:
                message["tool_calls"].append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
            message["tool_calls"][call["index"]]["arguments"] += call["function"].get("arguments") or ""
    return message, finish, deltas


# Prompts: the server's render of OpenAI-shaped conversations == transformers' render of the same conversation


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
CALL_DICT = dict(CALL, function={"name": "get_weather", "arguments": {"city": "Paris", "days": 2}})
NS_CALL = {"id": "c2", "type": "function", "function": {"name": "mcp:srv:run",
                                                       "arguments": json.dumps({"cmd": 'echo "hi" `ls` {a}\nb'})}}
CORPUS = [
    ("user", [{"role": "user", "content": "Hi"}], None, {}),
    ("thinking", [{"role": "user", "content": "Hi"}], None, {"enable_thinking": True}),
    ("system+tools", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
     [WEATHER, RUN], {}),
    ("tool round trip", [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 15}'}], [WEATHER], {}),
    ("thinking round trip", [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": "", "reasoning_content": "Need weather.",
                              "tool_calls": [CALL]},
                             {"role": "tool", "tool_call_id": "c1", "content": "15C"}], [WEATHER],
     {"enable_thinking": True}),
    ("earlier thoughts dropped", [{"role": "user", "content": "Weather in Paris?"},
                                  {"role": "assistant", "content": "", "reasoning_content": "Need weather.",
                                   "tool_calls": [CALL]},
                                  {"role": "tool", "tool_call_id": "c1", "content": "15C"},
                                  {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>It is 15C."},
                                  {"role": "user", "content": "Thanks"}], [WEATHER], {"enable_thinking": True}),
    ("parallel calls", [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None, "tool_calls": [CALL, NS_CALL]},
                        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                        {"role": "tool", "tool_call_id": "c2", "content": "r2"}], [WEATHER, RUN], {}),
    ("pending call", [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
     [WEATHER], {}),
    ("multi-turn", [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "  c  "}], None,
     {"enable_thinking": False}),
]


def _reference(messages):
    """The conversation as the template takes it: arguments as mappings (OpenAI clients send JSON strings),
    reasoning_content as reasoning."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                               for c in m["tool_calls"]]
        if "reasoning_content" in m:
            m["reasoning"] = m.pop("reasoning_content")
        out.append(m)
    return out


@pytest.mark.parametrize("name,messages,tools,kwargs", CORPUS, ids=[c[0] for c in CORPUS])
def test_prompt_is_transformers_render(served, name, messages, tools, kwargs):
    engine = served.engine
    req = parse(ChatRequest, {"messages": messages, "tools": tools, "chat_template_kwargs": kwargs or None})
    parsed = parse_tools(req.tools, None, None, engine.tokenizer.chat_template)
    prompt = engine.chat(req.messages, parsed, engine.template_kwargs(req.chat_template_kwargs, None))
    expected = g4.hf_render(_reference(messages), tools, **kwargs)
    assert engine.tokenizer.decode(prompt.ids) == expected
    assert prompt.ids == g4.tokenizer().encode(expected, add_special_tokens=False)
    assert prompt.in_thought == expected.endswith("<|channel>thought\n")


def test_switches_reach_the_template(served):
    engine = served.engine
    req = parse(ChatRequest, {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "low"})
    on = engine.tokenizer.decode(engine.chat(req.messages, None, engine.template_kwargs(None, req.think)).ids)
    assert on == g4.hf_render([{"role": "user", "content": "Hi"}], enable_thinking=True)
    off = engine.tokenizer.decode(engine.chat(req.messages, None, engine.template_kwargs(
        {"enable_thinking": True}, False)).ids)  # the switch wins over the kwargs
    assert off == g4.hf_render([{"role": "user", "content": "Hi"}], enable_thinking=False)


# Output: thoughts, text and calls read back from real token streams


THOUGHT_AND_CALL = ('<|channel>thought\nThe user wants "weather".\nSo: call.\n<channel|>Let me check. '
                    '<|tool_call>call:get_weather{city:<|"|>Paris, "FR"<|"|>,days:3}<tool_call|>')


def test_thought_and_call_whole_and_streamed(served, forced):
    log = forced(THOUGHT_AND_CALL)
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
            "chat_template_kwargs": {"enable_thinking": True}}
    whole = chat(served, body)
    msg = whole["message"]
    assert whole["finish_reason"] == "tool_calls"
    assert msg["reasoning_content"] == msg["reasoning"] == 'The user wants "weather".\nSo: call.'
    assert msg["content"] == "Let me check. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("get_weather", {"city": 'Paris, "FR"', "days": 3})]
    streamed, finish, deltas = stream_chat(served, body)
    assert finish == "tool_calls"
    assert streamed["reasoning_content"] == streamed["reasoning"] == msg["reasoning_content"]
    assert streamed["content"] == msg["content"]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"]] == [
        ("get_weather", {"city": 'Paris, "FR"', "days": 3})]
    assert sum(1 for d in deltas if d.get("tool_calls")) == 1  # one delta per call, whole
    assert not any(f.refused for f in log)  # every forced token was one the tool grammar allowed
    for text in (msg["content"], streamed["content"]):
        assert "<|" not in text and "|>" not in text and "thought" not in text


def test_ollama_thinking_and_calls(served, forced):
    forced(THOUGHT_AND_CALL)
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER], "think": True,
            "options": {"num_predict": 300}}
    r = post(served, "/api/chat", dict(body, stream=False)).json()
    assert r["message"]["thinking"] == 'The user wants "weather".\nSo: call.'
    assert r["message"]["content"] == "Let me check. "
    assert r["message"]["tool_calls"] == [{"function": {"name": "get_weather",
                                                        "arguments": {"city": 'Paris, "FR"', "days": 3}}}]
    lines = [json.loads(x) for x in post(served, "/api/chat", dict(body, stream=True)).text.splitlines()]
    assert "".join(x["message"].get("thinking", "") for x in lines) == r["message"]["thinking"]
    assert "".join(x["message"]["content"] for x in lines) == r["message"]["content"]
    assert lines[-1]["done"] and lines[-1]["message"]["tool_calls"] == r["message"]["tool_calls"]


def test_thoughts_hidden_when_thinking_is_off(served, forced):
    forced("<|channel>thought\nsecret plan<channel|>The answer.", end=g4.TURN_END)
    msg = chat(served, {"messages": [{"role": "user", "content": "Hi"}]})["message"]
    assert msg["content"] == "The answer." and "reasoning_content" not in msg
    streamed, finish, _ = stream_chat(served, {"messages": [{"role": "user", "content": "Hi"}]})
    assert streamed["content"] == "The answer." and not streamed["reasoning"] and finish == "stop"


def test_after_tool_results_the_output_starts_in_thought(served, forced):
    forced("weather known\n<channel|>It is 15C.", end=g4.TURN_END)
    messages = CORPUS[4][1]
    msg = chat(served, {"messages": messages, "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": True}})
    assert msg["message"]["reasoning_content"] == "weather known"
    assert msg["message"]["content"] == "It is 15C." and msg["finish_reason"] == "stop"


def test_several_calls_and_a_namespaced_name(served, forced):
    log = forced('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
                 '<|tool_call>call:mcp:srv:run{cmd:<|"|>ls -la | grep "x"<|"|>}<tool_call|>')
    choice = chat(served, {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, RUN]})
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]]
    assert calls == [("get_weather", {"city": "Oslo"}), ("mcp:srv:run", {"cmd": 'ls -la | grep "x"'})]
    assert len({c["id"] for c in choice["message"]["tool_calls"]}) == 2 and not any(f.refused for f in log)


def test_a_call_cut_by_max_tokens_is_length(served, forced):
    forced('Checking. <|tool_call>call:get_weather{city:<|"|>Paris, France and more<|"|>}<tool_call|>')
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "max_tokens": 30}
    choice = chat(served, body)
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "Checking. "
    streamed, finish, _ = stream_chat(served, body)
    assert finish == "length" and streamed["tool_calls"] == [] and streamed["content"] == "Checking. "
    r = post(served, "/api/chat", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], "stream": False,
                                   "options": {"num_predict": 30}}).json()
    assert r["done_reason"] == "length" and "tool_calls" not in r["message"]


def test_tool_choice(served, forced):
    engine = served.engine
    messages = [{"role": "user", "content": "x"}]
    log = forced("Just text.", end=g4.TURN_END)
    required = chat(served, {"messages": messages, "tools": [WEATHER], "tool_choice": "required"})
    assert log[-1].refused  # under "required" the grammar refuses text first
    auto = chat(served, {"messages": messages, "tools": [WEATHER]})
    assert not log[-1].refused and auto["message"]["content"] == "Just text." and auto["finish_reason"] == "stop"
    named = {"type": "function", "function": {"name": "mcp:srv:run"}}
    forced('<|tool_call>call:get_weather{city:<|"|>x<|"|>}<tool_call|>')
    chat(served, {"messages": messages, "tools": [WEATHER, RUN], "tool_choice": named})
    assert log[-1].refused  # another function than the one named
    none = parse(ChatRequest, {"messages": messages, "tools": [WEATHER], "tool_choice": "none"})
    tools = parse_tools(none.tools, none.tool_choice, None, engine.tokenizer.chat_template)
    assert engine.tokenizer.decode(engine.chat(none.messages, tools).ids) == g4.hf_render(messages)
    assert tools.grammar() is None
    assert required["finish_reason"] == "tool_calls" or log[0].refused


# 30+ adversarial values, each through a call and back


ADVERSARIAL = [
    "", " ", "plain", 'double "quotes"', "single 'quotes'", "back`ticks` and ```fences```", "{braces}", "}", "{",
    "[brackets]", "a,b,c", "key:value", "x=1", "new\nlines\n", "\ttab", "back\\slash \\n", "trailing space ",
    "null", "true", "123", "-1.5", "日本語のテキスト", "emoji 😀🎉", "עברית", "call:f{x:1}", "<html><b>x</b></html>",
    "%s %d {0}", "a" * 300, 0, -1, 3.25, -0.001, 1e-07, 2**53, 10**20, 1.5e300, True, False, None,
    {"nested": {"k": ["a", 1, None]}}, [], {}, [[1, 2], [3, [4]]], ["x", 'y"', "z`"], {"a b": 1, "c-d": "e"},
]


def _schema(value):
    if isinstance(value, bool):
        return {"type": "boolean"}
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    if any(" " in k for k in value):  # (a key with a space is no identifier a schema declares: any object)
        return {"type": "object"}
    return {"type": "object", "properties": {k: {} for k in value}, "required": list(value)}


def test_adversarial_arguments_round_trip(served, forced):
    assert len(ADVERSARIAL) >= 30
    args = {f"k{i:02d}": v for i, v in enumerate(ADVERSARIAL)}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {k: _schema(v) for k, v in args.items()}, "required": list(args)}}}
    log = forced("<|tool_call>call:f" + format_value(args) + "<tool_call|>")
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "max_tokens": 2000}
    choice = chat(served, body)
    got = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert {k: (got.get(k), v) for k, v in args.items() if got.get(k) != v} == {}
    assert got == args and choice["finish_reason"] == "tool_calls"
    streamed, _, _ = stream_chat(served, body)
    assert json.loads(streamed["tool_calls"][0]["arguments"]) == args
    refused = [(at, served.engine.tokenizer.decode(f.tokens[max(0, at - 20):at + 1])) for f in log for at, _ in f.refused]
    assert refused == []


@pytest.mark.parametrize("value", ADVERSARIAL[:12] + ADVERSARIAL[24:30], ids=str)
def test_each_value_alone(served, forced, value):
    tool = {"type": "function", "function": {"name": "ns:tool-1.v2", "parameters": {
        "type": "object", "properties": {"v": _schema(value)}, "required": ["v"]}}}
    forced("<|tool_call>call:ns:tool-1.v2" + format_value({"v": value}) + "<tool_call|>")
    choice = chat(served, {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "max_tokens": 600})
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"v": value}


# Bad requests: one clear line each


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}]},
     "matches none"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "not JSON"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "bad{name"}}]}, "name"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking_budget": -1}, "thinking_budget"),
])
def test_bad_requests(served, body, needle):
    r = post(served, "/v1/chat/completions", body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
    assert "\n" not in r.json()["error"]["message"]


def test_thinking_on_a_model_without_the_switch(tmp_path):
    from server_util import chat_checkpoint

    s = serve(chat_checkpoint("gemma3", tmp_path / "g3"))
    try:
        for path, body in [("/v1/chat/completions", {"reasoning_effort": "high"}),
                           ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": True}}),
                           ("/api/chat", {"think": True, "stream": False})]:
            r = post(s, path, dict(body, messages=[{"role": "user", "content": "t9"}]))
            error = r.json()["error"]
            assert r.status_code == 400 and "no thinking switch" in (error if isinstance(error, str) else error["message"])
        ok = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "t9"}], "max_tokens": 2,
                                              "reasoning_effort": "none"})
        assert ok.status_code == 200  # asking not to think is nothing to do
    finally:
        s.stop()


def test_thinking_budget_wraps_the_constraint(served):
    from mlxgemma.decode.thinking import ThinkingBudget

    engine = served.engine
    req = parse(ChatRequest, {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high",
                              "thinking_budget": 2})
    prompt = engine.chat(req.messages, None, engine.template_kwargs(None, req.think))
    budget = engine.structured(None, None, prompt, req.thinking_budget)
    assert isinstance(budget, ThinkingBudget) and budget.inner is None
    ids = engine.tokenizer.encode("<|channel>thought\nab", add_special_tokens=False)
    for t in ids:
        budget.mask()
        assert budget.allows(t)
        budget.consume(t)
    mask = budget.mask()
    allowed = [t for t in range(g4.VOCAB_SIZE) if budget.allows(t, mask)]
    assert allowed == [g4.CHANNEL_CLOSE]  # two tokens of thought ("ab") after the label: only the close now
    budget.consume(g4.CHANNEL_CLOSE)
    assert budget.allows(engine.tokenizer.encode("x", add_special_tokens=False)[0], budget.mask())


# The real clients


def test_openai_client(served, forced):
    from openai import OpenAI

    log = forced(THOUGHT_AND_CALL)
    client = OpenAI(base_url=served.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="g4", messages=messages, tools=[WEATHER], max_tokens=300,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == 'The user wants "weather".\nSo: call.'
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": 'Paris, "FR"', "days": 3})
    # The call goes back with its result; the next prompt is transformers' render of the same conversation.
    forced("known\n<channel|>It is sunny.", end=g4.TURN_END)  # (thinking on: the prompt opened the thought)
    seen = []
    original = served.engine.request
    served.engine.request = lambda prompt, **kw: (seen.append(prompt.ids), original(prompt, **kw))[1]
    try:
        history = messages + [choice.message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        stream = client.chat.completions.create(model="g4", messages=history, tools=[WEATHER], stream=True,
                                                max_tokens=300, reasoning_effort="medium")
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        del served.engine.request
    assert text == "It is sunny."
    reference = [messages[0], {"role": "assistant", "content": "Let me check. ", "reasoning": choice.message.model_extra[
        "reasoning"], "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": 'Paris, "FR"', "days": 3}}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert served.engine.tokenizer.decode(seen[0]) == g4.hf_render(reference, [WEATHER], enable_thinking=True)
    assert not any(f.refused for f in log)


def test_ollama_client(served, forced):
    import ollama

    forced(THOUGHT_AND_CALL)
    client = ollama.Client(host=served.url)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat(model="g4", messages=messages, tools=[WEATHER], think=True, options={"num_predict": 300})
    assert reply.message.thinking == 'The user wants "weather".\nSo: call.'
    assert reply.message.content == "Let me check. "
    call = reply.message.tool_calls[0].function
    assert (call.name, dict(call.arguments)) == ("get_weather", {"city": 'Paris, "FR"', "days": 3})
    forced("Sunny.", end=g4.TURN_END)
    history = messages + [{"role": "assistant", "content": reply.message.content, "thinking": reply.message.thinking,
                           "tool_calls": [{"function": {"name": call.name, "arguments": dict(call.arguments)}}]},
                          {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    parts = list(client.chat(model="g4", messages=history, tools=[WEATHER], stream=True, think=False,
                             options={"num_predict": 50}))
    assert "".join(p.message.content for p in parts) == "Sunny." and parts[-1].done_reason == "stop"


@pytest.mark.parametrize("argv,needle", [
    (["--chat-template-args", "{bad"], "--chat-template-args is not JSON"),
    (["--chat-template-args", "[1]"], "must be a JSON object"),
    (["--max-thinking-tokens", "-1"], "--max-thinking-tokens must be >= 0"),
])
def test_server_thinking_options_checked_before_loading(argv, needle):
    from mlxgemma.errors import MlxGemmaError
    from mlxgemma.server.__main__ import check_args, configure_parser

    with pytest.raises(MlxGemmaError, match=needle):
        check_args(configure_parser().parse_args(argv))


def test_server_thinking_defaults(served, tmp_path):
    from mlxgemma.errors import MlxGemmaError
    from server_util import chat_checkpoint

    path = served.engine.source
    on = serve(path, "--think", "--max-thinking-tokens", "5")
    try:
        assert on.engine.template_kwargs() == {"enable_thinking": True} and on.engine.max_thinking_tokens == 5
        assert on.engine.template_kwargs(None, False) == {"enable_thinking": False}  # a request says otherwise
    finally:
        on.stop()
    gemma3 = chat_checkpoint("gemma3", tmp_path / "g3")
    for argv, needle in [(["--think"], "no thinking switch"), (["--max-thinking-tokens", "5"], "thought channel")]:
        with pytest.raises(MlxGemmaError, match=needle):
            serve(gemma3, *argv)

"""The Responses API (/v1/responses) and the Anthropic Messages API (/v1/messages), driven live with the real
openai and anthropic clients: a tiny Gemma 4 checkpoint with Gemma 4's chat template (tests/gemma4_chat_util.py)
made to write scripted answers, so that thoughts and tool calls come back on real token streams. Text, thoughts
and calls whole and streamed; a tool round trip whose prompt is transformers' render of the same conversation;
a stored conversation continued; a cut at max tokens; count_tokens; x-api-key; every bad input a clear 4xx."""

import json

import anthropic
import httpx
import openai
import pytest

import gemma4_chat_util as g4
from mlxgemma.server.responses_api import Responses
from server_util import chat_checkpoint, serve

KEY = "sekrit"
CALL = '<|channel>thought\nplan\n<channel|>Hi <|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMS}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
CLAUDE_TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": PARAMS}]
USER = {"role": "user", "content": "weather in Paris?"}
# After tool results with thinking on, the template's generation prompt opens the thought: the model closes it.
AFTER_RESULT = "sunny, so say it\n<channel|>It is sunny."


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    served = serve(g4.save(tmp_path_factory.mktemp("gemma4") / "ckpt"), "--max-tokens", "64")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A model without a thinking switch, behind an API key."""
    served = serve(chat_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3") / "ckpt"), "--api-key", KEY)
    yield served
    served.stop()


@pytest.fixture
def script(gemma4):
    """script(text, end) makes the served model write exactly text; the requests' own constraints (the tool
    grammar) must have allowed every token of it."""
    log = []

    def write(text, end=g4.TOOL_RESPONSE):
        return g4.force(gemma4.engine, text, end, log)

    yield write
    g4.unforce(gemma4.engine)
    assert all(not f.refused for f in log)


@pytest.fixture
def prompts(gemma4):
    """The prompt of each request, as the text the model saw."""
    engine, seen = gemma4.engine, []
    real = type(engine).request

    def request(prompt, **kw):
        seen.append(engine.tokenizer.decode(prompt.ids))
        return real(engine, prompt, **kw)

    engine.request = request
    yield seen
    del engine.request


def oai(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def claude(server, key="none"):
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def streamed_response(server, **kw):
    """(the events' types, the text deltas by kind, the final response) of a streamed Responses request (the
    last event's: the SDK's get_final_response() wants response.completed, and a cut ends response.incomplete)."""
    kinds, deltas = [], {}
    with oai(server).responses.stream(model="m", **kw) as stream:
        for e in stream:
            kinds.append(e.type)
            if e.type.endswith(".delta"):
                deltas[e.type] = deltas.get(e.type, "") + e.delta
        return kinds, deltas, e.response


def streamed_message(server, **kw):
    """(the events' types, the deltas by kind, the final message) of a streamed Messages request."""
    kinds, deltas = [], {}
    with claude(server).messages.stream(model="m", **kw) as stream:
        for e in stream:
            kinds.append(e.type)
            if e.type == "content_block_delta":
                d = e.delta
                deltas[d.type] = deltas.get(d.type, "") + (getattr(d, "text", None) or getattr(d, "thinking", None)
                                                          or d.partial_json)
        return kinds, deltas, stream.get_final_message()


# Text


def test_text_whole_and_streamed_as_chat_completions_says(gemma4, script, prompts):
    script("Hello there!", g4.TURN_END)
    system = "Be brief."
    chat = oai(gemma4).chat.completions.create(model="m", messages=[{"role": "system", "content": system}, USER],
                                               max_tokens=20)
    text = chat.choices[0].message.content
    assert text == "Hello there!"
    r = oai(gemma4).responses.create(model="m", instructions=system, input=USER["content"], max_output_tokens=20)
    assert (r.status, r.output_text, [o.type for o in r.output]) == ("completed", text, ["message"])
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    kinds, deltas, final = streamed_response(gemma4, instructions=system, input=[USER], max_output_tokens=20)
    assert deltas["response.output_text.delta"] == final.output_text == text
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    m = claude(gemma4).messages.create(model="m", system=system, messages=[USER], max_tokens=20)
    assert ([b.type for b in m.content], m.content[0].text, m.stop_reason) == (["text"], text, "end_turn")
    assert (m.usage.input_tokens, m.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    kinds, deltas, final = streamed_message(gemma4, system=[{"type": "text", "text": system}], messages=[USER],
                                            max_tokens=20)
    assert deltas["text_delta"] == final.content[0].text == text and final.stop_reason == "end_turn"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert len(set(prompts)) == 1  # every API put the same conversation to the model


def test_stop_sequence_and_json_format(gemma4, script):
    script("Hello there!", g4.TURN_END)
    m = claude(gemma4).messages.create(model="m", messages=[USER], max_tokens=20, stop_sequences=["the"])
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("Hello ", "stop_sequence", "the")
    script('{"city":"Paris"}', g4.TURN_END)  # (the JSON grammar is compact)
    r = oai(gemma4).responses.create(model="m", input=[USER], max_output_tokens=30, text={
        "format": {"type": "json_schema", "name": "place", "schema": PARAMS}})
    assert json.loads(r.output_text) == {"city": "Paris"} and r.text.format.type == "json_schema"


# Thoughts


def test_thoughts_are_a_reasoning_item_and_a_thinking_block(gemma4, script):
    script("<|channel>thought\nplan\n<channel|>Sure.", g4.TURN_END)
    r = oai(gemma4).responses.create(model="m", input=[USER], reasoning={"effort": "high"}, max_output_tokens=30)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "plan" and r.output_text == "Sure."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    kinds, deltas, final = streamed_response(gemma4, input=[USER], reasoning={"effort": "high"}, max_output_tokens=30)
    assert deltas["response.reasoning_text.delta"] == final.output[0].content[0].text == "plan"
    assert "response.reasoning_text.done" in kinds and final.output_text == "Sure."
    m = claude(gemma4).messages.create(model="m", messages=[USER], max_tokens=30,
                                       thinking={"type": "enabled", "budget_tokens": 16})
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in m.content] == [("thinking", "plan"),
                                                                                    ("text", "Sure.")]
    kinds, deltas, final = streamed_message(gemma4, messages=[USER], max_tokens=30,
                                            thinking={"type": "enabled", "budget_tokens": 16})
    assert (deltas["thinking_delta"], deltas["text_delta"]) == ("plan", "Sure.")
    assert [b.type for b in final.content] == ["thinking", "text"]


# Tool calls


def test_calls_are_function_call_items_and_tool_use_blocks(gemma4, script):
    script(CALL)
    r = oai(gemma4).responses.create(model="m", input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                     max_output_tokens=60)
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    call = r.output[2]
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.output_text == "Hi "
    kinds, deltas, final = streamed_response(gemma4, input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                             max_output_tokens=60)
    assert deltas["response.function_call_arguments.delta"] == final.output[2].arguments
    assert json.loads(final.output[2].arguments) == {"city": "Paris"}
    assert "response.function_call_arguments.done" in kinds
    m = claude(gemma4).messages.create(model="m", messages=[USER], tools=CLAUDE_TOOLS, max_tokens=60,
                                       thinking={"type": "enabled", "budget_tokens": 16})
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"] and m.stop_reason == "tool_use"
    use = m.content[2]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"}) and use.id.startswith("toolu_")
    kinds, deltas, final = streamed_message(gemma4, messages=[USER], tools=CLAUDE_TOOLS, max_tokens=60,
                                            thinking={"type": "enabled", "budget_tokens": 16})
    assert json.loads(deltas["input_json_delta"]) == final.content[2].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    script(CALL[CALL.index("<|tool_call>"):])  # a call forced: nothing before it
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        m = claude(gemma4).messages.create(model="m", messages=[USER], tools=CLAUDE_TOOLS, max_tokens=60,
                                           tool_choice=choice)
        assert [(b.type, b.input) for b in m.content] == [("tool_use", {"city": "Paris"})]


def _rendered(call_id, *more):
    """transformers' render of the round trip (and `more` messages) as a Chat Completions conversation."""
    turn = {"role": "assistant", "content": "Hi ", "reasoning": "plan", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    messages = [USER, turn, {"role": "tool", "tool_call_id": call_id, "content": "sunny"}, *more]
    return g4.hf_render(messages, CHAT_TOOLS, enable_thinking=True)


def test_round_trip_prompt_is_the_template_s(gemma4, script, prompts):
    script(CALL)
    r = oai(gemma4).responses.create(model="m", input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                     max_output_tokens=60)
    call = r.output[2]
    script(AFTER_RESULT, g4.TURN_END)
    back = [USER] + [o.model_dump(exclude_none=True) for o in r.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = oai(gemma4).responses.create(model="m", input=back, tools=TOOLS, reasoning={"effort": "high"},
                                      max_output_tokens=80)
    assert r2.output_text == "It is sunny." and prompts[-1] == _rendered(call.call_id)

    script(CALL)
    thinking = {"type": "enabled", "budget_tokens": 16}
    m = claude(gemma4).messages.create(model="m", messages=[USER], tools=CLAUDE_TOOLS, max_tokens=60,
                                       thinking=thinking)
    script(AFTER_RESULT, g4.TURN_END)
    use = m.content[2]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                           "content": [{"type": "text", "text": "sunny"}]}]}
    m2 = claude(gemma4).messages.create(model="m", tools=CLAUDE_TOOLS, max_tokens=80, thinking=thinking, messages=[
        USER, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]}, result])
    assert [b.type for b in m2.content] == ["thinking", "text"] and m2.content[0].thinking == "sunny, so say it"
    assert m2.content[1].text == "It is sunny." and m2.stop_reason == "end_turn"
    assert prompts[-1] == _rendered(use.id)


def test_a_stored_response_continues(gemma4, script, prompts):
    script(CALL)
    first = oai(gemma4).responses.create(model="m", input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                         max_output_tokens=60)
    call = first.output[2]
    assert oai(gemma4).responses.retrieve(first.id).output[2].call_id == call.call_id
    script(AFTER_RESULT, g4.TURN_END)
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    _, _, then = streamed_response(gemma4, previous_response_id=first.id, input=[output], tools=TOOLS,
                                   reasoning={"effort": "high"}, max_output_tokens=80)
    assert then.output_text == "It is sunny." and then.previous_response_id == first.id
    assert prompts[-1] == _rendered(call.call_id)
    script("Yes.", g4.TURN_END)
    third = oai(gemma4).responses.create(model="m", previous_response_id=then.id, input="sure?", store=False,
                                         reasoning={"effort": "high"}, tools=TOOLS, max_output_tokens=80)
    assert third.output_text == "Yes." and prompts[-1] == _rendered(
        call.call_id, {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "sure?"})
    oai(gemma4).responses.delete(first.id)
    for gone in (first.id, third.id):  # deleted; never stored
        with pytest.raises(openai.NotFoundError):
            oai(gemma4).responses.retrieve(gone)


# Limits


def test_a_cut_is_incomplete_and_never_half_a_call(gemma4, script):
    ids = script(CALL)
    cut = ids.index(g4.SPECIALS["<|tool_call>"]) + 5  # inside the call
    r = oai(gemma4).responses.create(model="m", input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                     max_output_tokens=cut)
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.usage.output_tokens == cut
    kinds, _, final = streamed_response(gemma4, input=[USER], tools=TOOLS, reasoning={"effort": "high"},
                                        max_output_tokens=cut)
    assert kinds[-1] == "response.incomplete" and "response.function_call_arguments.delta" not in kinds
    m = claude(gemma4).messages.create(model="m", messages=[USER], tools=CLAUDE_TOOLS, max_tokens=cut,
                                       thinking={"type": "enabled", "budget_tokens": 16})
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["thinking", "text"]
    _, deltas, final = streamed_message(gemma4, messages=[USER], tools=CLAUDE_TOOLS, max_tokens=cut,
                                        thinking={"type": "enabled", "budget_tokens": 16})
    assert final.stop_reason == "max_tokens" and "input_json_delta" not in deltas
    script("Hello there!", g4.TURN_END)
    r = oai(gemma4).responses.create(model="m", input=[USER], max_output_tokens=3)
    assert (r.status, r.output_text, r.output[0].status) == ("incomplete", "Hel", "incomplete")


def test_count_tokens_is_the_prompt_s_length(gemma4, script, prompts):
    script("Hello there!", g4.TURN_END)
    kw = dict(model="m", system="Be brief.", messages=[USER], tools=CLAUDE_TOOLS)
    counted = claude(gemma4).messages.count_tokens(**kw).input_tokens
    m = claude(gemma4).messages.create(max_tokens=20, **kw)
    assert counted == m.usage.input_tokens == len(gemma4.engine.tokenizer.encode(prompts[-1],
                                                                                   add_special_tokens=False))


def test_the_store_keeps_the_last_used_within_its_bounds():
    store = Responses(size=2, limit=10**6)
    for i in range(3):
        store._store({"id": f"resp_{i}"}, [USER])
        if i == 1:
            store._get("resp_0")  # used: kept over resp_1
    assert list(store.stored) == ["resp_0", "resp_2"]
    store._store({"id": "resp_big"}, [{"role": "user", "content": "x" * 10**6}])
    assert list(store.stored) == ["resp_big"] and store.bytes == store.stored["resp_big"][2]


# Keys and bad input


def test_x_api_key_and_bearer(gemma3):
    m = claude(gemma3, KEY).messages.create(model="m", messages=[{"role": "user", "content": "t5 t6"}], max_tokens=3)
    assert 0 < m.usage.output_tokens <= 3 and m.content[0].type == "text"  # (a random model: it may end early)
    r = oai(gemma3, KEY).responses.create(model="m", input="t5 t6", max_output_tokens=3)
    assert r.output_text == m.content[0].text  # (the same greedy answer)
    with pytest.raises(anthropic.AuthenticationError):
        claude(gemma3, "wrong").messages.count_tokens(model="m", messages=[{"role": "user", "content": "t5"}])
    with pytest.raises(openai.AuthenticationError):
        oai(gemma3, "wrong").responses.create(model="m", input="t5")


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
def blocks(*content):
    """A Messages request of one user message of these blocks."""
    return {"max_tokens": 5, "messages": [{"role": "user", "content": list(content)}]}


TURN = [{"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
BAD = [  # (name, server, path, body, status, words)
    ("output answering no call", "gemma4", "/v1/responses",
     {"input": [USER, {"type": "function_call_output", "call_id": "call_9", "output": "x"}]}, 400, "call_9"),
    ("unknown item type", "gemma4", "/v1/responses", {"input": [{"type": "wizard"}]}, 400, "unknown item type"),
    ("call without call_id", "gemma4", "/v1/responses",
     {"input": [USER, {"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input[1].call_id"),
    ("arguments not JSON", "gemma4", "/v1/responses",
     {"input": [USER, dict(TURN[0], arguments="{oops")]}, 400, "arguments"),
    ("unknown content part", "gemma4", "/v1/responses",
     {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, "input_file"),
    ("image to a text model", "gemma4", "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + PNG}]}]}, 400, "text-only"),
    ("a hosted tool", "gemma4", "/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400,
     "function tools"),
    ("a hosted tool_choice", "gemma4", "/v1/responses", {"input": "hi", "tools": TOOLS, "tool_choice": {
        "type": "web_search"}}, 400, "tool_choice"),
    ("unknown previous response", "gemma4", "/v1/responses", {"input": "hi", "previous_response_id": "resp_x"},
     404, "resp_x"),
    ("thinking without a switch", "gemma3", "/v1/responses", {"input": "t5", "reasoning": {"effort": "high"}},
     400, "thinking"),
    ("no max_tokens", "gemma4", "/v1/messages", {"messages": [USER]}, 400, "max_tokens"),
    ("result answering no tool_use", "gemma4", "/v1/messages",
     blocks({"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}), 400, "toolu_9"),
    ("url image", "gemma4", "/v1/messages",
     blocks({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}), 400, "never fetches"),
    ("image to a text model", "gemma4", "/v1/messages",
     blocks({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}), 400, "text-only"),
    ("unknown block", "gemma4", "/v1/messages", blocks({"type": "document"}), 400, "document"),
    ("a prefill", "gemma4", "/v1/messages",
     {"max_tokens": 5, "messages": [USER, {"role": "assistant", "content": "Sure"}]}, 400, "prefill"),
    ("thinking without a switch", "gemma3", "/v1/messages",
     dict(blocks({"type": "text", "text": "t5"}), thinking={"type": "enabled", "budget_tokens": 8}), 400, "thinking"),
    ("a tool_use in a tool_result", "gemma4", "/v1/messages", {"max_tokens": 5, "messages": [
        USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "tool_use", "id": "toolu_2", "name": "f", "input": {}}]}]}]}, 400, "tool_result content"),
    ("bad role", "gemma4", "/v1/messages/count_tokens", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("a server tool", "gemma4", "/v1/messages/count_tokens", {"messages": [USER], "tools": [
        {"type": "web_search_20250305", "name": "web_search"}]}, 400, "client tools"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{c[2].split('/')[2]}: {c[0]}" for c in BAD])
def test_bad_input_is_a_clear_4xx(request, case):
    _, name, path, body, status, words = case
    server = request.getfixturevalue(name)
    r = httpx.post(server.url + path, json=dict(body, model="m"), headers={"x-api-key": KEY})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v1/messages"):
        assert r.json()["type"] == "error"
        assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert words in error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]

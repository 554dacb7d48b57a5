"""The Anthropic Messages API: POST /v1/messages (whole, or streamed as server-sent events named as Anthropic's
SDK reads them) and POST /v1/messages/count_tokens; errors in Anthropic's shape ({"type": "error", "error":
{"type", "message"}}, which app.py gives every path under /v1/messages).

The messages become chat messages (schemas.Message) as Chat Completions would send them: tool_use blocks the
assistant turn's tool calls, each tool_result block (inside a user message) a tool message answering its
tool_use, thinking blocks the assistant turn's reasoning; images only inline (base64), never fetched. The answer
(answer.py) comes back as content blocks: thinking, text and tool_use, in the order the model wrote them.
"""

import json
from typing import Any, Dict, List, Literal, Optional, Union

from starlette.responses import JSONResponse, StreamingResponse

from .answer import Turn, answers
from .engine import Engine
from .openai_api import require_chat_template
from .schemas import CountRequest, Message, MessagesRequest, RequestError, Body, parse
from .tools import new_id, parse_tools

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_body(e: RequestError) -> dict:
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


# Blocks


class TextBlock(Body):
    type: Literal["text"]
    text: str


class ImageSource(Body):
    type: str
    media_type: Optional[str] = None
    data: Optional[str] = None


class ImageBlock(Body):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Dict[str, Any]


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, List[Dict[str, Any]], None] = None
    is_error: bool = False


class ThinkingBlock(Body):
    type: Literal["thinking"]
    thinking: str


class RedactedThinkingBlock(Body):
    type: Literal["redacted_thinking"]


BLOCKS = {"user": {"text": TextBlock, "image": ImageBlock, "tool_result": ToolResultBlock},
          "assistant": {"text": TextBlock, "tool_use": ToolUseBlock, "thinking": ThinkingBlock,
                        "redacted_thinking": RedactedThinkingBlock},
          "tool_result": {"text": TextBlock, "image": ImageBlock}}


def _block(raw, within: str, where: str):
    """A block of a user or assistant message, or of a tool_result's content."""
    kinds = BLOCKS[within]
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in kinds:
        raise RequestError(f"{where}: {within} content takes blocks of type {', '.join(kinds)}, not {kind!r}")
    try:
        return parse(kinds[kind], raw)
    except RequestError as e:
        raise RequestError(f"{where}.{e.message}") from None


def _part(block, where: str) -> dict:
    """A text or image block as a schemas.Message part."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    source = block.source
    if source.type != "base64":
        raise RequestError(f"{where}: image sources of type {source.type!r} are not supported: this server never "
                           "fetches; send the image as {\"type\": \"base64\", \"media_type\", \"data\"}")
    if not source.media_type or not source.data:
        raise RequestError(f"{where}: a base64 image source needs media_type and data")
    return {"type": "image_url", "image_url": {"url": f"data:{source.media_type};base64,{source.data}"}}


def _blocks(content) -> list:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _assistant(content, where: str, calls: set) -> Message:
    text, thought, tool_calls = [], "", []
    for j, raw in enumerate(_blocks(content)):
        b = _block(raw, "assistant", f"{where}.content[{j}]")
        if b.type == "text":
            text.append(b.text)
        elif b.type == "thinking":
            thought += b.thinking
        elif b.type == "tool_use":
            calls.add(b.id)
            tool_calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
    return Message(role="assistant", content="".join(text) or None, tool_calls=tool_calls or None,
                   reasoning=thought or None)


def _user(content, where: str, calls: set) -> List[Message]:
    """A user message: each tool_result a tool message, each run of other blocks a user message, in order."""
    out = []  # (Messages made at the end: a Message copies the parts list it is given)
    for j, raw in enumerate(_blocks(content)):
        at = f"{where}.content[{j}]"
        b = _block(raw, "user", at)
        if b.type != "tool_result":
            if not out or out[-1]["role"] != "user":
                out.append({"role": "user", "content": []})
            out[-1]["content"].append(_part(b, at))
            continue
        if b.tool_use_id not in calls:
            raise RequestError(f"{at}: tool_result tool_use_id {b.tool_use_id!r} answers no earlier tool_use")
        result = [_part(_block(r, "tool_result", f"{at}.content[{k}]"), f"{at}.content[{k}]")
                  for k, r in enumerate(_blocks(b.content or ""))]
        if b.is_error:  # (the chat template has no error flag: the model reads it in the text)
            result.insert(0, {"type": "text", "text": "Error: "})
        out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": result})
    return [Message(**m) for m in out or [{"role": "user", "content": ""}]]


def _system(system) -> str:
    if isinstance(system, str):
        return system
    texts = []
    for j, b in enumerate(system):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise RequestError(f'system[{j}] must be a text block ({{"type": "text", "text": ...}})')
        texts.append(b["text"])
    return "\n\n".join(texts)


def to_messages(req: CountRequest) -> List[Message]:
    if req.messages[-1].role == "assistant":
        raise RequestError("the last message must be the user's: continuing an assistant message (a prefill) is "
                           "not supported here")
    out = [Message(role="system", content=_system(req.system))] if req.system else []
    calls = set()
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        out += [_assistant(m.content, where, calls)] if m.role == "assistant" else _user(m.content, where, calls)
    return out


def _tools(tools) -> Optional[List[dict]]:
    """Anthropic's client tools in Chat Completions' shape (what tools.parse_tools reads)."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            kind = t.get("type") if isinstance(t, dict) else None
            raise RequestError(f"tools[{i}]: only client tools ({{name, description, input_schema}}) are supported "
                               f"here, not {kind!r}")
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] needs a name")
        fn = {"name": t["name"], "description": t.get("description") or "",
              "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(choice: Optional[dict]):
    """(Chat Completions' tool_choice, parallel_tool_calls)."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise RequestError('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                       '{"type": "tool", "name": ...}')


def _prompt(engine: Engine, req: CountRequest):
    require_chat_template(engine, "/v1/completions")
    choice, parallel = _tool_choice(req.tool_choice)
    tools = parse_tools(_tools(req.tools), choice, parallel, getattr(engine.tokenizer, "chat_template", None) or "")
    prompt = engine.chat(to_messages(req), tools, engine.template_kwargs(None, req.think))
    return prompt, tools


def _input_tokens(prompt) -> int:
    return len(prompt.encoder["input_ids"][0]) if prompt.encoder is not None else len(prompt.ids)


async def count_tokens(engine: Engine, http_request, body):
    prompt, _ = _prompt(engine, parse(CountRequest, body))
    return JSONResponse({"input_tokens": _input_tokens(prompt)})


async def messages(engine: Engine, http_request, body):
    req = parse(MessagesRequest, body)
    prompt, tools = _prompt(engine, req)
    budget = req.thinking.budget_tokens if req.thinking is not None and req.think else None
    request = engine.request(prompt, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, stop=req.stop_sequences,
                             constraint=engine.structured(None, tools, prompt, budget))
    run = _Run(engine, req, Turn(answers(engine, prompt, tools, 1)[0]), _input_tokens(prompt))
    if req.stream:
        return StreamingResponse(_stream(engine, request, run), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async for kind, data in engine.events(request, http_request):
        run.turn.on(kind, data)
    if run.turn.error:
        raise RequestError(run.turn.error, status=500)
    return JSONResponse(dict(run.head(), content=[run.block(p) for p in run.turn.parts.parts if run.kept(p)],
                             **run.stop(), usage=run.usage()))


def _sse(kind: str, body: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(dict(type=kind, **body), ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, request, run):
    start = dict(run.head(), content=[], stop_reason=None, stop_sequence=None,
                 usage={"input_tokens": run.input_tokens, "output_tokens": 0})
    yield _sse("message_start", {"message": start})
    yield _sse("ping", {})
    async for kind, data in engine.events(request):
        for e in run.turn.on(kind, data):
            yield run.event(e)
        if kind == "error":
            yield _sse("error", error_body(RequestError(data, status=500)))
            return
    yield _sse("message_delta", {"delta": run.stop(), "usage": {"output_tokens": run.turn.count}})
    yield _sse("message_stop", {})


class _Run:
    """One message in the making: the request, its Turn and its prompt's length."""

    def __init__(self, engine: Engine, req: MessagesRequest, turn: Turn, input_tokens: int):
        self.engine, self.req, self.turn, self.input_tokens = engine, req, turn, input_tokens
        self.id = new_id("msg_")

    def head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.engine.name}

    def kept(self, part) -> bool:
        return part.kind != "call" or self.turn.made(part) is not None  # (a call cut off is never sent whole)

    def block(self, part, done: bool = True) -> dict:
        if part.kind == "reasoning":
            return {"type": "thinking", "thinking": part.text if done else "", "signature": ""}
        if part.kind == "content":
            return {"type": "text", "text": part.text if done else ""}
        call = self.turn.made(part) if done else None
        return {"type": "tool_use", "id": "toolu_" + part.call_id.removeprefix("call_"), "name": part.name,
                "input": call.arguments if call is not None else {}}

    def event(self, e: tuple) -> str:
        """A Parts event as Anthropic's stream has it."""
        kind, part = e[0], e[1]
        if kind == "open":
            return _sse("content_block_start", {"index": part.index, "content_block": self.block(part, done=False)})
        if kind == "close":
            return _sse("content_block_stop", {"index": part.index})
        delta = {"reasoning": {"type": "thinking_delta", "thinking": e[2]},
                 "content": {"type": "text_delta", "text": e[2]},
                 "call": {"type": "input_json_delta", "partial_json": e[2]}}[part.kind]
        return _sse("content_block_delta", {"index": part.index, "delta": delta})

    def stop(self) -> dict:
        """stop_reason and stop_sequence. The decoder says "stop" for an eos and for a stop string alike: the
        last token tells them apart, and the text the stop string cut."""
        turn, stops = self.turn, self.req.stop_sequences
        if turn.finish == "tool_calls":
            return {"stop_reason": "tool_use", "stop_sequence": None}
        if turn.finish == "length":
            return {"stop_reason": "max_tokens", "stop_sequence": None}
        tokenizer = self.engine.tokenizer
        if stops and turn.ids and turn.ids[-1] not in set(tokenizer.eos_token_ids):
            text = tokenizer.decode(turn.ids)
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:
                return {"stop_reason": "stop_sequence", "stop_sequence": min(hits)[1]}
        return {"stop_reason": "end_turn", "stop_sequence": None}

    def usage(self) -> dict:
        return {"input_tokens": self.input_tokens, "output_tokens": self.turn.count}

"""The OpenAI Responses API: POST /v1/responses, whole or streamed as typed server-sent events (`event: TYPE`,
a sequence_number on each, no [DONE]), and GET / DELETE /v1/responses/{id}.

The request's input items become chat messages (schemas.Message) for the chat template, as Chat Completions
would send them: a function_call joins the assistant turn before it, a function_call_output becomes a tool
message, a reasoning item becomes the next assistant turn's reasoning. The answer (answer.py) comes back as
output items: a reasoning item, a message item, a function_call item per call, in the order the model wrote
them. Stored responses (store, the default) are kept in memory, the last STORED of them: previous_response_id
continues one, its conversation (input and output items) in front of the new input.
"""

import json
import time
from collections import OrderedDict
from itertools import count
from typing import Any, Dict, List, Literal, Optional, Union

from starlette.responses import JSONResponse, StreamingResponse

from .answer import Turn, answers
from .engine import Engine
from .openai_api import require_chat_template
from .schemas import Message, RequestError, ResponsesRequest, Body, parse
from .tools import new_id, parse_tools

STORED, STORED_BYTES = 256, 256 * 1024 * 1024  # (a conversation may hold images: a bound in bytes too)
ITEM_TYPES = "message, function_call, function_call_output or reasoning"


# Input items


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, List[Dict[str, Any]]]


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, List[Dict[str, Any]]]


class ReasoningItem(Body):
    type: Literal["reasoning"]
    content: Optional[List[Dict[str, Any]]] = None
    summary: Optional[List[Dict[str, Any]]] = None


ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem,
         "reasoning": ReasoningItem}


def _item(raw, where: str):
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", param="input")
    kind = raw.get("type", "message" if "role" in raw else None)  # (an item with a role and no type: a message)
    if kind not in ITEMS:
        raise RequestError(f"{where}: unknown item type {kind!r}; this server takes {ITEM_TYPES}", param="input")
    try:
        return parse(ITEMS[kind], raw)
    except RequestError as e:
        raise RequestError(f"{where}.{e.message}", param="input") from None


def _texts(parts, kinds, where: str) -> str:
    """The text of a list of parts of the given types (a reasoning item's, a tool output's)."""
    if isinstance(parts, str):
        return parts
    out = []
    for j, p in enumerate(parts or []):
        if not isinstance(p, dict) or p.get("type") not in kinds or not isinstance(p.get("text"), str):
            raise RequestError(f"{where}[{j}] must be {{\"type\": {kinds[0]!r}, \"text\": ...}}", param="input")
        out.append(p["text"])
    return "".join(out)


def _content(content, where: str):
    """A message item's content as schemas.Message parts (text, and images as data URLs)."""
    if isinstance(content, str):
        return content
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type")
        if kind in ("input_text", "output_text") and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            parts.append({"type": "text", "text": p["refusal"]})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        elif kind == "input_image":
            raise RequestError(f"{where}.content[{j}]: an input_image needs image_url, a data URL "
                               "(data:image/png;base64,...); file ids are not supported", param="input")
        else:
            raise RequestError(f"{where}.content[{j}]: a content part must be input_text, output_text or "
                               f"input_image with its field, not {kind!r}", param="input")
    return parts


def _arguments(text: str, where: str) -> dict:
    try:
        args = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise RequestError(f"{where}.arguments must be a JSON object, as a string", param="input")
    return args


def to_messages(items: List[Any], first: int = 0) -> List[Message]:
    """Input items as chat messages; items before `first` (a stored conversation) are not the request's own,
    so an error names the request's item by its own index."""
    out, thought, calls = [], "", set()
    for i, raw in enumerate(items):
        where = f"input[{i - first}]"
        item = _item(raw, where)
        if item.type == "reasoning":
            thought += _texts(item.content, ("reasoning_text",), f"{where}.content") or _texts(
                item.summary, ("summary_text",), f"{where}.summary")
            continue
        if item.type == "function_call_output":
            if item.call_id not in calls:
                raise RequestError(f"{where}: function_call_output call_id {item.call_id!r} answers no earlier "
                                   "function_call", param="input")
            output = _texts(item.output, ("input_text", "output_text"), f"{where}.output")
            out.append(Message(role="tool", tool_call_id=item.call_id, content=output))
            continue
        if item.type == "function_call":
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": _arguments(item.arguments, where)}}
            calls.add(item.call_id)
            if not out or out[-1].role != "assistant":  # (a call after an assistant's text: the same turn)
                out.append(Message(role="assistant"))
            out[-1].tool_calls = (out[-1].tool_calls or []) + [call]
        else:
            out.append(Message(role=item.role, content=_content(item.content, where)))
        if out[-1].role == "assistant" and thought:
            out[-1].reasoning = (out[-1].reasoning or "") + thought
        thought = ""  # (a thought belongs to the assistant turn right after it)
    return out


def _tools(tools) -> Optional[List[dict]]:
    """Responses' flat function tools in Chat Completions' nested shape (what tools.parse_tools reads)."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise RequestError(f"tools[{i}]: only function tools are supported here, not {kind!r}", param="tools")
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] needs a name", param="tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out or None


def _tool_choice(choice):
    """Responses' tool_choice in Chat Completions' shape."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                       param="tool_choice")


# Output items


def _item_of(turn: Turn, part, ids: dict, done: bool = True) -> dict:
    """The output item of an answer's part (ids: part index -> item id), as it is when begun or when done."""
    item_id = ids.setdefault(part.index, new_id({"reasoning": "rs_", "content": "msg_", "call": "fc_"}[part.kind]))
    text = part.text if done else ""
    if part.kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if done else []}
    if part.kind == "content":
        cut = turn.finish == "length" and part is turn.parts.parts[-1]
        status = "in_progress" if not done else ("incomplete" if cut else "completed")
        return {"type": "message", "id": item_id, "role": "assistant", "status": status,
                "content": [_text_part(text)] if done else []}
    call = turn.made(part) if done else None
    status = "in_progress" if not done else ("completed" if call is not None else "incomplete")
    arguments = json.dumps(call.arguments, ensure_ascii=False) if call is not None else text
    return {"type": "function_call", "id": item_id, "call_id": part.call_id, "name": part.name,
            "arguments": arguments, "status": status}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _output(turn: Turn, ids: dict) -> List[dict]:
    """The finished output items; a call cut off (never reported as made) is left out."""
    items = [_item_of(turn, p, ids) for p in turn.parts.parts]
    return [i for i in items if i["type"] != "function_call" or i["status"] == "completed"]


class Responses:
    """The routes, holding the stored responses, least recently used first: id -> (response object,
    conversation items, their size as JSON)."""

    def __init__(self, size: int = STORED, limit: int = STORED_BYTES):
        self.size, self.limit, self.stored, self.bytes = size, limit, OrderedDict(), 0

    def _get(self, response_id: str, param: Optional[str] = None):
        if response_id not in self.stored:
            raise RequestError(f"no stored response {response_id!r} (this server keeps the last {self.size}, in "
                               "memory)", status=404, param=param)
        self.stored.move_to_end(response_id)
        return self.stored[response_id]

    def _store(self, response: dict, items: List[Any]) -> None:
        size = len(json.dumps(items, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
        self.stored[response["id"]] = (response, items, size)
        self.bytes += size
        while len(self.stored) > self.size or (self.bytes > self.limit and len(self.stored) > 1):
            self.bytes -= self.stored.popitem(last=False)[1][2]

    async def retrieve(self, engine: Engine, response_id: str) -> dict:
        return self._get(response_id)[0]

    async def delete(self, engine: Engine, response_id: str) -> dict:
        self.bytes -= self._get(response_id)[2]
        del self.stored[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    async def create(self, engine: Engine, http_request, body):
        req = parse(ResponsesRequest, body)
        require_chat_template(engine, "/v1/completions")
        items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else list(req.input)
        history = self._get(req.previous_response_id, "previous_response_id")[1] if req.previous_response_id else []
        messages = to_messages(history + items, first=len(history))
        if not messages:
            raise RequestError("input has no message: give at least one", param="input")
        if req.instructions:  # (a previous response's instructions are not carried over, as OpenAI does)
            messages.insert(0, Message(role="system", content=req.instructions))
        tools = parse_tools(_tools(req.tools), _tool_choice(req.tool_choice), req.parallel_tool_calls,
                            getattr(engine.tokenizer, "chat_template", None) or "")
        prompt = engine.chat(messages, tools, engine.template_kwargs(None, req.think))
        constraint = engine.structured(req.json_schema, tools, prompt)
        request = engine.request(prompt, max_tokens=req.max_output_tokens, temperature=req.temperature,
                                 top_p=req.top_p, constraint=constraint)
        run = _Run(engine, req, Turn(answers(engine, prompt, tools, 1)[0]), history + items)
        if req.stream:
            return StreamingResponse(self._stream(engine, request, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async for kind, data in engine.events(request, http_request):
            run.turn.on(kind, data)
        if run.turn.error:
            raise RequestError(run.turn.error, status=500)
        return JSONResponse(self._finish(run))

    def _finish(self, run) -> dict:
        response = run.response()
        if run.req.store:
            self._store(response, run.items + response["output"])
        return response

    async def _stream(self, engine: Engine, request, run):
        seq = count()

        def event(kind: str, **data) -> str:
            body = dict(type=kind, sequence_number=next(seq), **data)
            return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

        head = run.response("in_progress")
        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        async for kind, data in engine.events(request):
            for e in run.turn.on(kind, data):
                for kind_, body in run.events(e):
                    yield event(kind_, **body)
            if kind == "error":
                failed = dict(run.response("failed"), error={"code": "server_error", "message": data})
                yield event("response.failed", response=failed)
                return
        response = self._finish(run)
        yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                    response=response)


class _Run:
    """One response in the making: the request, its Turn, its conversation so far, and the ids it gave."""

    def __init__(self, engine: Engine, req: ResponsesRequest, turn: Turn, items: List[Any]):
        self.engine, self.req, self.turn, self.items = engine, req, turn, items
        self.id, self.created, self.ids = new_id("resp_"), int(time.time()), {}

    def events(self, e: tuple) -> List[tuple]:
        """A Parts event as the Responses stream's events: (type, fields)."""
        kind, part = e[0], e[1]
        where = {"output_index": part.index}
        item = _item_of(self.turn, part, self.ids, done=kind == "close")
        at = dict(where, item_id=item["id"], content_index=0)
        if kind == "open":
            out = [("response.output_item.added", dict(where, item=item))]
            if part.kind == "content":
                out.append(("response.content_part.added", dict(at, part=_text_part(""))))
            elif part.kind == "reasoning":
                out.append(("response.content_part.added", dict(at, part={"type": "reasoning_text", "text": ""})))
            return out
        if kind == "delta":
            if part.kind == "call":
                return [("response.function_call_arguments.delta", dict(where, item_id=item["id"], delta=e[2]))]
            name = "response.output_text.delta" if part.kind == "content" else "response.reasoning_text.delta"
            return [(name, dict(at, delta=e[2], **({"logprobs": []} if part.kind == "content" else {})))]
        if part.kind == "call":
            return [("response.function_call_arguments.done",
                     dict(where, item_id=item["id"], name=part.name, arguments=item["arguments"])),
                    ("response.output_item.done", dict(where, item=item))]
        if part.kind == "content":
            done = [("response.output_text.done", dict(at, text=part.text, logprobs=[]))]
        else:
            done = [("response.reasoning_text.done", dict(at, text=part.text))]
        return done + [("response.content_part.done", dict(at, part=item["content"][0])),
                       ("response.output_item.done", dict(where, item=item))]

    def response(self, status: Optional[str] = None) -> dict:
        """The response object: in progress (status given), or finished (from the Turn)."""
        req, turn, d = self.req, self.turn, self.engine.defaults
        finished = status is None
        if finished:
            status = "incomplete" if turn.finish == "length" else "completed"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.engine.name,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": _output(turn, self.ids) if finished else [],
            "usage": self.usage() if finished else None,
            # what the request asked, echoed as OpenAI does
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store, "temperature": d.temp if req.temperature is None else req.temperature,
            "top_p": d.top_p if req.top_p is None else req.top_p,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text and req.text.format else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [dict({"strict": False, "description": None, "parameters": None}, **t) for t in req.tools or []],
            "truncation": "disabled", "user": None,
        }

    def usage(self) -> dict:
        t = self.turn
        return {"input_tokens": t.prompt_tokens, "output_tokens": t.count, "total_tokens": t.prompt_tokens + t.count,
                "input_tokens_details": {"cached_tokens": t.cached_tokens, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": t.reasoning_tokens}}

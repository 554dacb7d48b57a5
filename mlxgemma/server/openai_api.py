"""The OpenAI API: /v1/models, /v1/chat/completions and /v1/completions, whole or streamed as server-sent
events (ending with `data: [DONE]`), with usage (cached prompt tokens included) and logprobs."""

import json
import time
from functools import lru_cache

from starlette.responses import JSONResponse, StreamingResponse

from .engine import Engine
from .schemas import ChatRequest, CompletionRequest, RequestError, parse
from .answer import answers, message
from .tools import new_id, parse_tools


def models(engine: Engine) -> dict:
    return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                         "owned_by": "mlxgemma"}]}


def has_chat_template(engine: Engine) -> bool:
    return bool(getattr(engine.tokenizer, "chat_template", None))


def require_chat_template(engine: Engine, instead: str) -> None:
    """A chat request to a base model (the default model is one) is refused before anything else, with the
    way forward: the generic "no chat template" of the library would leave a new user stuck."""
    engine.check_generates()
    if not has_chat_template(engine):
        raise RequestError(f"this model has no chat template (a base model, which continues text): use {instead} "
                           "with the text to continue, or serve an instruction-tuned checkpoint", param="messages",
                           code="no_chat_template")


def error_body(e: RequestError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


class _Reply:
    """One response in the making: per choice its text, logprobs and finish reason; the usage."""

    def __init__(self, engine: Engine, n: int, chat: bool):
        self.engine, self.chat = engine, chat
        self.text, self.logprobs, self.finish = [""] * n, [[] for _ in range(n)], [None] * n
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = self.proposed = self.accepted = 0
        self.error = None
        self.id = new_id("chatcmpl-" if chat else "cmpl-")
        self.created = int(time.time())

    def on(self, kind, data):
        if kind == "prompt":
            self.prompt_tokens, self.cached_tokens = data["prompt_tokens"], data["cached_tokens"]
        elif kind == "token":
            self.text[data.index] += data.text
            self.logprobs[data.index].append(data)
        elif kind == "drafted":
            self.proposed, self.accepted = self.proposed + data[1], self.accepted + data[2]
        elif kind == "done":
            index, self.finish[index], count = data
            self.completion_tokens += count
        elif kind == "error":
            self.error = data

    def usage(self) -> dict:
        """With speculative decoding, OpenAI's prediction counts: draft tokens the model kept and rejected."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        if self.proposed:
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": self.accepted,
                                                  "rejected_prediction_tokens": self.proposed - self.accepted}
        return usage

    def head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.engine.name}


@lru_cache(maxsize=65536)
def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _entry(tokenizer, token: int, logprob: float) -> dict:
    text = _piece(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, tokens) -> dict:
    return {"content": [dict(_entry(tokenizer, t.id, t.logprob),
                             top_logprobs=[_entry(tokenizer, i, lp) for i, lp in t.top]) for t in tokens]}


def completion_logprobs(tokenizer, tokens, start: int = 0) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for t in tokens:
        out["tokens"].append(_piece(tokenizer, t.id))
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({_piece(tokenizer, i): lp for i, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def chat_completions(engine: Engine, http_request, body) -> object:
    req = parse(ChatRequest, body)
    require_chat_template(engine, "/v1/completions")
    tools = parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                        getattr(engine.tokenizer, "chat_template", None) or "")
    prompt = engine.chat(req.messages, tools, engine.template_kwargs(req.chat_template_kwargs, req.think))
    top = (req.top_logprobs or 0) if req.logprobs else 0
    constraint = engine.structured(req.json_schema, tools, prompt, req.thinking_budget)
    request = engine.request(prompt, max_tokens=req.max_completion_tokens or req.max_tokens, **_sampling(req),
                             top_logprobs=top, constraint=constraint)
    return await _respond(engine, http_request, request, req, chat=True, logprobs=req.logprobs,
                          answers=answers(engine, prompt, tools, req.n))


async def completions(engine: Engine, http_request, body) -> object:
    req = parse(CompletionRequest, body)
    prompt = engine.text(req.prompt)
    request = engine.request(prompt, max_tokens=req.max_tokens, **_sampling(req), top_logprobs=req.logprobs or 0)
    return await _respond(engine, http_request, request, req, chat=False, logprobs=req.logprobs is not None)


def _sampling(req) -> dict:
    return dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                stop=req.stop, n=req.n)


async def _respond(engine, http_request, request, req, chat: bool, logprobs: bool, answers=None):
    reply = _Reply(engine, req.n, chat)
    if req.stream:
        return StreamingResponse(_stream(engine, request, reply, req.include_usage, logprobs, answers),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async for kind, data in engine.events(request, http_request):
        reply.on(kind, data)
    if reply.error:
        raise RequestError(reply.error, status=500)
    tok = engine.tokenizer
    choices = []
    for i in range(req.n):
        lp = None
        if logprobs:
            lp = chat_logprobs(tok, reply.logprobs[i]) if chat else completion_logprobs(tok, reply.logprobs[i])
        if chat:
            answers[i].feed(reply.text[i])
            finish = answers[i].end(reply.finish[i])[1]
            choices.append({"index": i, "message": message(answers[i]), "logprobs": lp, "finish_reason": finish})
        else:
            choices.append({"index": i, "text": reply.text[i], "logprobs": lp, "finish_reason": reply.finish[i]})
    return JSONResponse(dict(reply.head(), choices=choices, usage=reply.usage()))


def openai_delta(delta: dict) -> dict:
    """An Answer's delta as Chat Completions streams it: reasoning as reasoning_content (the DeepSeek/llama.cpp
    name) and reasoning (mlx-lm's and vLLM's)."""
    if "reasoning" in delta:
        return {"reasoning_content": delta["reasoning"], "reasoning": delta["reasoning"]}
    return delta


async def _stream(engine, request, reply, include_usage: bool, logprobs: bool, answers=None):
    tok, head = engine.tokenizer, dict(reply.head(), object="chat.completion.chunk" if reply.chat else "text_completion")
    if reply.chat:
        for i in range(len(reply.text)):
            yield _sse(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]))
    async for kind, data in engine.events(request):
        offset = len(reply.text[data.index]) if kind == "token" else 0
        reply.on(kind, data)
        if kind == "token" and answers is not None:
            deltas = answers[data.index].feed(data.text)
            lp = chat_logprobs(tok, [data]) if logprobs else None
            for delta in deltas or ([{"content": ""}] if lp else []):
                yield _sse(dict(head, choices=[{"index": data.index, "delta": openai_delta(delta), "logprobs": lp,
                                                "finish_reason": None}]))
                lp = None
        elif kind == "token" and (data.text or logprobs):
            if reply.chat:
                choice = {"index": data.index, "delta": {"content": data.text},
                          "logprobs": chat_logprobs(tok, [data]) if logprobs else None, "finish_reason": None}
            else:
                choice = {"index": data.index, "text": data.text, "finish_reason": None,
                          "logprobs": completion_logprobs(tok, [data], offset) if logprobs else None}
            yield _sse(dict(head, choices=[choice]))
        elif kind == "done":
            index, finish, _ = data
            if answers is not None:
                deltas, finish = answers[index].end(finish)
                for delta in deltas:
                    yield _sse(dict(head, choices=[{"index": index, "delta": openai_delta(delta), "logprobs": None,
                                                    "finish_reason": None}]))
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish} if reply.chat else (
                {"index": index, "text": "", "logprobs": None, "finish_reason": finish})
            yield _sse(dict(head, choices=[choice]))
        elif kind == "error":
            yield _sse(error_body(RequestError(data, status=500)))
            return
    if include_usage:
        yield _sse(dict(head, choices=[], usage=reply.usage()))
    yield "data: [DONE]\n\n"

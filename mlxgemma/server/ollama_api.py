"""The Ollama API: /api/tags, /api/version, /api/show, /api/chat and /api/generate (NDJSON streaming by
default, as Ollama; its final message carries done_reason, prompt_eval_count, eval_count and durations)."""

import json
import time
from datetime import datetime, timezone

from starlette.responses import JSONResponse, StreamingResponse

from .. import __version__
from .engine import Engine
from .schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest, RequestError, parse


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(engine: Engine) -> dict:
    config = engine.model.config
    quant = getattr(config, "quantization", None) or {}
    return {"format": "mlx", "family": getattr(config, "model_type", ""),
            "families": [getattr(config, "model_type", "")],
            "parameter_size": _parameter_size(engine.model),
            "quantization_level": f"Q{quant['bits']}" if quant.get("bits") else "F32"}


def _parameter_size(model) -> str:
    from mlx.utils import tree_flatten

    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def version() -> dict:
    return {"version": __version__}


def tags(engine: Engine) -> dict:
    return {"models": [{"name": engine.name, "model": engine.name, "modified_at": _now(), "size": 0,
                        "digest": "", "details": _details(engine)}]}


def show(engine: Engine, body) -> dict:
    parse(OllamaShowRequest, body)
    capabilities = ["completion"] + (["vision"] if engine.takes_images else [])
    return {"modelfile": "", "parameters": "", "template": getattr(engine.tokenizer, "chat_template", "") or "",
            "details": _details(engine), "model_info": engine.describe(), "capabilities": capabilities,
            "modified_at": _now()}


def _options(engine: Engine, opts) -> dict:
    if opts is None:
        return {}
    limit = opts.num_predict
    max_tokens = (engine.context or engine.defaults.max_tokens) if limit is not None and limit < 0 else limit
    return dict(max_tokens=max_tokens, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                min_p=opts.min_p, seed=opts.seed, stop=[s for s in opts.stop or [] if s])


async def chat(engine: Engine, http_request, body):
    req = parse(OllamaChatRequest, body)
    request = engine.request(engine.chat(req.messages), **_options(engine, req.options))
    return await _respond(engine, http_request, request, req.stream, chat=True)


async def generate(engine: Engine, http_request, body):
    req = parse(OllamaGenerateRequest, body)
    if not req.prompt and not req.images:  # Ollama's way to load a model: an empty answer, done
        return JSONResponse({"model": engine.name, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    prompt = engine.text(req.prompt, req.images or (), raw=req.raw, system=req.system)
    request = engine.request(prompt, **_options(engine, req.options))
    return await _respond(engine, http_request, request, req.stream, chat=False)


def _message(engine: Engine, chat: bool, text: str, done: bool) -> dict:
    body = {"model": engine.name, "created_at": _now()}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    return dict(body, done=done)


def _final(engine, chat, text, stats, start, first) -> dict:
    end = time.perf_counter_ns()
    first = first or end
    return dict(_message(engine, chat, text, True), done_reason=stats.get("finish") or "stop",
                total_duration=end - start, load_duration=0, prompt_eval_count=stats.get("prompt_tokens", 0),
                prompt_eval_duration=first - start, eval_count=stats.get("count", 0), eval_duration=end - first)


async def _respond(engine, http_request, request, stream: bool, chat: bool):
    start = time.perf_counter_ns()
    stats, first = {}, [None]

    def note(kind, data):
        if kind == "prompt":
            stats["prompt_tokens"] = data["prompt_tokens"]
        elif kind == "token" and first[0] is None:
            first[0] = time.perf_counter_ns()
        elif kind == "done":
            stats["finish"], stats["count"] = data[1], data[2]
        elif kind == "error":
            stats["error"] = data

    if not stream:
        text = ""
        async for kind, data in engine.events(request, http_request):
            note(kind, data)
            text += data.text if kind == "token" else ""
        if "error" in stats:
            raise RequestError(stats["error"], status=500)
        return JSONResponse(_final(engine, chat, text, stats, start, first[0]))

    async def lines():
        async for kind, data in engine.events(request):
            note(kind, data)
            if kind == "token" and data.text:
                yield json.dumps(_message(engine, chat, data.text, False), ensure_ascii=False) + "\n"
            elif kind == "error":
                yield json.dumps({"error": data}) + "\n"
                return
        yield json.dumps(_final(engine, chat, "", stats, start, first[0]), ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")

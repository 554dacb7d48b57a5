"""The Ollama API: /api/tags, /api/version, /api/show, /api/chat and /api/generate (NDJSON streaming by
default, as Ollama; its final message carries done_reason, prompt_eval_count, eval_count and durations)."""

import json
import time
from datetime import datetime, timezone

from starlette.responses import JSONResponse, StreamingResponse

from .. import __version__
from .engine import Engine
from .openai_api import has_chat_template, require_chat_template
from .schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest, RequestError, parse
from ..decode.thinking import takes_thinking
from .answer import answers
from .tools import parse_tools


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(engine: Engine) -> dict:
    config = engine.model.config
    quant = getattr(config, "quantization", None) or {}
    return {"format": "mlx", "family": getattr(config, "model_type", ""),
            "families": [getattr(config, "model_type", "")],
            "parameter_size": _parameter_size(parameter_count(engine.model)),
            "quantization_level": f"Q{quant['bits']}" if quant.get("bits") else "F32"}


def parameter_count(model) -> int:
    """The model's parameters as its float twin has them. A quantized layer (anything with `bits` and
    `scales`: nn.QuantizedLinear, nn.QuantizedEmbedding, Gemma 4's QuantizedSwitchLinear) stores its weight
    packed, 32 // bits codes to a uint32 word, plus per-group scales and biases: its logical weight is the
    packed width * 32 / bits, and the scales and biases (the grid, not the model) are not parameters. Its
    `bias`, when it has one, is."""
    from mlx.utils import tree_flatten

    quantized = {name: m.bits for name, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}
    n = 0
    for path, v in tree_flatten(model.parameters()):
        owner, _, leaf = path.rpartition(".")
        bits = quantized.get(owner)
        if bits is None:
            n += v.size
        elif leaf == "weight":
            n += v.size * 32 // bits
        elif leaf not in ("scales", "biases"):
            n += v.size
    return n


def _parameter_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def version() -> dict:
    return {"version": __version__}


def tags(engine: Engine) -> dict:
    return {"models": [{"name": engine.name, "model": engine.name, "modified_at": _now(), "size": 0,
                        "digest": "", "details": _details(engine)}]}


def show(engine: Engine, body) -> dict:
    parse(OllamaShowRequest, body)
    # Tools go through the chat template: a base model (no template) has none, as Ollama reports it.
    capabilities = (["completion"] + (["tools"] if has_chat_template(engine) else [])
                    + (["vision"] if engine.takes_images else []) + (["audio"] if engine.takes_audio else [])
                    + (["thinking"] if takes_thinking(engine.tokenizer) else []))
    # model_info's general.parameter_count is Ollama's key for the exact count (details has it rounded).
    info = dict(engine.describe(), **{"general.parameter_count": parameter_count(engine.model)})
    return {"modelfile": "", "parameters": "", "template": getattr(engine.tokenizer, "chat_template", "") or "",
            "details": _details(engine), "model_info": info, "capabilities": capabilities, "modified_at": _now()}


def _options(engine: Engine, opts) -> dict:
    if opts is None:
        return {}
    limit = opts.num_predict
    max_tokens = (engine.context or engine.defaults.max_tokens) if limit is not None and limit < 0 else limit
    return dict(max_tokens=max_tokens, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                min_p=opts.min_p, seed=opts.seed, stop=[s for s in opts.stop or [] if s])


async def chat(engine: Engine, http_request, body):
    req = parse(OllamaChatRequest, body)
    require_chat_template(engine, "/api/generate")
    tools = parse_tools(req.tools, None, True, getattr(engine.tokenizer, "chat_template", None) or "")
    think = None if req.think is None else req.think is not False
    prompt = engine.chat(req.messages, tools, engine.template_kwargs(None, think))
    request = engine.request(prompt, **_options(engine, req.options),
                             constraint=engine.structured(req.json_schema, tools, prompt))
    return await _respond(engine, http_request, request, req.stream, chat=True,
                          answer=answers(engine, prompt, tools, 1)[0])


async def generate(engine: Engine, http_request, body):
    req = parse(OllamaGenerateRequest, body)
    if not req.prompt and not req.images:  # Ollama's way to load a model: an empty answer, done
        return JSONResponse({"model": engine.name, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    prompt = engine.text(req.prompt, req.images or (), raw=req.raw, system=req.system)
    request = engine.request(prompt, **_options(engine, req.options), constraint=engine.structured(req.json_schema, None))
    return await _respond(engine, http_request, request, req.stream, chat=False)


def _message(engine: Engine, chat: bool, text: str, done: bool, thinking: str = "") -> dict:
    body = {"model": engine.name, "created_at": _now()}
    if chat:
        body["message"] = dict({"role": "assistant", "content": text}, **({"thinking": thinking} if thinking else {}))
    else:
        body["response"] = text
    return dict(body, done=done)


def _final(engine, chat, text, stats, start, first, calls=(), thinking: str = "") -> dict:
    end = time.perf_counter_ns()
    first = first or end
    body = _message(engine, chat, text, True, thinking)
    if calls:  # Ollama's tool calls: arguments as an object, no ids
        body["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return dict(body, done_reason=_reason(stats.get("finish")),
                total_duration=end - start, load_duration=0, prompt_eval_count=stats.get("prompt_tokens", 0),
                prompt_eval_duration=first - start, eval_count=stats.get("count", 0), eval_duration=end - first)


def _reason(finish) -> str:
    """Ollama's done_reason: "stop" (tool calls too, as Ollama reports them) or "length"."""
    return "stop" if finish in (None, "tool_calls") else finish


async def _respond(engine, http_request, request, stream: bool, chat: bool, answer=None):
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

    def end(streamed: bool):
        """The final message: a streamed one carries only what the end released (and the calls)."""
        if answer is None:
            return _final(engine, chat, "" if streamed else text[0], stats, start, first[0])
        last, stats["finish"] = answer.end(stats.get("finish") or "stop")
        content, thinking = answer.content, answer.reasoning
        if streamed:
            content = "".join(d.get("content") or "" for d in last)
            thinking = "".join(d.get("reasoning") or "" for d in last)
        return _final(engine, chat, content, stats, start, first[0], answer.calls, thinking)

    text = [""]
    if not stream:
        async for kind, data in engine.events(request, http_request):
            note(kind, data)
            if kind == "token":
                text[0] += data.text
                if answer is not None:
                    answer.feed(data.text)
        if "error" in stats:
            raise RequestError(stats["error"], status=500)
        return JSONResponse(end(False))

    async def lines():
        async for kind, data in engine.events(request):
            note(kind, data)
            if kind == "token" and answer is None and data.text:
                yield json.dumps(_message(engine, chat, data.text, False), ensure_ascii=False) + "\n"
            elif kind == "token" and answer is not None:
                for d in answer.feed(data.text):  # (calls come whole in the final message)
                    if d.get("content") or d.get("reasoning"):
                        yield json.dumps(_message(engine, chat, d.get("content", ""), False, d.get("reasoning", "")),
                                         ensure_ascii=False) + "\n"
            if kind == "error":
                yield json.dumps({"error": data}) + "\n"
                return
        yield json.dumps(end(True), ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")

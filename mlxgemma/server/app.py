"""The routes: OpenAI (/v1/...: Chat Completions, Completions, Responses, Embeddings), Anthropic (/v1/messages),
Ollama (/api/...), /health, the chat page (/) and its icon, on Starlette.

Every bad request is a 4xx with one clear message (an OpenAI error object, Anthropic's {"type": "error", ...}
under /v1/messages, or Ollama's {"error": ...} under /api/), never a traceback and never anything that touches
other clients. With an API key every route but the page itself and its icon (static, no data: the page asks
for the key) needs `Authorization: Bearer KEY` or (as Anthropic's clients send it) `x-api-key: KEY`.
"""

import hmac
import json
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..server import anthropic_api, embeddings, ollama_api, openai_api, responses_api
from .engine import Engine
from .schemas import RequestError

log = logging.getLogger("mlxgemma.server")
MAX_BODY = 32 * 1024 * 1024
# Browsers ask for /favicon.ico on every page load; a 404 there is noise in the log and the console.
# SVG is accepted as a favicon by current browsers, whatever the .ico name says.
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
        'fill="#2f6fed"/><path d="M8 22V10l8 7 8-7v12" fill="none" stroke="#fff" stroke-width="3" '
        'stroke-linecap="round" stroke-linejoin="round"/></svg>')
PUBLIC = ("/", "/favicon.ico")  # GET without the API key: static, no model data


async def read_json(request: Request, limit: int):
    """The body as JSON, refused past `limit` bytes (413) before it is all read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over the server's limit of {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is over the server's limit of {limit} bytes", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def error_body(path: str, e: RequestError) -> dict:
    """The error object of the API a path belongs to."""
    if path.startswith("/api/"):
        return {"error": e.message}
    if path.startswith("/v1/messages"):
        return anthropic_api.error_body(e)
    return openai_api.error_body(e)


def _error(request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, e), status_code=e.status)


def create_app(engine: Engine, api_key=None, allowed_origins=(), max_body: int = MAX_BODY) -> Starlette:
    def post(handler):
        async def endpoint(request: Request):
            return await handler(engine, request, await read_json(request, max_body))
        return endpoint

    def get(make):
        async def endpoint(request: Request):
            return JSONResponse(make())
        return endpoint

    def by_id(handler):  # GET and DELETE /v1/responses/{id}
        async def endpoint(request: Request):
            return JSONResponse(await handler(engine, request.path_params["response_id"]))
        return endpoint

    async def show(request: Request):
        return JSONResponse(ollama_api.show(engine, await read_json(request, max_body)))

    async def page(request: Request):
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    async def icon(request: Request):
        return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    responses = responses_api.Responses()  # (stored responses: this app's own)
    routes = [
        Route("/", page),
        Route("/favicon.ico", icon),
        Route("/health", get(lambda: {"status": "ok"})),
        Route("/v1/models", get(lambda: openai_api.models(engine))),
        Route("/v1/chat/completions", post(openai_api.chat_completions), methods=["POST"]),
        Route("/v1/completions", post(openai_api.completions), methods=["POST"]),
        Route("/v1/embeddings", post(embeddings.openai_embeddings), methods=["POST"]),
        Route("/v1/responses", post(responses.create), methods=["POST"]),
        Route("/v1/responses/{response_id}", by_id(responses.retrieve), methods=["GET"]),
        Route("/v1/responses/{response_id}", by_id(responses.delete), methods=["DELETE"]),
        Route("/v1/messages", post(anthropic_api.messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", post(anthropic_api.count_tokens), methods=["POST"]),
        Route("/api/version", get(ollama_api.version)),
        Route("/api/tags", get(lambda: ollama_api.tags(engine))),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", post(ollama_api.chat), methods=["POST"]),
        Route("/api/generate", post(ollama_api.generate), methods=["POST"]),
        Route("/api/embed", post(embeddings.ollama_embed), methods=["POST"]),
        Route("/api/embeddings", post(embeddings.ollama_embeddings), methods=["POST"]),
    ]

    async def request_error(request: Request, e: RequestError):
        return _error(request, e)

    async def http_error(request: Request, e: HTTPException):
        return _error(request, RequestError(e.detail, status=e.status_code))

    async def server_error(request: Request, e: Exception):
        log.exception("request failed")
        return _error(request, RequestError(f"internal error: {type(e).__name__}", status=500))

    middleware = []  # the first is the outermost: CORS headers also on a 401
    if allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(_KeyCheck, key=api_key))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={RequestError: request_error, HTTPException: http_error,
                                         Exception: server_error})


class _KeyCheck:
    """Pure ASGI (so streamed responses pass untouched): every HTTP request but GET of PUBLIC needs the key."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["path"] in PUBLIC and scope["method"] == "GET"):
            if not self._allowed(dict(scope["headers"])):
                if scope["method"] == "OPTIONS":  # a CORS preflight carries no credentials
                    return await self.app(scope, receive, send)
                e = RequestError("a valid API key is needed: send Authorization: Bearer KEY (or x-api-key: KEY)",
                                 status=401)
                body = json.dumps(error_body(scope["path"], e)).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _allowed(self, headers: dict) -> bool:
        bearer, key = headers.get(b"authorization", b""), headers.get(b"x-api-key")
        if key is not None and hmac.compare_digest(key.strip(), self.key):
            return True
        return bearer.startswith(b"Bearer ") and hmac.compare_digest(bearer[7:].strip(), self.key)

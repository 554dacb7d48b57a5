"""Embeddings over HTTP: OpenAI's POST /v1/embeddings, Ollama's POST /api/embed and its older /api/embeddings.

The server's embedding model is its --model when that is an embedding model (EmbeddingGemma, EmbeddingGemma 2),
or --embedding-model beside a chat model. Handlers tokenize (embedding/encode.py: the model's own tokenizer,
cut at its max_seq_length, as sentence-transformers cuts) and hand the token ids to the scheduler, whose loop
runs the queue here between decode steps: inputs of every waiting request go into batches together (sorted
by length, right-padded: each row equals its input alone), so embedding requests neither wait for a long
generation to end nor stop it.

Extensions: `prompt_name` (one of the model's prompts, e.g. "query" or "document": EmbeddingGemma's task
prefixes) in both APIs. Ollama's `truncate: false` refuses an input longer than the model takes.
"""

import base64
import time
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import numpy as np
from starlette.responses import JSONResponse

from ..embedding.encode import as_items, embed_ids, prompt_text, token_lists
from ..errors import MlxGemmaError
from ..models.embedding import truncated
from .schemas import RequestError

MAX_INPUTS = 2048  # OpenAI's limit per request
BATCH = 32  # inputs per forward


@dataclass
class EmbedRequest:
    """What a handler asks of the scheduler: token id lists; the embeddings come back as one "embeddings"
    event (an (N, dim) array), then "end"."""

    ids: List[List[int]]
    dim: Optional[int] = None
    emit: object = None
    cancelled: bool = False
    uid: Optional[int] = None
    started: float = 0.0
    done: list = field(default_factory=list)  # a vector per input, as they come


class EmbeddingQueue:
    """The scheduler's embedding requests: step() runs one batch of the waiting inputs."""

    def __init__(self, model):
        self.model, self.waiting = model, []

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def add(self, request: EmbedRequest) -> None:
        request.done = [None] * len(request.ids)
        self.waiting.append(request)

    def step(self) -> None:
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            r.emit("end", None)
        todo = [(r, i) for r in self.waiting for i, v in enumerate(r.done) if v is None][:BATCH]
        if not todo:
            return
        try:
            vectors = embed_ids(self.model, [r.ids[i] for r, i in todo], normalize=False, batch_size=BATCH)
        except Exception as e:  # (one batch failing fails its requests, never the server)
            for r in {id(r): r for r, _ in todo}.values():
                self.waiting.remove(r)
                r.emit("error", f"{type(e).__name__}: {e}")
                r.emit("end", None)
            return
        for b, (r, i) in enumerate(todo):
            r.done[i] = vectors[b]
        for r in [r for r in self.waiting if all(v is not None for v in r.done)]:
            self.waiting.remove(r)
            out = truncated(mx.stack(r.done), r.dim, self.model.dimensions, True)
            r.emit("embeddings", np.array(out, dtype=np.float32))
            r.emit("end", None)


def _embedder(engine):
    if engine.embedder is None:
        raise RequestError("this server has no embedding model: start it with --embedding-model PATH "
                           "(EmbeddingGemma), or serve an embedding model as --model")
    return engine.embedder


async def _embeddings(engine, http_request, inputs, dim, prompt_name, truncate: bool = True) -> tuple:
    """(the (N, dim) embeddings, the prompt tokens) of a request's inputs."""
    model, tokenizer = _embedder(engine)
    if dim is not None and not (isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim <= model.dimensions):
        raise RequestError(f"dimensions must be 1..{model.dimensions} (this model's embedding size), got {dim!r}",
                           param="dimensions")
    try:
        items = as_items(inputs)
        if len(items) > MAX_INPUTS:
            raise RequestError(f"input holds {len(items)} items; at most {MAX_INPUTS} a request", param="input")
        ids = token_lists(model, tokenizer, items, prompt_text(model, prompt_name), truncate)
    except MlxGemmaError as e:
        raise RequestError(str(e), param="input") from None
    request = EmbedRequest(ids, dim)
    async for kind, data in engine.events(request, http_request):
        if kind == "embeddings":
            return data, sum(len(x) for x in ids)
        if kind == "error":
            raise RequestError(data, status=500)
    raise RequestError("the request was cancelled", status=499)


def _name(engine) -> str:
    return engine.embedding_name


async def openai_embeddings(engine, http_request, body) -> JSONResponse:
    from .schemas import EmbeddingRequest, parse

    req = parse(EmbeddingRequest, body)
    vectors, tokens = await _embeddings(engine, http_request, req.input, req.dimensions, req.prompt_name)
    if req.encoding_format == "base64":  # little-endian float32 bytes, as OpenAI's clients decode them
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return JSONResponse({"object": "list", "model": _name(engine),
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def ollama_embed(engine, http_request, body) -> JSONResponse:
    from .schemas import OllamaEmbedRequest, parse

    start = time.perf_counter_ns()
    req = parse(OllamaEmbedRequest, body)
    vectors, tokens = await _embeddings(engine, http_request, req.input, req.dimensions, req.prompt_name,
                                        truncate=req.truncate)
    return JSONResponse({"model": _name(engine), "embeddings": vectors.tolist(),
                         "total_duration": time.perf_counter_ns() - start, "load_duration": 0,
                         "prompt_eval_count": tokens})


async def ollama_embeddings(engine, http_request, body) -> JSONResponse:
    """The older endpoint: one prompt, {"embedding": [...]}."""
    from .schemas import OllamaEmbeddingsRequest, parse

    req = parse(OllamaEmbeddingsRequest, body)
    vectors, _ = await _embeddings(engine, http_request, req.prompt, None, req.prompt_name)
    return JSONResponse({"embedding": vectors[0].tolist()})

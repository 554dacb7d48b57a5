"""python -m mlxgemma.server [--model PATH_OR_REPO_OR_GGUF] [--host 127.0.0.1] [--port 8080]

A local OpenAI- and Ollama-compatible server with continuous batching and a prompt cache; the chat page
is at http://127.0.0.1:8080/. Options follow mlx_lm.server where they overlap. Under mlx.launch the model is
sharded across the ranks (--pipeline: by layers); rank 0 serves (ranks.py).
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from ..cli import (DTYPE_CHOICES, add_pipeline_option, add_thinking_options, launched, load_draft, load_for_cli, run,
                   thinking_kwargs)
from ..errors import MlxGemmaError
from ..models import is_encoder_decoder


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.server", description="Serve a Gemma model over HTTP.")
    p.add_argument("--model", default=None, help="MLX/HF directory, Hub repo id or .gguf (default: the embedded "
                   "Gemma 3 270M of mlxgemma[demo])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request "
                   "(default: $MLXGEMMA_API_KEY when set)")
    p.add_argument("--allowed-origins", default="", help="comma-separated origins that get CORS headers "
                   "(default: none)")
    p.add_argument("--temp", type=float, default=0.0, help="default temperature of requests that send none; 0 is "
                   "greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="default top-p (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="default top-k; 0 is off (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p; 0 is off (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="default max tokens (default: %(default)s)")
    add_thinking_options(p)  # the defaults of requests that say nothing of thinking
    p.add_argument("--decode-concurrency", type=int, default=32, help="rows decoded together at most")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--prompt-cache-size", type=int, default=10, help="sequences kept for reuse (0: none)")
    p.add_argument("--prompt-cache-bytes", type=int, default=None, help="bound on the kept caches' bytes")
    p.add_argument("--kv-bits", type=int, default=None, choices=[4, 8],
                   help="keep every request's KV caches quantized to this many bits, from its prefill on")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV caches")
    p.add_argument("--draft-model", default=None, help="a smaller model of the same tokenizer that proposes tokens "
                   "for every request to check (speculative decoding; each output as without it)")
    p.add_argument("--prompt-lookup-ngram", type=int, default=None, help="speculate without a draft model: "
                   "propose what followed the last N tokens where they occurred before (output unchanged)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="tokens proposed per step (default: %(default)s)")
    p.add_argument("--embedding-model", default=None, help="an embedding model (EmbeddingGemma) answering "
                   "/v1/embeddings and /api/embed beside --model (a --model that is one answers them itself)")
    p.add_argument("--prompt-cache-file", action="append", default=[],
                   help="a prompt cached by python -m mlxgemma.cache_prompt, kept in the prompt cache from the "
                        "start: a prompt that begins with it prefills only the rest (repeatable)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    add_pipeline_option(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p


def check_args(args) -> None:
    for ok, message in [
        (0 < args.port < 65536, f"--port must be in 1..65535, got {args.port}"),
        (args.max_tokens > 0, f"--max-tokens must be positive, got {args.max_tokens}"),
        (args.decode_concurrency > 0, "--decode-concurrency must be positive"),
        (args.prefill_step_size > 0, "--prefill-step-size must be positive"),
        (args.prompt_cache_size >= 0, "--prompt-cache-size must be >= 0"),
        (not args.prompt_cache_file or args.prompt_cache_size > 0, "--prompt-cache-file needs a prompt cache "
         "(--prompt-cache-size > 0)"),
        (args.prompt_cache_bytes is None or args.prompt_cache_bytes > 0, "--prompt-cache-bytes must be positive"),
        (args.max_request_bytes > 0, "--max-request-bytes must be positive"),
        (args.prompt_lookup_ngram is None or args.prompt_lookup_ngram > 0, "--prompt-lookup-ngram must be positive"),
        (args.num_draft_tokens > 0, "--num-draft-tokens must be positive"),
        (not (args.draft_model and args.prompt_lookup_ngram), "give --draft-model or --prompt-lookup-ngram, not both"),
    ]:
        if not ok:
            raise MlxGemmaError(message)
    from ..decode.sampling import SamplingOptions
    from ..models.quantized_cache import check_kv_options

    SamplingOptions(args.temp, args.top_p, args.top_k, args.min_p)  # the same check as every request's
    thinking_kwargs(args)
    check_kv_options(args.kv_bits, args.kv_group_size)


def model_name(args, source: Optional[str] = None) -> str:
    source = args.model if source is None else source
    if not source:
        from ..checkpoints.default_model import NAME
        return NAME
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else (path.name if path.exists() else source)


def load_embedder(args, model, tokenizer, group):
    """(model, tokenizer) of the server's embedding model, or None: --embedding-model, or --model itself."""
    if getattr(model, "is_embedder", False):
        embedder = (model, tokenizer)
    elif args.embedding_model is None:
        return None
    else:
        from ..checkpoints.loading import load

        embedder = load(args.embedding_model, dtype=args.dtype)
        if not getattr(embedder[0], "is_embedder", False):
            raise MlxGemmaError(f"--embedding-model {args.embedding_model} is not an embedding model (no pooling "
                                "head): give an EmbeddingGemma checkpoint (a sentence-transformers folder)")
    if group is not None:
        raise MlxGemmaError("embeddings are not served across the ranks of mlx.launch (leave --embedding-model "
                            "out there)")
    return embedder


def preload(prompt_cache, model, path, kv_bits=None, kv_group_size=64) -> None:
    """A --prompt-cache-file's caches as the prompt cache's first entry (evaluated here: the scheduler's thread
    cannot evaluate arrays of this one's stream)."""
    import mlx.core as mx

    from ..checkpoints.cache_file import load

    from ..models.quantized_cache import quantize_cache

    caches, tokens = load(path, model)
    quantize_cache(caches, 0, kv_group_size, kv_bits)  # (rows of a batch are all quantized, or none)
    mx.eval([(c.keys, c.values) for c in caches if c.keys is not None])
    prompt_cache.insert(tokens, caches, [])


def warm_constraints(engine) -> None:
    """Build llguidance's view of the tokenizer in the background (seconds for a 262k vocabulary), so that the
    first structured request does not wait for it; nothing without the [structured] extra."""
    import importlib.util
    import threading

    from ..decode.constrained import ll_tokenizer, logits_width

    def warm() -> None:
        try:
            ll_tokenizer(engine.tokenizer, logits_width(engine.model))
        except MlxGemmaError:  # a tokenizer llguidance cannot read: a structured request says so, as a 400
            pass

    if importlib.util.find_spec("llguidance") is not None:
        threading.Thread(target=warm, daemon=True, name="mlxgemma-llguidance").start()


def build(args):
    """The app for these arguments: model loaded, scheduler started."""
    from ..decode.thinking import template_args
    from .app import create_app
    from .engine import Defaults, Engine
    from .prompt_cache import PromptCache
    from .scheduler import Scheduler

    from .ranks import Ranks

    group = launched(args)
    if group is not None and args.pipeline and args.prompt_cache_bytes:
        raise MlxGemmaError("--prompt-cache-bytes with --pipeline: each rank holds caches of its own size, so "
                            "the ranks would evict different entries; bound the prompt cache by entries")
    model, tokenizer = load_for_cli(args, sharded=True)
    text_tokenizer = tokenizer.tokenizer if hasattr(tokenizer, "images_per_prompt") else tokenizer
    chat_args = template_args(text_tokenizer, **thinking_kwargs(args))  # (refused before anything starts)
    cache = PromptCache(args.prompt_cache_size, args.prompt_cache_bytes) if args.prompt_cache_size else None
    if args.kv_bits and is_encoder_decoder(model):
        raise MlxGemmaError("--kv-bits: the server's T5Gemma 2 batches keep float caches (generate takes --kv-bits)")
    for f in args.prompt_cache_file:
        preload(cache, model, f, args.kv_bits, args.kv_group_size)
    embedder = load_embedder(args, model, tokenizer, group)
    draft = load_draft(args)
    if draft is not None and is_encoder_decoder(draft):
        raise MlxGemmaError("--draft-model: the server's draft must be a decoder-only model (a T5Gemma 2 draft "
                            "would encode every request again); generate takes one")
    scheduler = Scheduler(model, text_tokenizer, cache, args.decode_concurrency, args.prefill_step_size, args.kv_bits,
                          args.kv_group_size, args.prompt_lookup_ngram, args.num_draft_tokens, draft,
                          Ranks(group) if group is not None else None, embedder[0] if embedder else None)
    if group is None or group.rank() == 0:
        scheduler.start()  # (the other ranks' loop runs on their main thread: main)
    defaults = Defaults(args.max_tokens, args.temp, args.top_p, args.top_k, args.min_p)
    engine = Engine(model, tokenizer, model_name(args), scheduler, defaults, chat_args, args.model or "", embedder,
                    model_name(args, args.embedding_model) if args.embedding_model else "")
    engine.max_thinking_tokens = args.max_thinking_tokens
    warm_constraints(engine)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    key = args.api_key or os.environ.get("MLXGEMMA_API_KEY")
    return create_app(engine, key, origins, args.max_request_bytes), engine


def main(argv=None) -> int:
    args = configure_parser().parse_args(argv)

    def body() -> int:
        try:
            import uvicorn
        except ImportError:
            raise MlxGemmaError('the server needs its extra: pip install "mlxgemma[server]"') from None
        check_args(args)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app, engine = build(args)
        ranks = engine.scheduler.ranks
        if ranks is not None and not ranks.leader:  # mlx.launch: rank 0 serves, this rank computes alongside
            engine.scheduler.follow()
            return 0
        print(f"[mlxgemma] serving {engine.name} on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
        finally:
            engine.scheduler.stop()
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

"""Generation: the Python API (generate, generate_reply, stream_generate) and `python -m mlxgemma.generate`.

stream_generate prepares a request (decode/prompt.py: text, token ids or chat messages through the
tokenizer's chat template; T5Gemma 2's encoder; Gemma 3's images), prefills it, and decodes it as a batch of
one on the decode core (decode/decoder.py: the same loop the server batches on, speculation included), its
text through decode/stream.py (stop strings never yielded, not even in part) and reply.py (Gemma 4's thoughts
apart from the answer). With no --model it runs the embedded default model.

    python -m mlxgemma.generate --prompt "The capital of France is" --max-tokens 32
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx

from .checkpoints.cache_file import load as load_cache_file
from .cli import (PrefillProgress, add_generation_options, add_structured_options, add_thinking_options, load_draft,
                  load_for_cli, run, sampling_kwargs, structured_kwargs, thinking_kwargs, unescape)
from .decode import constrained
from .decode.decoder import Decoder, Row, fill, last_prompt_step
from .decode.prompt import (Prompt, check_prompt, context_of, encode_request, image_request, processor_options,
                             prompt_ids, prompt_text)
from .decode.proposers import Assistant, DraftModel, PromptLookup
from .decode.sampling import SamplingOptions
from .decode.stream import TextStream
from .errors import MlxGemmaError
from .media.features import media_tokens
from .media.gemma4_images import SUPPORTED_SOFT_TOKENS
from .models import has_vision, is_drafter, is_encoder_decoder
from .models.quantized_cache import check_kv_options, quantize_cache
from .decode.thinking import template_args
from .reply import Call, Reader, Reply, Shown, budgeted, reply_of

__all__ = ["Chunk", "Reply", "generate", "generate_reply", "stream_generate", "prompt_ids", "prompt_text",
           "check_options"]


@dataclass
class Chunk:
    """One step of a stream: new text (possibly empty), the token, its log-probability, why it ended. With
    Gemma 4's thought channel `text` is answer text only: the step's thought text is in `reasoning` (kept when
    thinking is on) and a native tool call, once whole, in `calls` as (name, arguments)."""

    text: str
    token: int
    logprob: float
    finish_reason: Optional[str]  # None while running, then "stop" (eos or stop string) or "length"
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    draft_tokens: int = 0  # speculative decoding: tokens proposed so far, and accepted of them
    accepted_tokens: int = 0
    reasoning: str = ""
    calls: List[Call] = field(default_factory=list)


def check_options(*, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, max_kv_size, seed=None,
                  prefill_step_size=2048, num_draft_tokens=3, prompt_lookup_ngram=None, kv_bits=None,
                  kv_group_size=64, quantized_kv_start=5000) -> SamplingOptions:
    """Every generation option in range (the CLIs call it before loading a model); the sampling options."""
    sampling = SamplingOptions(temp, top_p, top_k, min_p, repetition_penalty, seed)
    check_kv_options(kv_bits, kv_group_size)
    for ok, message in [
        (max_tokens > 0, f"--max-tokens must be positive, got {max_tokens}"),
        (quantized_kv_start >= 0, f"--quantized-kv-start must be >= 0, got {quantized_kv_start}"),
        (prefill_step_size > 0, f"--prefill-step-size must be positive, got {prefill_step_size}"),
        (max_kv_size is None or max_kv_size > 0, f"--max-kv-size must be positive, got {max_kv_size}"),
        (num_draft_tokens > 0, f"--num-draft-tokens must be positive, got {num_draft_tokens}"),
        (prompt_lookup_ngram is None or prompt_lookup_ngram > 0,
         f"--prompt-lookup-ngram must be positive, got {prompt_lookup_ngram}"),
    ]:
        if not ok:
            raise MlxGemmaError(message)
    return sampling


def stream_generate(model, tokenizer, prompt: Prompt, *, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                    stop: Sequence[str] = (), system: Optional[str] = None, chat_template: bool = True,
                    prefill_step_size: int = 2048, max_kv_size: Optional[int] = None, prompt_cache=None,
                    image=None, prompt_progress_callback=None, image_features=None,
                    pan_and_scan: Optional[bool] = None, audio=None, video=None, image_budget: Optional[int] = None,
                    draft_model=None, num_draft_tokens: int = 3,
                    prompt_lookup_ngram: Optional[int] = None, history: Sequence[int] = (),
                    kv_bits: Optional[int] = None, kv_group_size: int = 64,
                    quantized_kv_start: int = 5000, json_schema=None, regex: Optional[str] = None,
                    grammar: Optional[str] = None, choices: Optional[Sequence[str]] = None,
                    think: Optional[bool] = None, chat_template_args: Optional[dict] = None,
                    max_thinking_tokens: Optional[int] = None) -> Iterator[Chunk]:
    """Yield Chunks as tokens are produced. Stops at any eos id of the checkpoint (config.json and
    generation_config.json, e.g. Gemma's <end_of_turn>), at a stop string (never yielded, not even in
    part), or after max_tokens. A seed makes sampling reproducible: the same seed gives the same tokens here,
    in chat and in the server, alone or batched. prompt_cache (model.make_cache()) continues from what it
    already holds: afterwards it holds the prompt and every yielded token (the last one possibly not yet
    fed), so the next call passes only new tokens.

    Image+text models (T5Gemma 2, Gemma 3 with its tower; `tokenizer` is then the processor from
    mlxgemma.load): `image` is one image or a list (paths or PIL images); a prompt without placeholders gets
    one per image in front; pan_and_scan crops wide or tall images as the processor does (Gemma 3). T5Gemma 2
    runs its encoder once and its decoder from the start token; prompt_tokens/prompt_tps describe the encoder
    (images included). Gemma 3 takes token ids with image blocks already expanded plus their image_features
    (get_image_features) too. prompt_progress_callback(done, total) is called as the prompt is prefilled
    (mlx-lm's hook). kv_bits (4 or 8) stores every cache quantized in groups of kv_group_size once it
    holds quantized_kv_start tokens (mlx-lm's options). draft_model or prompt_lookup_ngram decode
    speculatively (num_draft_tokens per step), with the output of plain decoding; history: the tokens a
    prompt_cache already holds (for the draft model and prompt lookup).

    Structured output (mlxgemma[structured]; decode/constrained.py): json_schema (a dict, its JSON text or a
    pydantic model class), regex, grammar (Lark or GBNF) or choices (a list of strings), one at a time, keep
    every token inside the constraint, for greedy and every sampler; a finished output ("stop") is complete,
    one cut by max_tokens ("length") may not be.

    Thinking (Gemma 4): chat_template_args go to the chat template, then think (True/False; None: the
    template's default, off for Gemma 4) sets its enable_thinking. A prompt of token ids was rendered already:
    they then only say whether thoughts are kept. max_thinking_tokens closes a thought after that many tokens
    (counted after the channel's name, `<|channel>thought\n`; the answer goes on after it). Stop strings apply
    to the text as the model writes it, thoughts included."""
    sampling = check_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty, max_kv_size=max_kv_size, seed=seed,
                             prefill_step_size=prefill_step_size, num_draft_tokens=num_draft_tokens,
                             prompt_lookup_ngram=prompt_lookup_ngram, kv_bits=kv_bits, kv_group_size=kv_group_size,
                             quantized_kv_start=quantized_kv_start)
    if (draft_model is not None or prompt_lookup_ngram) and repetition_penalty:
        raise MlxGemmaError("--repetition-penalty is not supported with speculative decoding")
    kv = (kv_bits, kv_group_size, quantized_kv_start)
    text_tokenizer = tokenizer.tokenizer if has_vision(model) or is_encoder_decoder(model) else tokenizer
    constraint = constrained.constraint_for(model, text_tokenizer, json_schema=json_schema, regex=regex,
                                            grammar=grammar, choices=choices)
    args = template_args(text_tokenizer, think, chat_template_args, max_thinking_tokens)
    media = dict(image=image, audio=audio, video=video, pan_and_scan=pan_and_scan, image_budget=image_budget)
    request = _prepare(model, tokenizer, prompt, system, chat_template, media, prompt_cache, max_kv_size,
                       prefill_step_size, prompt_progress_callback, image_features, history, args)
    ids, cache, stats, history, sources = request
    seen = list(history) + list(ids)  # (the prompt's end: does it open a thought?)
    constraint = budgeted(constraint, text_tokenizer, max_thinking_tokens, constrained.logits_width(model), seen)
    proposer, draft_cache = _proposer(model, tokenizer, (prompt, image, system, args), draft_model,
                                      prompt_lookup_ngram, history + ids, max_kv_size, prefill_step_size)
    decoder = Decoder(model, proposer, num_draft_tokens, kv=kv)
    tic = time.perf_counter()
    _fill(model, cache, ids[:-1], prefill_step_size, prompt_progress_callback, kv)
    logits, state = last_prompt_step(model, mx.array(ids[-1:])[None], cache, proposer)
    draft_cache = state if state is not None else draft_cache
    quantize_cache(cache, kv[2], kv[1], kv[0])
    row = Row(sampling.sampler(), list(history) + list(ids), max_tokens, constraint, sources, prompt=len(history) + len(ids))
    stream = TextStream(text_tokenizer, max_tokens=max_tokens, stop=stop, context=context_of(model),
                        position=len(history) + len(ids))
    emitted = [decoder.start(row, logits)]
    stats.setdefault("prompt_tokens", len(ids))
    stats.setdefault("prompt_tps", len(ids) / max(time.perf_counter() - tic, 1e-9))
    reader = Reader(text_tokenizer, seen, args)
    yield from _stream(decoder, row, stream, reader, cache, draft_cache, emitted, stats)


def _prepare(model, tokenizer, prompt, system, chat_template, media, prompt_cache, max_kv_size, step, progress,
             image_features, history, template_args):
    """(ids still to feed, the cache, prompt stats, what the cache holds already, lookup sources)."""
    image, options = media["image"], processor_options(model, tokenizer, media)
    if is_encoder_decoder(model):
        if prompt_cache is not None:
            raise MlxGemmaError("prompt_cache is for decoder-only models; T5Gemma 2 encodes each request afresh")
        encoder_ids, _, ids, cache, stats = encode_request(model, tokenizer, prompt, image, system, max_kv_size,
                                                           template_args)
        return ids, cache, stats, list(history), (encoder_ids,)
    if has_vision(model):
        _, ids, stats = image_request(model, tokenizer, prompt, image, system, chat_template, prompt_cache, step,
                                      progress, image_features, options, template_args, media["audio"],
                                      media["video"])
        return ids, stats.pop("cache"), stats, list(history) + stats.pop("history"), ()
    for kind in ("image", "audio", "video"):
        if media[kind] is not None:
            raise MlxGemmaError(f"{type(model).__name__} is a text-only model: it takes no {kind}")
    ids = prompt_ids(tokenizer, prompt, system, chat_template, **template_args)
    check_prompt(model, ids, prompt_cache[0].offset if prompt_cache else 0)
    cache = prompt_cache if prompt_cache is not None else model.make_cache(max_kv_size=max_kv_size)
    return ids, cache, {}, list(history), ()


def _proposer(model, tokenizer, request, draft_model, ngram, seq, max_kv_size, step):
    """(the proposer of --draft-model or --prompt-lookup-ngram, the draft's cache) or (None, None). A draft
    T5Gemma 2 encodes the request itself."""
    if draft_model is None:
        return (PromptLookup(ngram) if ngram else None), None
    if is_drafter(draft_model):  # Gemma 4's assistant: drafts from the target's states, images and audio too
        return Assistant(draft_model, model), None
    if has_vision(model) and set(media_tokens(model)) & set(seq):
        raise MlxGemmaError("a draft model cannot see images or audio: use --prompt-lookup-ngram with such prompts")
    draft = DraftModel(draft_model)
    if is_encoder_decoder(draft_model):
        prompt, image, system, template_args = request
        _, _, ids, cache, _ = encode_request(draft_model, tokenizer, prompt, image, system, max_kv_size,
                                             template_args)
        return draft, draft.prepare(ids, cache=cache)
    return draft, draft.prepare(seq, max_kv_size, step)


def _fill(model, cache, ids, step, progress, kv) -> None:
    """The prompt but its last token, in chunks that only fill the caches (quantized after each one, as
    mlx-lm's loop does), reporting progress."""
    total = len(ids) + 1
    if progress is not None:
        progress(0, total)
    for start in range(0, len(ids), step):
        fill(model, cache, ids[start:start + step], step)
        quantize_cache(cache, kv[2], kv[1], kv[0])
        if progress is not None:
            progress(min(start + step, len(ids)), total)
        mx.clear_cache()
    if progress is not None:
        progress(total, total)


def _stream(decoder: Decoder, row: Row, stream: TextStream, reader: Reader, cache, draft_cache, emitted,
            stats) -> Iterator[Chunk]:
    """The decoder's tokens as Chunks until the stream finishes, their text read apart by reader. Afterwards
    the cache holds what was fed of the yielded tokens and nothing past them (a check may have accepted tokens
    after a finish)."""
    decoder.add(row, cache, draft_cache)
    tic, n, yielded = time.perf_counter(), 0, row.prompt
    try:
        while True:
            for e in emitted:
                text, finish = stream.add(e.token)
                text, thought, calls = reader.read(text, finish)
                n, yielded = n + 1, yielded + 1
                yield Chunk(text, e.token, e.logprob, finish, reasoning=thought, calls=calls, generation_tokens=n,
                            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
                            peak_memory=mx.get_peak_memory() / 1e9, draft_tokens=row.proposed,
                            accepted_tokens=row.accepted, **stats)
                if finish:
                    return
            emitted = decoder.step(ahead=True)[0]
    finally:
        extra = decoder.held(0) - yielded
        for c in decoder.cache if decoder.cache is not None else ():
            if extra > 0:
                c.rollback([extra])
            c.unmark()


def generate_reply(model, tokenizer, prompt: Prompt, **options) -> Reply:
    """The whole generation read apart (options as for stream_generate): the answer, the thought (Gemma 4
    with thinking on), the finish reason and the native tool calls made."""
    return reply_of(stream_generate(model, tokenizer, prompt, **options))


def generate(model, tokenizer, prompt: Prompt, *, parse: bool = False, **options):
    """The whole answer as one string (options as for stream_generate; Gemma 4's thoughts are left out:
    generate_reply has them). parse=True with json_schema= returns it parsed (a pydantic model instance for a
    pydantic schema), and one cut by max_tokens is an error."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **options):
        text += last.text
    if not parse:
        return text
    if options.get("json_schema") is None:
        raise MlxGemmaError("parse=True parses a json_schema= generation; none was given")
    if last is not None and last.finish_reason == "length":
        raise MlxGemmaError(f"the JSON was cut at max_tokens={options.get('max_tokens', 256)}: raise it")
    return constrained.parse_json(text, options["json_schema"])


def continuation(model, tokenizer, text: str, path, image=None, max_kv_size=None) -> dict:
    """stream_generate's arguments for a prompt that continues a prompt-cache file: its caches, the ids
    they hold (history), and the new text as ids (no <bos>, no template: it continues the cached text)."""
    if image and not has_vision(model):
        raise MlxGemmaError(f"{type(model).__name__} is a text-only model: it takes no image")
    if not text:
        raise MlxGemmaError("the prompt is empty: give the text that follows the cached prompt")
    cache, held = load_cache_file(path, model, max_kv_size)
    out = dict(prompt_cache=cache, history=held)
    if has_vision(model):
        from .media.features import encode_prompt

        images = tokenizer.images_per_prompt(image, 1)[0] if image else []
        if images and tokenizer.marks["image"] not in text:
            text = tokenizer.marks["image"] * len(images) + text
        out["prompt"], out["image_features"] = encode_prompt(model, tokenizer, text, images, add_special_tokens=False)
        out["image"] = None  # encoded: the features stand in for the images
    else:
        out["prompt"] = list(tokenizer.encode(text, add_special_tokens=False))
    return out


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.generate", description="Generate text with a Gemma model.")
    add_generation_options(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; - reads standard input")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable; backslash escapes work: "
                   "--stop '\\n\\n' stops at a blank line")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk "
                   "(default: %(default)s)")
    p.add_argument("--image", action="append", default=None,
                   help="image file, repeatable (image+text models: Gemma 3 4B and up, Gemma 4, T5Gemma 2); the "
                        "prompt's placeholders (<start_of_image>; Gemma 4: <|image|>) mark where each goes, else "
                        "they go first")
    p.add_argument("--audio", action="append", default=None,
                   help="audio file (WAV, FLAC, MP3, M4A, OGG), repeatable (Gemma 4 E2B/E4B); <|audio|> in the "
                        "prompt marks where each goes, else they go first")
    p.add_argument("--video", action="append", default=None,
                   help="video file, repeatable (Gemma 4): 32 frames sampled evenly, each with its timestamp; "
                        "<|video|> in the prompt marks where each goes, else they go first")
    p.add_argument("--image-budget", type=int, default=None, choices=SUPPORTED_SOFT_TOKENS,
                   help="Gemma 4: soft tokens per image (more sees finer detail; default: the checkpoint's, 280)")
    p.add_argument("--pan-and-scan", action="store_true", default=None,
                   help="also show Gemma 3 crops of a wide or tall image (the processor's pan-and-scan)")
    add_structured_options(p)
    add_thinking_options(p, "thoughts go to standard error")
    return p


def summary(last: Chunk) -> str:
    """The line after a generation: prompt and generation sizes and speeds, memory, the draft's acceptance.
    One token has no speed to speak of (it is timed from itself): its rate is left out."""
    def rate(n, tps):
        return f"{n} token{'s' if n != 1 else ''}" + (f", {tps:.1f} tokens/s" if n > 1 else "")
    return (f"prompt: {rate(last.prompt_tokens, last.prompt_tps)} | generation: "
            f"{rate(last.generation_tokens, last.generation_tps)} | peak memory: {last.peak_memory:.3f} GB"
            + _draft_summary(last))


def _draft_summary(last: Chunk) -> str:
    if not last.draft_tokens:
        return ""
    return (f" | draft: {last.accepted_tokens}/{last.draft_tokens} tokens accepted "
            f"({100 * last.accepted_tokens / last.draft_tokens:.0f}%)")


def read_prompt(arg: Optional[str]) -> str:
    if arg is None:
        raise MlxGemmaError("no prompt: pass --prompt TEXT (or --prompt - to read standard input)")
    if arg != "-":
        return arg
    raw = getattr(sys.stdin, "buffer", None)  # bytes, decoded strictly here (a text stream is taken as it is)
    if raw is None:
        return sys.stdin.read()
    try:
        return raw.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxGemmaError(f"standard input is not UTF-8 text (byte {e.start})") from None


def main(argv=None) -> int:
    args = configure_parser().parse_args(argv)
    options = sampling_kwargs(args)

    def body() -> int:
        prompt, structured, thinking = read_prompt(args.prompt), structured_kwargs(args), thinking_kwargs(args)
        if not prompt.strip() and not (args.image or args.audio or args.video or args.prompt_cache_file):
            raise MlxGemmaError("the prompt is empty: give some text")
        constrained.grammar_of(**structured)  # a bad constraint fails before the model loads
        check_options(**options, prefill_step_size=args.prefill_step_size)
        model, tokenizer = load_for_cli(args, sharded=True)
        draft = load_draft(args)
        cached = continuation(model, tokenizer, prompt, args.prompt_cache_file, args.image, args.max_kv_size) \
            if args.prompt_cache_file else {}
        prompt, image = cached.pop("prompt", prompt), cached.pop("image", args.image)
        last, shown = None, Shown(hide=args.hide_thinking)
        try:
            for last in stream_generate(model, tokenizer, prompt, **options, **cached, **structured, **thinking,
                                        draft_model=draft, stop=[unescape(s) for s in args.stop],
                                        system=args.system, chat_template=not args.ignore_chat_template,
                                        prefill_step_size=args.prefill_step_size, image=image, audio=args.audio,
                                        video=args.video,
                                        image_budget=args.image_budget,
                                        **({"pan_and_scan": True} if args.pan_and_scan else {}),
                                        prompt_progress_callback=PrefillProgress(args.prefill_step_size)):
                shown.write(last)
        finally:
            shown.close()  # (a terminal left dim by Ctrl-C in a thought would stay so)
        print()
        if last is not None:
            print(summary(last), file=sys.stderr)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

"""Generation: the Python API (generate, stream_generate) and `python -m mlxgemma.generate`.

The decode loop, samplers, logits processors and streaming detokenizer (which never splits a multi-byte
character) are mlx-lm's. This module prepares prompts (text, token ids or chat messages, through the
tokenizer's chat template), checks them and the options, applies stop strings without ever yielding part
of one, and runs the embedded default model when no --model is given.

    python -m mlxgemma.generate --prompt "The capital of France is" --max-tokens 32
"""

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .decode import constrained
from .checkpoints.cache_file import continuation
from .cli import (PrefillProgress, add_generation_options, add_structured_options, load_draft, load_for_cli, run,
                  sampling_kwargs, structured_kwargs)
from .errors import MlxGemmaError
from .models import has_vision, is_encoder_decoder

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class Chunk:
    """One step of a stream: new text (possibly empty), the token, its log-probability, why it ended."""

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


def prompt_ids(tokenizer, prompt: Prompt, system: Optional[str] = None, chat_template: bool = True) -> List[int]:
    """Token ids for a prompt: text (wrapped in the chat template when the tokenizer has one and
    chat_template is True), chat messages [{"role", "content"}], or token ids as they are."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise MlxGemmaError("the prompt is empty: give some text")
        if chat_template and getattr(tokenizer, "chat_template", None):
            return apply_template(tokenizer, _with_system(system, [{"role": "user", "content": prompt}]))
        return list(tokenizer.encode(_raw_text(system, prompt)))
    prompt = list(prompt)
    if not prompt:
        raise MlxGemmaError("the prompt is empty: give some text, token ids or messages")
    if all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if isinstance(m.get("content"), str):
                check_text(m["content"], "a message")
        return apply_template(tokenizer, _with_system(system, prompt))
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise MlxGemmaError("a prompt is text, a list of token ids or a list of chat messages")
    return prompt


def check_text(text: str, what: str) -> None:
    """Text that cannot be UTF-8 (lone surrogates: how Python decodes invalid bytes in a command line) is
    refused here, before a tokenizer or template fails on it with a misleading error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MlxGemmaError(f"{what} is not valid UTF-8 text (at character {e.start})") from None


def _with_system(system: Optional[str], messages) -> list:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def _raw_text(system: Optional[str], prompt: str) -> str:
    return f"{system}\n\n{prompt}" if system else prompt


def apply_template(tokenizer, messages, tokenize: bool = True, **template_args):
    """The chat template on messages, with the generation prompt; template_args go to the template."""
    if not getattr(tokenizer, "chat_template", None):
        raise MlxGemmaError("chat messages need a tokenizer with a chat template; this one has none")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, **template_args)
    except Exception as e:  # jinja raises its own errors (e.g. roles out of order)
        raise MlxGemmaError(f"the chat template rejected the messages: {str(e).splitlines()[0]}") from None
    if not tokenize:
        return ids
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def check_options(*, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, max_kv_size, seed=None,
                  prefill_step_size=2048, num_draft_tokens=3, prompt_lookup_ngram=None, kv_bits=None,
                  kv_group_size=64, quantized_kv_start=5000):
    """Every generation option in range (the CLIs call it before loading a model)."""
    from .models.quantized_cache import check_kv_options

    check_kv_options(kv_bits, kv_group_size)
    if quantized_kv_start < 0:
        raise MlxGemmaError(f"--quantized-kv-start must be >= 0, got {quantized_kv_start}")
    for ok, message in [
        (seed is None or 0 <= seed < 2**64, f"--seed must be in 0..2^64-1, got {seed}"),
        (max_tokens > 0, f"--max-tokens must be positive, got {max_tokens}"),
        (temp >= 0, f"--temp must be >= 0, got {temp}"),
        (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"--top-k must be >= 0, got {top_k}"),
        (0 <= min_p <= 1, f"--min-p must be in [0, 1], got {min_p}"),
        (repetition_penalty is None or repetition_penalty > 0,
         f"--repetition-penalty must be > 0, got {repetition_penalty}"),
        (prefill_step_size > 0, f"--prefill-step-size must be positive, got {prefill_step_size}"),
        (max_kv_size is None or max_kv_size > 0, f"--max-kv-size must be positive, got {max_kv_size}"),
        (num_draft_tokens > 0, f"--num-draft-tokens must be positive, got {num_draft_tokens}"),
        (prompt_lookup_ngram is None or prompt_lookup_ngram > 0,
         f"--prompt-lookup-ngram must be positive, got {prompt_lookup_ngram}"),
    ]:
        if not ok:
            raise MlxGemmaError(message)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (so must not be shown yet)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


def stream_generate(model, tokenizer, prompt: Prompt, *, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                    stop: Sequence[str] = (), system: Optional[str] = None, chat_template: bool = True,
                    prefill_step_size: int = 2048, max_kv_size: Optional[int] = None, prompt_cache=None,
                    image=None, prompt_progress_callback=None, image_features=None,
                    pan_and_scan: Optional[bool] = None, draft_model=None, num_draft_tokens: int = 3,
                    prompt_lookup_ngram: Optional[int] = None, history: Sequence[int] = (),
                    kv_bits: Optional[int] = None, kv_group_size: int = 64,
                    quantized_kv_start: int = 5000, json_schema=None, regex: Optional[str] = None,
                    grammar: Optional[str] = None, choices: Optional[Sequence[str]] = None) -> Iterator[Chunk]:
    """Yield Chunks as tokens are produced. Stops at any eos id of the checkpoint (config.json and
    generation_config.json, e.g. Gemma's <end_of_turn>), at a stop string (never yielded, not even in
    part), or after max_tokens. A seed makes sampling reproducible. prompt_cache (model.make_cache())
    continues from what it already holds: afterwards it holds the prompt and every yielded token, so the
    next call passes only new tokens.

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

    Structured output (mlxgemma[structured]; constrained.py): json_schema (a dict, its JSON text or a pydantic
    model class), regex, grammar (Lark or GBNF) or choices (a list of strings), one at a time, keep every token
    inside the constraint, for greedy and every sampler; a finished output ("stop") is complete, one cut by
    max_tokens ("length") may not be."""
    from mlx_lm.generate import stream_generate as mlx_lm_stream
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_options(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                  repetition_penalty=repetition_penalty, max_kv_size=max_kv_size, seed=seed,
                  prefill_step_size=prefill_step_size,
                  num_draft_tokens=num_draft_tokens, prompt_lookup_ngram=prompt_lookup_ngram, kv_bits=kv_bits,
                  kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    if seed is not None:
        mx.random.seed(seed)
    request = (prompt, image, system, tokenizer)  # as given (a draft T5Gemma 2 encodes it too)
    spec = dict(json_schema=json_schema, regex=regex, grammar=grammar, choices=choices)
    text_tokenizer = tokenizer.tokenizer if has_vision(model) or is_encoder_decoder(model) else tokenizer
    constraint = constrained.constraint_for(model, text_tokenizer, **spec)
    if pan_and_scan and not has_vision(model):
        raise MlxGemmaError(f"pan-and-scan crops images for Gemma 3; {type(model).__name__} does not take them so")
    if is_encoder_decoder(model):
        if prompt_cache is not None:
            raise MlxGemmaError("prompt_cache is for decoder-only models; T5Gemma 2 encodes each request afresh")
        model, tokenizer, ids, prompt_cache, encoder_stats = _encode_request(
            model, tokenizer, prompt, image, system, max_kv_size)
    elif has_vision(model):
        tokenizer, ids, encoder_stats = _image_request(model, tokenizer, prompt, image, system, chat_template,
                                                       prompt_cache, prefill_step_size, prompt_progress_callback,
                                                       image_features, pan_and_scan)
        prompt_cache, prompt_progress_callback = encoder_stats.pop("cache"), None
        history = list(history) + encoder_stats.pop("history")  # in the cache already: for the proposers
    else:
        if image is not None:
            raise MlxGemmaError(f"{type(model).__name__} is a text-only model: it takes no image")
        ids, encoder_stats = _decoder_prompt(model, tokenizer, prompt, system, chat_template, prompt_cache), {}
        if prompt_cache is None and hasattr(model, "make_cache"):
            prompt_cache = model.make_cache(max_kv_size=max_kv_size)
    if draft_model is not None or prompt_lookup_ngram:
        steps = _speculative(model, tokenizer, ids, prompt_cache, encoder_stats, request, draft_model,
                             num_draft_tokens, prompt_lookup_ngram, history,
                             dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p), repetition_penalty,
                             max_tokens, prefill_step_size, max_kv_size, (kv_bits, kv_group_size, quantized_kv_start),
                             constraint)
        yield from _chunks(steps, stop, encoder_stats)
        return
    sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1 else 0.0, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else []
    if constraint is not None:  # last: nothing after it may lift its -inf
        processors.append(constrained.LogitsProcessor(constraint, len(ids)))
    steps = mlx_lm_stream(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler,
                          logits_processors=processors or None, prefill_step_size=prefill_step_size,
                          prompt_cache=prompt_cache, prompt_progress_callback=prompt_progress_callback,
                          kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    yield from _chunks(steps, stop, encoder_stats)


def _speculative(model, tokenizer, ids, cache, stats, request, draft_model, num_draft, ngram, history, sampling,
                 repetition_penalty, max_tokens, step, max_kv_size, kv, constraint):
    """The speculative loop (speculative.py) on what stream_generate prepared: a draft model (its own
    caches, fresh; T5Gemma 2's encodes the request too) or prompt lookup over the prompt and the output
    (T5Gemma 2: and the encoder's ids)."""
    from .decode import speculative

    if repetition_penalty:
        raise MlxGemmaError("--repetition-penalty is not supported with speculative decoding")
    sampler, draft = speculative.Sampler(**sampling), None
    if draft_model is not None:
        if has_vision(model) and model.config.image_token_index in list(history) + list(ids):
            raise MlxGemmaError("a draft model cannot see images: use --prompt-lookup-ngram with image prompts")
        if is_encoder_decoder(draft_model):
            prompt, image, system, processor = request
            draft_view, _, _, draft_cache, _ = _encode_request(draft_model, processor, prompt, image, system,
                                                               max_kv_size)
        else:
            draft_view, draft_cache = draft_model, draft_model.make_cache(max_kv_size=max_kv_size)
        draft = speculative.Draft(draft_view, draft_cache, sampler)
    return speculative.stream(model, tokenizer, ids, cache, sampler=sampler, draft=draft, ngram=ngram or 0,
                              num_draft=num_draft, max_tokens=max_tokens, prefill_step_size=step,
                              history=history, sources=(getattr(model, "encoder_ids", []),), kv=kv,
                              constraint=constraint)


def _decoder_prompt(model, tokenizer, prompt, system, chat_template, prompt_cache) -> List[int]:
    ids = prompt_ids(tokenizer, prompt, system, chat_template)
    check_prompt(model, ids, prompt_cache[0].offset if prompt_cache else 0)
    return ids


def check_prompt(model, ids: List[int], seen: int = 0) -> None:
    """Token ids that fit a decoder-only model's context (after `seen` cached tokens) and vocabulary."""
    config = getattr(model, "config", None)
    _check_ids(ids, getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None), seen)


def _check_ids(ids, context, vocab, seen: int = 0) -> None:
    if context and seen + len(ids) >= context:
        raise MlxGemmaError(f"the prompt has {seen + len(ids)} tokens but the model's context is {context}: shorten it")
    if vocab and (min(ids) < 0 or max(ids) >= vocab):
        raise MlxGemmaError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is outside the vocabulary (0..{vocab - 1})")


def _chunks(steps, stop: Sequence[str], override: dict) -> Iterator[Chunk]:
    """mlx-lm's responses as Chunks, holding back text that could still become a stop string."""
    text = ""
    for r in steps:
        stats = dict(prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps, generation_tokens=r.generation_tokens,
                     generation_tps=r.generation_tps, peak_memory=r.peak_memory,
                     draft_tokens=getattr(r, "proposed", 0), accepted_tokens=getattr(r, "accepted", 0))
        stats.update(override)
        text += r.text
        logprob = r.logprobs[r.token].item()
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            yield Chunk(text[: min(hits)], r.token, logprob, "stop", **stats)
            return
        shown = len(text) - _held_back(text, stop) if r.finish_reason is None else len(text)
        yield Chunk(text[:shown], r.token, logprob, r.finish_reason, **stats)
        text = text[shown:]
        if r.finish_reason is not None:
            return


class _DecoderView:
    """What mlx-lm's generate loop drives (model(tokens, cache=...), layers): T5Gemma 2's decoder, with the
    encoder's output held in the cache (its keys and values computed once per request)."""

    def __init__(self, model, encoder_ids=()):
        self.model, self.layers, self.encoder_ids = model, model.layers, list(encoder_ids)

    def __call__(self, inputs, cache=None, **_):
        return self.model.decode_step(inputs, cache=cache)


def _encode_request(model, processor, prompt, image, system, max_kv_size):
    """Encoder inputs from text (+ images), the encoder run once (timed), and the decoder's cache."""
    images = processor.images_per_prompt(image, 1)[0]  # one image or a list; an empty list is refused
    if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
        if isinstance(prompt, str):
            if not prompt.strip() and not images:
                raise MlxGemmaError("the prompt is empty: give some text or an image")
            text = _raw_text(system, prompt)
        else:
            text = apply_template(processor.tokenizer, _with_system(system, prompt), tokenize=False)
        if images and processor.boi_token not in text:
            text = processor.boi_token * len(images) + text  # one placeholder per image, in front
        inputs = processor(text, images or None)
    elif prompt and all(isinstance(t, int) for t in prompt):  # encoder ids, already expanded
        inputs = {"input_ids": np.array([list(prompt)])}
        if images:
            inputs["pixel_values"] = processor.preprocess(images)
    else:
        raise MlxGemmaError("a prompt is text, a list of token ids or a list of chat messages")
    ids = inputs["input_ids"][0].tolist()
    config = model.config
    _check_ids(ids, config.encoder.text_config.max_position_embeddings, config.vocab_size)
    start = time.perf_counter()
    encoded = model.encode(mx.array(inputs["input_ids"]), pixel_values=inputs.get("pixel_values"))
    cache = model.make_cache(encoded, max_kv_size)  # evaluates the encoder and the cross keys/values
    seconds = time.perf_counter() - start
    stats = dict(prompt_tokens=len(ids), prompt_tps=len(ids) / seconds)
    return _DecoderView(model, ids), processor.tokenizer, [config.decoder.bos_token_id], cache, stats


def _image_request(model, processor, prompt, image, system, chat_template, prompt_cache, step, progress,
                   features, pan_and_scan):
    """Gemma 3 with images: the prompt expanded, every token but the last prefilled here (image blocks kept
    whole, which mlx-lm's fixed chunks would not), the last one left to mlx-lm's loop."""
    from .media.images import encode_prompt, prefill

    images = processor.images_per_prompt(image, 1)[0] if image is not None else []
    options = {} if pan_and_scan is None else {"do_pan_and_scan": pan_and_scan}
    if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
        if images and isinstance(prompt, str) and processor.boi_token not in prompt:
            prompt = processor.boi_token * len(images) + prompt  # one placeholder per image, in front
        text = prompt_text(processor.tokenizer, prompt, system, chat_template)
        ids, features = encode_prompt(model, processor, text, images, **options)
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)  # expanded already; images as pixels or as features
        if images:
            from .media.images import FEATURES

            features = FEATURES.encode(model, processor.preprocess(images, **options))
    else:
        raise MlxGemmaError("a prompt is text, a list of token ids or a list of chat messages")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    check_prompt(model, ids, cache[0].offset)
    if ids[-1] == model.config.image_token_index:
        raise MlxGemmaError("the prompt ends inside an image: an image block ends with its end-of-image token")
    start = time.perf_counter()
    if len(ids) > 1:
        prefill(model, cache, ids[:-1], features, step, progress)
    seconds = time.perf_counter() - start
    return processor.tokenizer, ids[-1:], dict(prompt_tokens=len(ids), prompt_tps=len(ids) / max(seconds, 1e-9),
                                               cache=cache, history=ids[:-1])


def prompt_text(tokenizer, prompt, system, chat_template: bool) -> str:
    """The prompt as text: through the chat template (when it has one and chat_template) or as written."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise MlxGemmaError("the prompt is empty: give some text")
        if not (chat_template and getattr(tokenizer, "chat_template", None)):
            return _raw_text(system, prompt)
        prompt = [{"role": "user", "content": prompt}]
    return apply_template(tokenizer, _with_system(system, prompt), tokenize=False)


def generate(model, tokenizer, prompt: Prompt, *, parse: bool = False, **options):
    """The whole completion as one string (options as for stream_generate). parse=True with json_schema=
    returns it parsed (a pydantic model instance for a pydantic schema), and one cut by max_tokens is an error."""
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


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.generate", description="Generate text with a Gemma model.")
    add_generation_options(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; - reads standard input")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--image", action="append", default=None,
                   help="image file, repeatable (image+text models: Gemma 3 4B and up, T5Gemma 2); the prompt's "
                        "<start_of_image> placeholders mark where each goes, else they go first")
    p.add_argument("--pan-and-scan", action="store_true", default=None,
                   help="also show Gemma 3 crops of a wide or tall image (the processor's pan-and-scan)")
    add_structured_options(p)
    return p


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
        prompt, structured = read_prompt(args.prompt), structured_kwargs(args)
        constrained.grammar_of(**structured)  # a bad constraint fails before the model loads
        check_options(**options, prefill_step_size=args.prefill_step_size)
        model, tokenizer = load_for_cli(args, sharded=True)
        draft = load_draft(args)
        cached = continuation(model, tokenizer, prompt, args.prompt_cache_file, args.image, args.max_kv_size) \
            if args.prompt_cache_file else {}
        prompt, image = cached.pop("prompt", prompt), cached.pop("image", args.image)
        last = None
        for last in stream_generate(model, tokenizer, prompt, **options, **cached, **structured, draft_model=draft,
                                    stop=args.stop,
                                    system=args.system,
                                    chat_template=not args.ignore_chat_template,
                                    prefill_step_size=args.prefill_step_size, image=image,
                                    **({"pan_and_scan": True} if args.pan_and_scan else {}),
                                    prompt_progress_callback=PrefillProgress(args.prefill_step_size)):
            print(last.text, end="", flush=True)
        print()
        if last is not None:
            print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | generation: "
                  f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | peak memory: "
                  f"{last.peak_memory:.3f} GB" + _draft_summary(last), file=sys.stderr)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

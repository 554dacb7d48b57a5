"""Requests into token ids and caches: text, token ids or chat messages through the tokenizer's chat template,
checked against the model's context and vocabulary; T5Gemma 2's encoder run once; Gemma 3's image prompts
expanded and prefilled with their image blocks whole."""

import time
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..errors import MlxGemmaError

Prompt = Union[str, Sequence[int], Sequence[dict]]


def context_of(model) -> Optional[int]:
    """The decoder's context (max_position_embeddings), or None when the config states none."""
    config = getattr(model, "config", None)
    decoder = getattr(config, "decoder", None)  # T5Gemma 2
    return getattr(decoder if decoder is not None else config, "max_position_embeddings", None)


def prompt_ids(tokenizer, prompt: Prompt, system: Optional[str] = None, chat_template: bool = True,
               **template_args) -> List[int]:
    """Token ids for a prompt: text (wrapped in the chat template when the tokenizer has one and
    chat_template is True), chat messages [{"role", "content"}], or token ids as they are. template_args go to
    the chat template (enable_thinking, ...)."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise MlxGemmaError("the prompt is empty: give some text")
        if chat_template and getattr(tokenizer, "chat_template", None):
            return apply_template(tokenizer, with_system(system, [{"role": "user", "content": prompt}]),
                                  **template_args)
        return list(tokenizer.encode(raw_text(system, prompt)))
    prompt = list(prompt)
    if not prompt:
        raise MlxGemmaError("the prompt is empty: give some text, token ids or messages")
    if all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if isinstance(m.get("content"), str):
                check_text(m["content"], "a message")
        return apply_template(tokenizer, with_system(system, prompt), **template_args)
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


def with_system(system: Optional[str], messages) -> list:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def raw_text(system: Optional[str], prompt: str) -> str:
    return f"{system}\n\n{prompt}" if system else prompt


def apply_template(tokenizer, messages, tokenize: bool = True, **template_args):
    """The chat template on messages, with the generation prompt; template_args go to the template, and what
    they leave out is the template's own default (as transformers renders it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MlxGemmaError("chat messages need a tokenizer with a chat template; this one has none (a base model, which "
                            "continues text): give the text to continue as the prompt, or load an instruction-tuned "
                            "checkpoint")
    try:
        ids = _renderer(tokenizer).apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize,
                                                       return_dict=False, **template_args)
    except Exception as e:  # jinja raises its own errors (e.g. roles out of order)
        raise MlxGemmaError(f"the chat template rejected the messages: {str(e).splitlines()[0]}") from None
    if not tokenize:
        return ids
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _renderer(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper: the wrapper sets enable_thinking, when a
    caller does not, to whether the vocabulary has thinking tokens (on for Gemma 4, whose template's default is
    off). A wrapper with a renderer of its own (chat_template=) keeps it."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if not isinstance(tokenizer, TokenizerWrapper) or tokenizer._chat_template is not None:
        return tokenizer
    return tokenizer._tokenizer


def prompt_text(tokenizer, prompt, system, chat_template: bool, **template_args) -> str:
    """The prompt as text: through the chat template (when it has one and chat_template) or as written."""
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise MlxGemmaError("the prompt is empty: give some text")
        if not (chat_template and getattr(tokenizer, "chat_template", None)):
            return raw_text(system, prompt)
        prompt = [{"role": "user", "content": prompt}]
    return apply_template(tokenizer, with_system(system, prompt), tokenize=False, **template_args)


def check_prompt(model, ids: List[int], seen: int = 0) -> None:
    """Token ids that fit a decoder-only model's context (after `seen` cached tokens) and vocabulary."""
    config = getattr(model, "config", None)
    check_ids(ids, getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None), seen)


def check_ids(ids, context, vocab, seen: int = 0) -> None:
    if context and seen + len(ids) >= context:
        raise MlxGemmaError(f"the prompt has {seen + len(ids)} tokens but the model's context is {context}: shorten it")
    if vocab and (min(ids) < 0 or max(ids) >= vocab):
        raise MlxGemmaError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is outside the vocabulary (0..{vocab - 1})")


def encode_request(model, processor, prompt, image, system, max_kv_size, template_args: Optional[dict] = None):
    """(the encoder's ids, the text tokenizer, the decoder's first ids, its cache, the encoder's stats): the
    encoder inputs from text (+ images), the encoder run once (timed)."""
    images = processor.images_per_prompt(image, 1)[0]  # one image or a list; an empty list is refused
    if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
        if isinstance(prompt, str):
            if not prompt.strip() and not images:
                raise MlxGemmaError("the prompt is empty: give some text or an image")
            text = raw_text(system, prompt)
        else:
            text = apply_template(processor.tokenizer, with_system(system, prompt), tokenize=False,
                                  **(template_args or {}))
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
    check_ids(ids, config.encoder.text_config.max_position_embeddings, config.vocab_size)
    start = time.perf_counter()
    encoded = model.encode(mx.array(inputs["input_ids"]), pixel_values=inputs.get("pixel_values"))
    cache = model.make_cache(encoded, max_kv_size)  # evaluates the encoder and the cross keys/values
    seconds = time.perf_counter() - start
    stats = dict(prompt_tokens=len(ids), prompt_tps=len(ids) / seconds)
    return ids, processor.tokenizer, [config.decoder.bos_token_id], cache, stats


def with_marks(processor, prompt: str, media: dict) -> str:
    """A prompt without placeholders gets one per item in front (images, then audio, then videos)."""
    front = "".join(processor.marks[kind] * len(items) for kind, items in media.items()
                    if items and processor.marks.get(kind) not in prompt)
    return front + prompt


def image_request(model, processor, prompt, image, system, chat_template, prompt_cache, step, progress,
                  features, options: dict, template_args: Optional[dict] = None, audio=None, video=None):
    """A decoder with media (Gemma 3's images; Gemma 4's images, audio and video): the prompt expanded, every
    token but the last prefilled here (media blocks kept whole, which fixed chunks would not), the last one
    left to the decoding loop. options go to the processor (pan-and-scan, the image budget)."""
    from ..media.features import encode_prompt, listed, media_tokens, prefill

    media = {"image": processor.images_per_prompt(image, 1)[0] if image is not None else [],
             "audio": listed(audio), "video": listed(video)}
    for kind in ("audio", "video"):
        if media[kind] and kind not in processor.marks:
            raise MlxGemmaError(f"{type(model).__name__} takes images only: no {kind}")
    if isinstance(prompt, str) or (prompt and all(isinstance(m, dict) for m in prompt)):
        if isinstance(prompt, str):
            prompt = with_marks(processor, prompt, media)
        text = prompt_text(processor.tokenizer, prompt, system, chat_template, **(template_args or {}))
        ids, features = encode_prompt(model, processor, text, media["image"], media["audio"], media["video"],
                                      **options)
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)  # expanded already; media as their features (or, for Gemma 3, images as pixels)
        if media["audio"] or media["video"] or (media["image"] and not hasattr(processor, "preprocess")):
            raise MlxGemmaError("a prompt of token ids takes its media as image_features (encode_prompt's), "
                                "or give the prompt as text")
        if media["image"]:
            from ..media.features import FEATURES

            features = FEATURES.encode(model, processor.preprocess(media["image"], **options))
    else:
        raise MlxGemmaError("a prompt is text, a list of token ids or a list of chat messages")
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    check_prompt(model, ids, cache[0].offset)
    if ids[-1] in media_tokens(model):
        raise MlxGemmaError("the prompt ends inside an image or a clip: a media block ends with its end token")
    start = time.perf_counter()
    if len(ids) > 1:
        prefill(model, cache, ids[:-1], features, step, progress)
    seconds = time.perf_counter() - start
    return processor.tokenizer, ids[-1:], dict(prompt_tokens=len(ids), prompt_tps=len(ids) / max(seconds, 1e-9),
                                               cache=cache, history=ids[:-1])


def processor_options(model, processor, media: dict) -> dict:
    """A request's per-call processor options: Gemma 3's pan-and-scan, Gemma 4's image budget (soft tokens)."""
    options = {}
    if media.get("pan_and_scan"):
        if not getattr(processor, "supports_pan_and_scan", False):
            raise MlxGemmaError(f"pan-and-scan crops images for Gemma 3; {type(model).__name__} does not take them so")
        options["do_pan_and_scan"] = True
    elif media.get("pan_and_scan") is False and getattr(processor, "supports_pan_and_scan", False):
        options["do_pan_and_scan"] = False
    if media.get("image_budget") is not None:
        if not hasattr(processor, "image_processor"):
            raise MlxGemmaError(f"an image budget sets Gemma 4's soft tokens per image; {type(model).__name__} "
                                "takes none")
        options["max_soft_tokens"] = media["image_budget"]
    return options

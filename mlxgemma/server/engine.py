"""What both APIs share: the loaded model and its scheduler, requests turned into token ids (chat template,
images from data URLs or base64), and the scheduler's events as an async stream for a handler."""

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional


from ..decode.constrained import Constraint, grammar_of, logits_width
from ..errors import MlxGemmaError
from ..decode.prompt import apply_template, check_prompt, check_text
from ..decode.sampling import SamplingOptions
from ..decode.thinking import ThinkingBudget, has_channel, opens_thought, think_args, thinking_on
from ..models import has_vision, is_encoder_decoder
from ..media.features import media_key, media_tokens
from ..media.processor import decode_image
from .scheduler import Request, Scheduler
from .schemas import RequestError
from .tools import conversation

MAX_IMAGES = 16


@dataclass
class Defaults:
    """The server's sampling defaults (its command line), for fields a request leaves out."""

    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0


@dataclass
class Prompt:
    ids: List[int]  # the decoder's prompt (T5Gemma 2: its start token)
    encoder: Optional[dict] = None  # T5Gemma 2: input_ids, pixel_values
    images: list = field(default_factory=list)
    media: Optional[list] = None  # the processed items of `ids`' blocks, in order (media/features.py)
    key: Optional[List[int]] = None  # with media: what the prompt cache matches (media_key)
    channel: bool = False  # the template has a thought channel (Gemma 4): the output is read apart
    thinking: bool = False  # thinking is on (thoughts are the reasoning; off, they are dropped)
    in_thought: bool = False  # the prompt ends inside an open thought


def inline_bytes(url: str, kind: str = "image") -> bytes:
    """The bytes of a data: URL or of bare base64 (Ollama) of an image (or a video). Never a file or a fetch."""
    param, a = f"{kind}_url", "an" if kind == "image" else "a"
    if url.startswith(("http://", "https://", "file:", "/", "./")):
        raise RequestError(f"{kind}s are accepted only inline: send a data URL (data:{kind}/...;base64,...); "
                           "this server never fetches URLs or reads files", param=param)
    if url.startswith("data:"):
        header, _, url = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{a} {kind} data URL must be base64 (data:{kind}/...;base64,...)", param=param)
    try:
        return base64.b64decode(url, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{a} {kind} is not valid base64", param=param) from None


class Engine:
    def __init__(self, model, tokenizer, name: str, scheduler: Scheduler, defaults: Defaults,
                 template_args: Optional[dict] = None, source: str = "", embedder=None, embedding_name: str = ""):
        """embedder: (model, tokenizer) of the embedding model (the model itself when it is one)."""
        self.model, self.name, self.scheduler, self.defaults = model, name, scheduler, defaults
        self.embedder, self.embedding_name = embedder, embedding_name or name
        self.generates = not getattr(model, "is_embedder", False)
        self.encoder_decoder, self.vision = is_encoder_decoder(model), has_vision(model)
        self.processor = tokenizer if self.takes_images else None
        self.tokenizer = tokenizer.tokenizer if self.takes_images else tokenizer
        self.template_args, self.source, self.created = template_args or {}, source, int(time.time())
        self.max_thinking_tokens: Optional[int] = None  # --max-thinking-tokens

    @property
    def takes_images(self) -> bool:
        return self.encoder_decoder or self.vision

    @property
    def takes_audio(self) -> bool:
        """Gemma 4 E2B/E4B: input_audio parts (Ollama's /api/show says "audio")."""
        return "audio" in getattr(self.processor, "marks", {}) and self.processor.feature_extractor is not None

    @property
    def context(self) -> Optional[int]:
        config = self.model.config
        if self.encoder_decoder:
            return config.decoder.max_position_embeddings
        return getattr(config, "max_position_embeddings", None)

    # Prompts

    def template_kwargs(self, kwargs: Optional[dict] = None, think: Optional[bool] = None) -> dict:
        """The chat template's arguments of a request: the server's (--chat-template-args, --think), then the
        request's chat_template_kwargs, then its thinking switch (reasoning_effort, Ollama's think, ...)."""
        asked = (kwargs or {}).get("enable_thinking") if think is None else think
        try:  # (think_args: asking a template without the switch to think is refused; not to, nothing)
            return {**self.template_args, **(kwargs or {}), **think_args(self.tokenizer, asked)}
        except MlxGemmaError as e:
            raise RequestError(str(e), param="think") from None

    def chat(self, messages: list, tools=None, template_kwargs: Optional[dict] = None) -> Prompt:
        """Messages (schemas.Message) through the chat template; image parts become the processor's
        placeholders (T5Gemma 2) or are refused by a text-only model. Past tool calls, tool results and the
        tools (tools.Tools) go in as tools.py says; earlier thoughts (reasoning_content, reasoning or Ollama's
        thinking) as `reasoning`, which Gemma 4's template keeps where it should."""
        args = self.template_kwargs() if template_kwargs is None else template_kwargs
        turns, media = [], {"image": [], "audio": [], "video": []}
        for m in messages:
            text, items = self._content(m)
            for kind in media:
                media[kind] += items[kind]
            turn = {"role": "system" if m.role == "developer" else m.role, "content": text}
            if m.tool_calls:
                turn["tool_calls"] = m.tool_calls
            if m.role == "tool":
                turn.update(tool_call_id=m.tool_call_id, name=m.name or m.tool_name)
            thought = m.reasoning_content or m.reasoning or m.thinking
            if thought and m.role == "assistant":
                turn["reasoning"] = thought
            turns.append(turn)
        for kind, items in media.items():
            if len(items) > MAX_IMAGES:
                raise RequestError(f"at most {MAX_IMAGES} {kind} items per request", param="messages")
        template = getattr(self.tokenizer, "chat_template", None) or ""
        turns, extra = conversation(turns, tools, native="tools" in template)
        prompt = self._prompt(turns, media["image"], template=True, extra=dict(args, **extra), audio=media["audio"],
                              videos=media["video"])
        prompt.channel = has_channel(self.tokenizer)
        prompt.thinking = thinking_on(self.tokenizer, args)
        prompt.in_thought = opens_thought(self.tokenizer, prompt.ids)
        return prompt

    def constraint(self, grammar: Optional[str]):
        """A compiled constraint (constrained.Constraint) for a grammar, or None; one that does not compile
        is a 400."""
        if grammar is None:
            return None
        try:
            return Constraint(self.tokenizer, grammar, logits_width(self.model))
        except MlxGemmaError as e:
            raise RequestError(str(e)) from None

    def structured(self, json_schema, tools, prompt: Optional[Prompt] = None,
                   max_thinking_tokens: Optional[int] = None) -> Optional[object]:
        """The constraint of a response format (json_schema) or of the tools' call format (which for Gemma 4
        knows whether a thought may come first), bounded by a thinking budget when one is given."""
        thinking, in_thought = (prompt.thinking, prompt.in_thought) if prompt is not None else (False, False)
        grammar = tools.grammar(thinking, in_thought) if tools is not None else None
        if json_schema is not None:
            if grammar is not None:
                raise RequestError("a JSON response format and tools cannot be combined here: send one",
                                   param="response_format")
            try:
                grammar = grammar_of(json_schema=json_schema)
            except MlxGemmaError as e:
                raise RequestError(str(e), param="response_format") from None
        constraint = self.constraint(grammar)
        budget = self.max_thinking_tokens if max_thinking_tokens is None else max_thinking_tokens
        if budget is None or prompt is None or not prompt.channel:
            return constraint
        try:
            return ThinkingBudget.for_tokenizer(self.tokenizer, budget, logits_width(self.model), constraint,
                                                in_thought=prompt.in_thought)
        except MlxGemmaError as e:
            raise RequestError(str(e)) from None

    def text(self, prompt, images=(), raw: bool = True, system: Optional[str] = None) -> Prompt:
        """A completion prompt: text as written (raw) or in the chat template, or token ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            if self.encoder_decoder:
                raise RequestError("T5Gemma 2 takes text prompts here, not token ids", param="prompt")
            self._check_ids(prompt)
            return Prompt(list(prompt))
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError("send one prompt per request", param="prompt")
            prompt = prompt[0]
        images = [self._image(b, "images") for b in images]
        if not raw and getattr(self.tokenizer, "chat_template", None):
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            marker = (self.processor.marks["image"] * len(images)) if images else ""
            turns[-1]["content"] = marker + prompt
            return self._prompt(turns, images, template=True)
        text = f"{system}\n\n{prompt}" if system else prompt
        if images:
            text = self.processor.marks["image"] * len(images) + text
        return self._prompt(text, images, template=False)

    def _content(self, m):
        """(text with a placeholder per item, {"image": images, "audio": clips' bytes, "video": videos' bytes})
        of a message."""
        items = {"image": [], "audio": [], "video": []}
        if isinstance(m.content, str) or m.content is None:
            text = m.content or ""
        else:
            text = ""
            for part in m.content:
                if part.type == "text":
                    text += part.text
                elif part.type == "input_audio":
                    items["audio"].append(self._audio(part.input_audio.data))
                    text += self.processor.marks["audio"]
                elif part.type == "video_url":
                    items["video"].append(self._video(part.video_url))
                    text += self.processor.marks["video"]
                else:
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    items["image"].append(self._image(url, "messages"))
                    text += self._placeholder()
        for b in m.images or []:
            items["image"].append(self._image(b, "messages"))
            text = self._placeholder() + text
        return text, items

    def _video(self, url) -> bytes:
        if getattr(self.processor, "video_processor", None) is None:
            raise RequestError(f"{self.name} takes no video", param="messages")
        return inline_bytes(url if isinstance(url, str) else url.url, "video")

    def _audio(self, data: str) -> bytes:
        if not self.takes_audio:
            raise RequestError(f"{self.name} takes no audio", param="messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("input_audio.data is not base64", param="messages") from None

    def _placeholder(self) -> str:
        if not self.takes_images:
            raise RequestError(f"{self.name} is a text-only model: it takes no images", param="messages")
        return self.processor.marks["image"]

    def _image(self, url: str, param: str):
        self._placeholder()
        try:
            return decode_image(inline_bytes(url), "an image")
        except MlxGemmaError as e:
            raise RequestError(str(e), param=param) from None

    def _prompt(self, turns, images, template: bool, extra=None, audio=(), videos=()) -> Prompt:
        try:
            if template:
                for t in turns:
                    check_text(t["content"], "a message")
                text_or_ids = apply_template(self.tokenizer, turns, tokenize=not self.takes_images,
                                             **dict(self.template_args, **(extra or {})))
            else:
                check_text(turns, "the prompt")
                if not turns.strip() and not images:
                    raise MlxGemmaError("the prompt is empty: give some text")
                text_or_ids = turns if self.takes_images else list(self.tokenizer.encode(turns))
            if not self.takes_images:
                self._check_ids(text_or_ids)
                return Prompt(text_or_ids)
            inputs, items = self.processor.prepare(text_or_ids, images, audio, videos)
        except MlxGemmaError as e:
            raise RequestError(str(e)) from None
        if self.vision:
            return self._vision_prompt(inputs, images, items)
        encoder = {"input_ids": inputs["input_ids"], "pixel_values": inputs.get("pixel_values")}
        limit = self.model.config.encoder.text_config.max_position_embeddings
        if inputs["input_ids"].shape[1] >= limit:
            raise RequestError(f"the prompt has {inputs['input_ids'].shape[1]} tokens but the encoder's context is "
                               f"{limit}: shorten it", code="context_length_exceeded")
        return Prompt([self.model.config.decoder.bos_token_id], encoder, images)

    def _vision_prompt(self, inputs: dict, images: list, items: list) -> Prompt:
        ids = inputs["input_ids"][0].tolist()
        self._check_ids(ids)
        if not items:
            return Prompt(ids)
        return Prompt(ids, images=images, media=items, key=media_key(ids, items, media_tokens(self.model)))

    def _check_ids(self, ids: List[int]) -> None:
        try:
            check_prompt(self.model, ids)
        except MlxGemmaError as e:
            raise RequestError(str(e), code="context_length_exceeded" if "context" in str(e) else None) from None

    # Running

    def check_generates(self) -> None:
        if not self.generates:
            raise RequestError(f"{self.name} is an embedding model: it answers /v1/embeddings and /api/embed, and "
                               "generates no text")

    def request(self, prompt: Prompt, *, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
                seed=None, stop=(), n=1, top_logprobs=0, constraint=None) -> Request:
        self.check_generates()
        d = self.defaults
        try:  # (the schemas bound each field as the APIs do; this is the decode core's own check)
            sampling = SamplingOptions(temp=d.temp if temperature is None else temperature,
                                       top_p=d.top_p if top_p is None else top_p,
                                       top_k=d.top_k if top_k is None else top_k,
                                       min_p=d.min_p if min_p is None else min_p, seed=seed)
        except MlxGemmaError as e:
            raise RequestError(str(e)) from None
        return Request(prompt.ids, emit=None, max_tokens=max_tokens or d.max_tokens, sampling=sampling, n=n,
                       stop=list(stop or []), top_logprobs=top_logprobs or 0, encoder=prompt.encoder,
                       context=self.context, media=prompt.media, key=prompt.key, constraint=constraint)

    async def events(self, request: Request, http_request=None):
        """Submit request and yield its (kind, data) events until it ends. Leaving early (a client gone,
        a stream cancelled) cancels it: the scheduler drops its rows at the next step."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def emit(kind, data):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (kind, data))
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                request.cancelled = True

        request.emit = emit
        self.scheduler.submit(request)
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(inbox.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http_request is not None and await http_request.is_disconnected():
                        return
                    continue
                if kind == "end":
                    return
                yield kind, data
        finally:
            request.cancelled = True

    def describe(self) -> dict:
        config = self.model.config
        return {"model_type": getattr(config, "model_type", ""), "architecture": type(self.model).__name__,
                "context_length": self.context, "source": str(Path(self.source)) if self.source else ""}

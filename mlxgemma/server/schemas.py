"""Request bodies of every API (pydantic models: types and ranges): Chat Completions, Completions, Responses,
Anthropic's Messages, Ollama's; and the one error a bad request becomes.

Fields clients commonly send that change nothing here (user, frequency_penalty 0, ...) are accepted and
ignored; a field that would change the output in a way this server cannot honour is refused by name
(echo, suffix, penalties, ...), never silently dropped.
"""

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..decode.constrained import ANY_JSON_OBJECT

MAX_STOPS = 16


class RequestError(Exception):
    """Becomes an OpenAI error object ({"error": {message, type, param, code}}) or Ollama's {"error": ...}."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")


def parse(model: type, body: Any):
    """A request model from a decoded JSON body; the first problem as one RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        raise RequestError(f"{param}: {message}" if param else message, param=param) from None


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Body):
    type: Literal["text"]
    text: str


class ImageURL(Body):
    url: str


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class InputAudio(Body):
    data: str  # base64 of the file's bytes (OpenAI: wav or mp3; any format the decoder reads is taken)
    format: Optional[str] = None


class AudioPart(Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(Body):
    url: str  # a data: URL (data:video/mp4;base64,...): never fetched


class VideoPart(Body):
    type: Literal["video_url"]  # (vLLM's part: OpenAI has none for video)
    video_url: Union[VideoURL, str]


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[Union[TextPart, ImagePart, AudioPart, VideoPart]], None] = None
    images: Optional[List[str]] = None  # Ollama: base64 images on the message
    tool_calls: Optional[List[Dict[str, Any]]] = None  # an assistant's past calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers (OpenAI)
    name: Optional[str] = None
    tool_name: Optional[str] = None  # Ollama's name of the function a tool message answers
    reasoning_content: Optional[str] = None  # an assistant's earlier thought (also as reasoning, or Ollama's thinking)
    reasoning: Optional[str] = None
    thinking: Optional[str] = None


def _stops(v):
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    return [s for s in stops if s]


def _format(v):
    """Ollama's format: "json" or a JSON Schema."""
    if v in (None, "", "json") or isinstance(v, dict):
        return v or None
    raise ValueError('format must be "json" or a JSON Schema object')


class Sampling(Body):
    """What both OpenAI endpoints share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, gt=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Union[str, List[str], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return _stops(v)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("penalties are not supported; leave it 0 or out")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(Sampling):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None  # as vLLM takes them: {"enable_thinking": true}
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    thinking_budget: Optional[int] = Field(None, ge=0)  # most tokens of thought (mlx-vlm's name)

    @property
    def think(self) -> Optional[bool]:
        """The thinking switch: reasoning_effort "none" turns it off, any other effort on (Gemma 4 has no levels)."""
        return None if self.reasoning_effort is None else self.reasoning_effort != "none"

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        kind = (v or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError('type must be "text", "json_object" or "json_schema"')
        if kind == "json_schema" and not isinstance((v.get("json_schema") or {}).get("schema"), dict):
            raise ValueError('json_schema needs {"name": ..., "schema": {...}}')
        return v

    @property
    def json_schema(self) -> Optional[dict]:
        """The schema the answer must match (json_object: any object), or None."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return ANY_JSON_OBJECT
        return self.response_format["json_schema"]["schema"] if kind == "json_schema" else None


class CompletionRequest(Sampling):
    prompt: Union[str, List[str], List[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _unsupported(cls, v, info):
        if v and not (info.field_name == "best_of" and v == 1):
            raise ValueError(f"{info.field_name} is not supported")
        return v


class OllamaOptions(Body):
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    num_predict: Optional[int] = None  # -1 (or -2): until the context is full
    stop: Optional[List[str]] = None
    num_ctx: Optional[int] = None

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, v):
        if v is not None and (v == 0 or v < -2):
            raise ValueError("num_predict must be positive, or -1 for no limit")
        return v


class _Ollama(Body):
    model: Optional[str] = None
    stream: bool = True
    options: Optional[OllamaOptions] = None
    format: Any = None
    keep_alive: Any = None

    _format = field_validator("format")(classmethod(lambda cls, v: _format(v)))

    @property
    def json_schema(self) -> Optional[dict]:
        return ANY_JSON_OBJECT if self.format == "json" else self.format


class OllamaChatRequest(_Ollama):
    messages: List[Message] = Field(min_length=1)
    tools: Optional[List[Dict[str, Any]]] = None
    think: Union[bool, Literal["low", "medium", "high"], None] = None  # Ollama's switch (levels: on)


class OllamaGenerateRequest(_Ollama):
    prompt: str = ""
    system: Optional[str] = None
    images: Optional[List[str]] = None
    raw: bool = False
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[List[int]] = None

    @field_validator("suffix", "template", "context")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            hint = ": send the whole prompt (the prompt cache makes that cheap)" if info.field_name == "context" else ""
            raise ValueError(f"{info.field_name} is not supported{hint}")
        return v


class OllamaShowRequest(Body):
    model: Optional[str] = None
    name: Optional[str] = None


# Embeddings (embeddings.py): a string, strings, token ids or lists of them; prompt_name is ours (EmbeddingGemma's
# task prompts). Empty lists and the rest are checked where the inputs are read (embedding/encode.py).
EmbeddingInput = Union[str, List[str], List[int], List[List[int]]]


class EmbeddingRequest(Body):
    input: EmbeddingInput
    model: Optional[str] = None
    dimensions: Optional[int] = Field(None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    prompt_name: Optional[str] = None


class OllamaEmbedRequest(Body):
    input: Union[str, List[str]]
    model: Optional[str] = None
    truncate: bool = True
    dimensions: Optional[int] = Field(None, gt=0)
    keep_alive: Union[str, int, None] = None
    options: Optional[Dict[str, Any]] = None
    prompt_name: Optional[str] = None


class OllamaEmbeddingsRequest(Body):
    prompt: str
    model: Optional[str] = None
    keep_alive: Union[str, int, None] = None
    options: Optional[Dict[str, Any]] = None
    prompt_name: Optional[str] = None


# The Responses API (responses_api.py reads its input items)


class ReasoningConfig(Body):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[str] = None


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(Body):
    format: Optional[TextFormat] = None


class ResponsesRequest(Body):
    model: Optional[str] = None
    input: Union[str, List[Any]]
    instructions: Optional[str] = None
    tools: Optional[List[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(None, gt=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    reasoning: Optional[ReasoningConfig] = None
    text: Optional[TextConfig] = None
    previous_response_id: Optional[str] = None
    store: bool = True
    metadata: Optional[Dict[str, Any]] = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        if not isinstance(v, (str, list)):
            raise ValueError("must be a string or a list of input items")
        return v

    @property
    def think(self) -> Optional[bool]:
        """effort "none" turns thinking off, any other effort on (Gemma 4 has no levels); none: the server's."""
        effort = self.reasoning.effort if self.reasoning is not None else None
        return None if effort is None else effort != "none"

    @property
    def json_schema(self) -> Optional[dict]:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ANY_JSON_OBJECT
        if not isinstance(fmt.schema_, dict):
            raise RequestError('text.format of type "json_schema" needs a schema object', param="text.format")
        return fmt.schema_


# Anthropic's Messages API (anthropic_api.py reads its blocks)


class ThinkingConfig(Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(None, ge=0)


class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: Union[str, List[Dict[str, Any]]]


class CountRequest(Body):
    """What count_tokens reads: everything that goes into the prompt."""

    model: Optional[str] = None
    system: Union[str, List[Dict[str, Any]], None] = None
    messages: List[AnthropicMessage] = Field(min_length=1)
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Dict[str, Any]] = None
    thinking: Optional[ThinkingConfig] = None

    @property
    def think(self) -> Optional[bool]:
        return None if self.thinking is None else self.thinking.type != "disabled"


class MessagesRequest(CountRequest):
    max_tokens: int = Field(gt=0)
    stop_sequences: Optional[List[str]] = Field(None, max_length=MAX_STOPS)
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    stream: bool = False
    metadata: Optional[Dict[str, Any]] = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v):
        return [s for s in v or [] if s]

"""Thinking: the thought channel of a chat template that has one (Gemma 4's), switched on or off in the template,
read apart from the answer as the output streams, and bounded by a budget of tokens.

Gemma 4's template reads `enable_thinking` (off by default: the system turn then lacks <|think|>, and the large
models' generation prompt holds an empty thought, `<|channel>thought\\n<channel|>`). A thought comes out as
`<|channel>thought\\n...<channel|>` before the answer; after tool results with thinking on, the prompt itself opens
the thought, so the output starts inside it. Thoughts are never answer text: with thinking off a stray one is
dropped (a model that was told not to think shows no thoughts), with it on it is the reasoning.
"""

from typing import List, Optional

import numpy as np

from ..errors import MlxGemmaError
from .constrained import allowed, masks_along
from .gemma4_format import LABEL, THOUGHT_CLOSE, THOUGHT_OPEN, Event, OutputParser


def template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or ""


def has_channel(tokenizer) -> bool:
    """Whether the chat template speaks Gemma 4's native format (thought channel, native tool calls)."""
    return THOUGHT_OPEN in template_of(tokenizer)


def takes_thinking(tokenizer) -> bool:
    return "enable_thinking" in template_of(tokenizer)


def think_args(tokenizer, think: Optional[bool]) -> dict:
    """The template arguments for a thinking switch (None: the template's default). Asking a template without
    the switch to think is an error; telling it not to is nothing to do."""
    if think is None or (not think and not takes_thinking(tokenizer)):
        return {}
    if not takes_thinking(tokenizer):
        raise MlxGemmaError("this model's chat template has no thinking switch (enable_thinking): it cannot be "
                            "asked to think")
    return {"enable_thinking": bool(think)}


def check_budget(budget: Optional[int], tokenizer=None) -> None:
    """A thinking budget (None: none) in range, and (given the tokenizer) for a model with a thought channel."""
    if budget is None:
        return
    if budget < 0:
        raise MlxGemmaError(f"--max-thinking-tokens must be >= 0, got {budget}")
    if tokenizer is not None and not has_channel(tokenizer):
        raise MlxGemmaError("--max-thinking-tokens needs a model with a thought channel (Gemma 4)")


def template_args(tokenizer, think: Optional[bool], chat_template_args: Optional[dict],
                  max_thinking_tokens: Optional[int] = None) -> dict:
    """The chat template's arguments: chat_template_args, then the thinking switch over them (think_args:
    None leaves the template's default; asking a template without the switch to think is an error). A
    thinking budget is checked here too, so that a chat refuses it before its first turn."""
    if chat_template_args is not None and not isinstance(chat_template_args, dict):
        raise MlxGemmaError("--chat-template-args must be a JSON object")
    check_budget(max_thinking_tokens, tokenizer)
    return dict(chat_template_args or {}, **think_args(tokenizer, think))


def thinking_on(tokenizer, template_args: dict) -> bool:
    return takes_thinking(tokenizer) and bool(template_args.get("enable_thinking"))


def opens_thought(tokenizer, ids) -> bool:
    """Whether a prompt ends inside an open thought (the generation prompt after tool results, thinking on)."""
    if not has_channel(tokenizer) or len(ids) == 0:
        return False
    return tokenizer.decode(list(ids[-16:])).endswith(THOUGHT_OPEN + LABEL)


class Split:
    """One output read apart as it streams: feed(text) and finish() return gemma4_format Events ("thought",
    "text", "call", "bad_call"). Without a channel every piece is text. keep_thoughts=False drops thoughts."""

    def __init__(self, channel: bool, start_in_thought: bool = False, keep_thoughts: bool = True):
        self.parser = OutputParser(start_in_thought) if channel else None
        self.keep = keep_thoughts

    @classmethod
    def of(cls, tokenizer, prompt_ids, template_args: dict) -> "Split":
        return cls(has_channel(tokenizer), opens_thought(tokenizer, prompt_ids), thinking_on(tokenizer, template_args))

    def feed(self, text: str) -> List[Event]:
        if self.parser is None:
            return [Event("text", text)] if text else []
        return self._kept(self.parser.feed(text))

    def finish(self) -> List[Event]:
        return [] if self.parser is None else self._kept(self.parser.finish())

    @property
    def incomplete(self) -> bool:
        """A call was cut off by the end of the output."""
        return self.parser is not None and self.parser.incomplete

    @property
    def partial(self) -> str:
        return self.parser.partial if self.parser is not None else ""

    def _kept(self, events: List[Event]) -> List[Event]:
        return [e for e in events if self.keep or e.kind != "thought"]


class ThinkingBudget:
    """A constraint (constrained.Constraint's protocol, as the decoder uses it) that closes a thought once it is
    `budget` tokens long: from then on only <channel|> may come while the thought lasts. It wraps the request's own
    constraint (inner, or None) and follows it otherwise; if the inner one cannot take <channel|> at that point
    (a grammar in the middle of the label), its own mask stands until it can."""

    def __init__(self, budget: int, open_id: int, close_id: int, vocab_size: int, inner=None,
                 in_thought: bool = False, label: int = 0):
        check_budget(budget)
        # label: the tokens of the channel's name ("thought\n") after <|channel>, which are not thought
        self.budget, self.open_id, self.close_id, self.inner, self.label = budget, open_id, close_id, inner, label
        self.width = inner.bitmask.shape[1] if inner is not None else (vocab_size + 31) // 32
        self.bitmask = np.full((1, self.width), -1, dtype=np.int32)
        self.history: List[Optional[int]] = []  # per consumed token: the thought's length before it (None: none)
        self.length = label if in_thought else None  # tokens since <|channel> (None: not in a thought)

    @classmethod
    def for_tokenizer(cls, tokenizer, budget: int, vocab_size: int, inner=None, in_thought: bool = False):
        check_budget(budget, tokenizer)
        open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in (THOUGHT_OPEN, THOUGHT_CLOSE))
        label = len(tokenizer.encode(LABEL, add_special_tokens=False))
        return cls(budget, open_id, close_id, vocab_size, inner, in_thought, label)

    def copy(self) -> "ThinkingBudget":
        out = ThinkingBudget(self.budget, self.open_id, self.close_id, self.width * 32,
                             self.inner.copy() if self.inner is not None else None, label=self.label)
        out.length, out.history = self.length, list(self.history)
        return out

    def _over(self) -> bool:
        return self.length is not None and self.length >= self.budget + self.label

    def mask(self) -> np.ndarray:
        inner = self.inner.mask() if self.inner is not None else None
        self.bitmask[0] = inner if inner is not None else -1
        if self._over() and (inner is None or self.inner.allows(self.close_id, inner)):
            self.bitmask[0] = 0
            self.bitmask[0, self.close_id >> 5] = np.int32(np.uint32(1 << (self.close_id & 31)).view(np.int32))
        return self.bitmask[0]

    def allows(self, token: int, bitmask=None) -> bool:
        return allowed(self.bitmask[0] if bitmask is None else bitmask, token)

    def consume(self, token: int) -> bool:
        if self.inner is not None and not self.inner.consume(token):
            return False
        self.history.append(self.length)
        if token == self.open_id:
            self.length = 0
        elif token == self.close_id:
            self.length = None
        elif self.length is not None:
            self.length += 1
        return True

    def masks_along(self, tokens: List[int]) -> np.ndarray:
        return masks_along(self, tokens)

    def rollback(self, n: int) -> None:
        if n <= 0:
            return
        if self.inner is not None:
            self.inner.rollback(n)
        self.length = self.history[-n]
        del self.history[-n:]

    @property
    def accepting(self) -> bool:
        return self.inner.accepting if self.inner is not None else True

"""The text stream of one row: token ids in, text out, and every decision about when a row is finished.

A row finishes with "stop" at any eos id of the checkpoint (config.json and generation_config.json: Gemma's
<end_of_turn> too; a complete constrained output allows nothing else) or at a stop string; with "length" after max_tokens or when the model's context is full. Text that could still grow into a stop
string is held back, so no part of a stop string is ever shown. The detokenizer is mlx-lm's streaming one
(it never splits a multi-byte character).
"""

from typing import Optional, Sequence, Tuple


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string (so must not be shown yet)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


class TextStream:
    """tokenizer: mlx-lm's TokenizerWrapper; eos: the ids that end a row; position: how many tokens the
    model already holds before the first generated one (for the context limit)."""

    def __init__(self, tokenizer, *, max_tokens: int, stop: Sequence[str] = (), eos: Optional[set] = None,
                 context: Optional[int] = None, position: int = 0):
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per row
        self.eos = set(tokenizer.eos_token_ids) if eos is None else set(eos)
        self.stops = [s for s in stop if s]
        self.max_tokens, self.context, self.position = max_tokens, context, position
        self.tokens: list = []
        self.pending = ""  # text held back while it could still become a stop string
        self.finish: Optional[str] = None

    def add(self, token: int) -> Tuple[str, Optional[str]]:
        """(text to show now, finish reason or None) after one more token."""
        self.tokens.append(token)
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            self.detokenizer.add_token(token)
        if finish is None and (len(self.tokens) >= self.max_tokens or
                               (self.context and self.position + len(self.tokens) >= self.context)):
            finish = "length"
        if finish is not None:
            self.detokenizer.finalize()
        text = self.pending + self.detokenizer.last_segment
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            text, finish = text[: min(hits)], "stop"
        shown = len(text) if finish else len(text) - held_back(text, self.stops)
        self.pending = text[shown:]
        self.finish = finish
        return text[:shown], finish

"""A generation's text read apart into answer, thought and calls, for the Python API (Chunk.reasoning,
generate_reply, ChatSession) and the command lines (thoughts dimmed or hidden): the glue between generate.py
and decode/thinking.py, which reads Gemma 4's thought channel.

A model without the channel (every template but Gemma 4's) gives answer text only, as it always did.
"""

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .decode.gemma4_format import CALL_OPEN, format_call
from .decode.thinking import Split, ThinkingBudget, opens_thought

Call = Tuple[str, Optional[dict]]  # (name, arguments) of one native tool call
DIM, RESET = "\x1b[2m", "\x1b[0m"


def budgeted(constraint, tokenizer, budget: Optional[int], width: int, ids: Sequence[int]):
    """The constraint wrapped in a ThinkingBudget of `budget` tokens (None: the constraint as it is). ids end
    with the prompt: one that opens a thought starts the count."""
    if budget is None:
        return constraint
    return ThinkingBudget.for_tokenizer(tokenizer, budget, width, constraint,
                                        in_thought=opens_thought(tokenizer, ids))


class Reader:
    """One stream's text (stop strings already cut: TextStream) read step by step into (answer text, thought
    text, calls). Thoughts are dropped when thinking is off (Split); a call that does not parse, or is cut off
    by the end of the output, stays answer text as the model wrote it."""

    def __init__(self, tokenizer, ids: Sequence[int], template_args: dict):
        self.split = Split.of(tokenizer, ids, template_args)

    def read(self, text: str, finish: Optional[str]) -> Tuple[str, str, List[Call]]:
        events = self.split.feed(text) + (self.split.finish() if finish else [])
        answer, thought, calls = "", "", []
        for e in events:
            if e.kind == "thought":
                thought += e.text
            elif e.kind == "call":
                calls.append((e.name, e.arguments))
            else:
                answer += e.written()
        if finish and self.split.incomplete:
            answer += CALL_OPEN + self.split.partial
        return answer, thought, calls


@dataclass
class Reply:
    """A whole generation read apart (generate_reply): the answer, the thought (empty unless thinking was on),
    why it ended ("stop" or "length") and the native tool calls it made, as (name, arguments)."""

    text: str
    reasoning: str = ""
    finish_reason: Optional[str] = None
    calls: List[Call] = field(default_factory=list)


def reply_of(chunks) -> Reply:
    out = Reply("")
    for c in chunks:
        out.text += c.text
        out.reasoning += c.reasoning
        out.calls += c.calls
        out.finish_reason = c.finish_reason
    return out


class Shown:
    """A command line's view of a stream of Chunks: answer text (and calls, as the model writes them) to
    `out`, thoughts to `thoughts` (stdout and stderr by default), dimmed when that stream is a terminal, or
    not at all (hide). A thought ends its line, so the answer starts on one of its own."""

    def __init__(self, out=None, thoughts=None, hide: bool = False):
        self.out = sys.stdout if out is None else out
        self.thoughts = sys.stderr if thoughts is None else thoughts
        self.hide, self.dim, self.open = hide, self.thoughts.isatty(), False

    def write(self, chunk) -> None:
        if chunk.reasoning and not self.hide:
            if not self.open:
                self.thoughts.write(DIM if self.dim else "")
                self.open = True
            self.thoughts.write(chunk.reasoning)
            self.thoughts.flush()
        answer = chunk.text + "".join(format_call(name, arguments) for name, arguments in chunk.calls)
        if answer:
            self.close()
            self.out.write(answer)
            self.out.flush()
        if chunk.finish_reason:
            self.close()

    def close(self) -> None:
        """End a thought being shown (a reply cut short by Ctrl-C too)."""
        if self.open:
            self.thoughts.write((RESET if self.dim else "") + "\n")
            self.thoughts.flush()
            self.open = False

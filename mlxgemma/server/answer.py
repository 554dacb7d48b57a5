"""One choice's answer as every API sends it: the model's text read as it streams into reasoning, content and
tool calls, as OpenAI-style deltas ({"reasoning": ...}, {"content": ...}, {"tool_calls": [...]}) that each API
(openai_api, ollama_api, responses_api, anthropic_api) puts in its own shape.

Three output formats: Gemma 4's native one (thoughts in a channel, `<|tool_call>call:NAME{...}<tool_call|>`
calls; decode/thinking.py and decode/gemma4_format.py read it), FunctionGemma's native calls and the prompted
JSON calls of the other templates (tools.py). A call is reported only once it is whole; one cut off by
max_tokens is never returned: the finish is "length". An answer that made calls finishes with "tool_calls".
"""

from typing import List, Optional, Tuple

from ..decode.gemma4_format import CALL_CLOSE, CALL_OPEN, format_call
from ..decode.thinking import Split
from .tools import AnswerStream, Call, Tools, new_id


class Answer:
    """feed(text) -> deltas; end(finish) -> (last deltas, finish reason). `calls` holds the calls made, `content`
    and `reasoning` the whole texts, once ended."""

    def __init__(self, split: Split, tools: Optional[Tools]):
        self.split = split
        self.tools = tools if tools is not None and tools.choice != "none" else None
        native = split.parser is not None  # Gemma 4's format: calls read from the channel's events
        self.prompted = AnswerStream(self.tools) if self.tools is not None and not native else None
        self.calls: List[Call] = []
        self.content = self.reasoning = ""

    def feed(self, text: str) -> List[dict]:
        return self._note([d for e in self.split.feed(text) for d in self._deltas(e)])

    def end(self, finish: str) -> Tuple[List[dict], str]:
        deltas = [d for e in self.split.finish() for d in self._deltas(e)]
        if self.prompted is not None:
            last, finish = self.prompted.end(finish)
            deltas += last
            self.calls += self.prompted.calls_made
        if self.split.incomplete and finish == "stop":  # (an eos inside a call: only unconstrained)
            finish = "length"
        if self.calls and finish == "stop":
            finish = "tool_calls"
        return self._note(deltas), finish

    def _deltas(self, event) -> List[dict]:
        if event.kind == "thought":
            return [{"reasoning": event.text}] if event.text else []
        if event.kind == "call" and self.tools is not None:
            call = Call(new_id(), event.name, event.arguments)
            self.calls.append(call)
            return [{"tool_calls": [call.openai(len(self.calls) - 1)]}]
        if event.kind == "call":  # a call nobody declared: the text as written
            text = format_call(event.name, event.arguments)
        elif event.kind == "bad_call":
            text = CALL_OPEN + event.text + CALL_CLOSE
        else:
            text = event.text
        if self.prompted is not None:
            return self.prompted.feed(text)
        return [{"content": text}] if text else []

    def _note(self, deltas: List[dict]) -> List[dict]:
        for d in deltas:
            self.content += d.get("content") or ""
            self.reasoning += d.get("reasoning") or ""
        return deltas


def answers(engine, prompt, tools, n: int) -> List[Answer]:
    """The n Answers of a request whose prompt (engine.Prompt) came through the chat template."""
    return [Answer(Split(prompt.channel, prompt.in_thought, prompt.thinking), tools) for _ in range(n)]


def message(answer: Answer) -> dict:
    """The whole answer as an OpenAI assistant message."""
    out = {"role": "assistant", "content": answer.content if answer.content or not answer.calls else None}
    if answer.reasoning:
        out.update(reasoning_content=answer.reasoning, reasoning=answer.reasoning)
    if answer.calls:
        out["tool_calls"] = [c.openai() for c in answer.calls]
    return out

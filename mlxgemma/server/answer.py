"""One choice's answer as every API sends it: the model's text read as it streams into reasoning, content and
tool calls, as OpenAI-style deltas ({"reasoning": ...}, {"content": ...}, {"tool_calls": [...]}) that each API
(openai_api, ollama_api, responses_api, anthropic_api) puts in its own shape.

Three output formats: Gemma 4's native one (thoughts in a channel, `<|tool_call>call:NAME{...}<tool_call|>`
calls; decode/thinking.py and decode/gemma4_format.py read it), FunctionGemma's native calls and the prompted
JSON calls of the other templates (tools.py). A call is reported only once it is whole; one cut off by
max_tokens is never returned: the finish is "length". An answer that made calls finishes with "tool_calls".
"""

from typing import List, Optional, Tuple

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
        text = event.written()  # (a call nobody declared, a bad call: the text as written)
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


class Part:
    """One item of an answer as the Responses and Messages APIs send it: a run of reasoning, a run of content,
    or one call (its id and name; its arguments in `text`)."""

    def __init__(self, kind: str, index: int, call: Optional[dict] = None):
        self.kind, self.index, self.text = kind, index, ""
        self.call_id = call["id"] if call else None
        self.name = call["function"]["name"] if call else None


class Parts:
    """An answer's deltas grouped into Parts, in the order they came: feed(deltas) and close() return the
    events ("open", part), ("delta", part, text) and ("close", part) that each API puts in its own shape. A
    call's first delta carries its id (Gemma 4's arrive whole, the prompted format's in pieces)."""

    def __init__(self):
        self.parts: List[Part] = []
        self.open: Optional[Part] = None

    def feed(self, deltas: List[dict]) -> List[tuple]:
        events = []
        for d in deltas:
            for kind in ("reasoning", "content"):
                if d.get(kind):
                    if self.open is None or self.open.kind != kind:
                        events += self._start(kind)
                    events += self._add(d[kind])
            for call in d.get("tool_calls") or []:
                if call.get("id"):
                    events += self._start("call", call)
                if self.open is not None and self.open.kind == "call":
                    events += self._add(call.get("function", {}).get("arguments") or "")
        return events

    def close(self) -> List[tuple]:
        if self.open is None:
            return []
        part, self.open = self.open, None
        return [("close", part)]

    def _start(self, kind: str, call: Optional[dict] = None) -> List[tuple]:
        events = self.close()
        self.open = Part(kind, len(self.parts), call)
        self.parts.append(self.open)
        return events + [("open", self.open)]

    def _add(self, text: str) -> List[tuple]:
        if not text:
            return []
        self.open.text += text
        return [("delta", self.open, text)]


class Turn:
    """One request of one choice as the Responses and Messages APIs run it: on(kind, data) takes the engine's
    events and returns the Parts events they released; afterwards the usage, the finish (Answer.end's, and the
    decoder's own in `stopped`), the token ids and the error, if any."""

    def __init__(self, answer: Answer):
        self.answer, self.parts = answer, Parts()
        self.prompt_tokens = self.cached_tokens = self.count = self.reasoning_tokens = 0
        self.ids: List[int] = []
        self.finish = self.stopped = self.error = None

    def on(self, kind: str, data) -> List[tuple]:
        if kind == "prompt":
            self.prompt_tokens, self.cached_tokens = data["prompt_tokens"], data["cached_tokens"]
        elif kind == "token":
            self.ids.append(data.id)
            deltas = self.answer.feed(data.text)
            # (a token that released thought text: marker tokens and held-back text make this approximate)
            self.reasoning_tokens += any("reasoning" in d for d in deltas)
            return self.parts.feed(deltas)
        elif kind == "done":
            _, self.stopped, self.count = data
            deltas, self.finish = self.answer.end(self.stopped)
            return self.parts.feed(deltas) + self.parts.close()
        elif kind == "error":
            self.error = data
        return []

    def made(self, part: Part):
        """The finished call (tools.Call) a call part became, or None: one cut off is never reported."""
        return next((c for c in self.answer.calls if c.id == part.call_id), None)

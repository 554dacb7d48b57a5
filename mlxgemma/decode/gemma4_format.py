"""Gemma 4's native chat output: thoughts, answer text and tool calls, written, read back and constrained.

The format is the one Google's chat template renders (its 2026-07-09 canonical version) and the model is trained
to emit:

    <|channel>thought\\n...<channel|>                  a thought (the model's reasoning)
    <|tool_call>call:NAME{key:value,...}<tool_call|>   a call; several follow each other with no separator

Values are as the template's format_argument macro writes them: strings between <|"|> tokens, verbatim (no
escapes: quotes, braces and newlines pass through, so a string cannot hold the text <|"|> and a key cannot hold
":"), keys bare, numbers as Python prints them, true/false/null, nested {...} and [...]. <|channel>, <channel|>,
<|tool_call>, <tool_call|> and <|"|> are single special tokens in Gemma 4's vocabulary; the text here is what
they decode to, so the output must be decoded with special tokens kept.

format_call writes a call exactly as the template does; parse_calls and OutputParser (piece by piece, as it
streams) read the output back; call_grammar makes the model's calls match the declared functions.
"""

import json
import re
from typing import List, Mapping, NamedTuple, Optional, Tuple

QUOTE = '<|"|>'
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
LABEL = "thought\n"  # the channel's name, after <|channel>
# Tokens that end a turn or come after calls: never answer text. <|tool_response> is the model's stop after its
# calls (an eos id), <turn|> the end of its turn; a stray closer is noise seen in the wild (Ollama swallows them).
NOISE = ("<|tool_response>", "<turn|>", CALL_CLOSE)
MARKERS = (THOUGHT_OPEN, THOUGHT_CLOSE, CALL_OPEN) + NOISE


# Writing


def format_call(name: str, arguments: Optional[Mapping]) -> str:
    """One call as the template renders an assistant message's tool call (arguments None renders as {})."""
    if arguments is not None and not isinstance(arguments, Mapping):
        raise TypeError("arguments must be a mapping (the template refuses a JSON string)")
    return f"{CALL_OPEN}call:{name}{format_value(arguments or {})}{CALL_CLOSE}"


def format_value(value) -> str:
    """The template's format_argument(value, escape_keys=False): the order of its tests is kept (a bool before a
    number; a mapping before a sequence), and anything else is printed as Jinja prints it, str()."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in _dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)  # 1e10 prints as 10000000000.0, 1e16 as 1e+16: Python's repr, which is what Jinja prints


def _dictsort(mapping: Mapping) -> list:
    """Jinja's dictsort: by key, case-insensitive, ties in insertion order (sorted is stable)."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


# Reading


class Event(NamedTuple):
    kind: str  # "thought", "text", "call", or "bad_call" (a closed call that does not parse: text is its body)
    text: str = ""
    name: str = ""
    arguments: Optional[dict] = None

    def written(self) -> str:
        """The event as the output holds it (a call as the template writes one; a bad call's body between its
        markers): what a reader that reports no calls shows instead."""
        if self.kind == "call":
            return format_call(self.name, self.arguments)
        return CALL_OPEN + self.text + CALL_CLOSE if self.kind == "bad_call" else self.text


class OutputParser:
    """The model's output read as it streams: feed(piece) and finish() return Events. Pieces may split anywhere,
    inside a special token's text too: a tail that may begin a marker is held back until the next piece shows
    what it is. A call is only ever reported whole, once its <tool_call|> came; one cut off by the end of the
    output sets `incomplete` (its text in `partial`) instead. start_in_thought: the prompt ended in an open
    thought (`<|channel>thought\\n`, the template's generation prompt after tool results with thinking on)."""

    def __init__(self, start_in_thought: bool = False):
        self.state = "thought" if start_in_thought else "text"
        self.buffer = ""
        self.label = False  # the channel's name may come next
        self.scan, self.in_string = 0, False  # how far a call's body was searched for its end
        self.incomplete, self.partial = False, ""

    def feed(self, piece: str) -> List[Event]:
        self.buffer += piece
        return self._run(final=False)

    def finish(self) -> List[Event]:
        out = self._run(final=True)
        if self.state == "call":
            self.incomplete, self.partial, self.buffer = True, self.buffer, ""
        return out

    def _run(self, final: bool) -> List[Event]:
        out: List[Event] = []
        while self._step(out, final):
            pass
        return out

    def _step(self, out: List[Event], final: bool) -> bool:
        """One move; whether another may follow."""
        if self.state == "call":
            return self._call(out)
        if self.label:
            if not final and len(self.buffer) < len(LABEL) and LABEL.startswith(self.buffer):
                return False
            self.label, self.buffer = False, self.buffer.removeprefix("thought").removeprefix("\n")
        at, marker = _first(self.buffer, MARKERS)
        if marker is None:
            keep = 0 if final else _held(self.buffer, self.state == "thought")
            out += [Event(self.state, self.buffer[:len(self.buffer) - keep])] if len(self.buffer) > keep else []
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        text = self.buffer[:at]
        if self.state == "thought" and marker == THOUGHT_CLOSE and text.endswith("\n"):
            text = text[:-1]  # the template writes a thought as `thought\n{text}\n<channel|>`
        out += [Event(self.state, text)] if text else []
        self.buffer = self.buffer[at + len(marker):]
        if marker == THOUGHT_OPEN:  # (a second opener inside a thought only restarts the label)
            self.state, self.label = "thought", True
        elif marker == CALL_OPEN:  # also from inside a thought: the model sometimes calls without closing it
            self.state, self.scan, self.in_string = "call", 0, False
        elif marker == THOUGHT_CLOSE:
            self.state = "text"
        return True

    def _call(self, out: List[Event]) -> bool:
        end = self._call_end()
        if end is None:
            return False
        body, self.buffer, self.state = self.buffer[:end], self.buffer[end + len(CALL_CLOSE):], "text"
        try:
            name, arguments = parse_call_body(body)
            out.append(Event("call", name=name, arguments=arguments))
        except ValueError:
            out.append(Event("bad_call", text=body))
        return True

    def _call_end(self) -> Optional[int]:
        """Where <tool_call|> closes the call in the buffer, outside its strings (a string may hold that text)."""
        b, i = self.buffer, self.scan
        while True:
            if self.in_string:
                j = b.find(QUOTE, i)
                if j < 0:
                    self.scan = max(i, len(b) - len(QUOTE) + 1)
                    return None
                self.in_string, i = False, j + len(QUOTE)
                continue
            q, e = b.find(QUOTE, i), b.find(CALL_CLOSE, i)
            if e >= 0 and (q < 0 or e < q):
                return e
            if q < 0:
                self.scan = max(i, len(b) - len(CALL_CLOSE) + 1)
                return None
            self.in_string, i = True, q + len(QUOTE)


def _first(text: str, markers) -> Tuple[int, Optional[str]]:
    return min(((i, m) for m in markers if (i := text.find(m)) >= 0), default=(-1, None))


def _held(text: str, thought: bool) -> int:
    """How many characters at the end of text to hold back: a start of a marker (every marker starts with "<"
    and has no other "<"), or in a thought a last newline that a closing <channel|> would drop."""
    at = text.rfind("<")
    keep = len(text) - at if at >= 0 and any(m.startswith(text[at:]) for m in MARKERS) else 0
    return keep + 1 if thought and text[:len(text) - keep].endswith("\n") else keep


def parse_calls(text: str) -> List[Tuple[str, dict]]:
    """The complete calls in a whole output, in order (calls that do not parse, and a cut-off one, are left out)."""
    parser = OutputParser()
    events = parser.feed(text) + parser.finish()
    return [(e.name, e.arguments) for e in events if e.kind == "call"]


def parse_call_body(body: str) -> Tuple[str, dict]:
    """`call:NAME{...}` (between <|tool_call> and <tool_call|>) as (name, arguments), else ValueError. NAME is all
    before the first "{" (`mcp:server:tool`, dots, dashes); lenient where models stray: whitespace, `call:`
    missing, quoted keys, JSON strings."""
    body = body.strip().removeprefix("call:")
    brace = body.find("{")
    if brace <= 0 or not body[:brace].strip():
        raise ValueError("a call is call:NAME{...}")
    try:
        arguments, end = _Reader(body).value(brace)
    except RecursionError:
        raise ValueError("arguments nested too deeply") from None
    if not isinstance(arguments, dict) or body[end:].strip():
        raise ValueError("a call's arguments are one {...}")
    return body[:brace].strip(), arguments


BARE_WORDS = {"true": True, "false": False, "null": None, "None": None}
BARE, SPACE = re.compile(r"[^,}\]\s]*"), re.compile(r"\s*")


class _Reader:
    """Recursive descent over the template's value syntax; each method returns (what it read, index after it)."""

    def __init__(self, text: str):
        self.text = text

    def value(self, i: int):
        t, i = self.text, SPACE.match(self.text, i).end()
        if t.startswith(QUOTE, i):
            end = t.find(QUOTE, i + len(QUOTE))
            if end < 0:
                raise ValueError("a string is not closed")
            return t[i + len(QUOTE):end], end + len(QUOTE)
        if t.startswith('"', i):
            return json.JSONDecoder().raw_decode(t, i)  # (its JSONDecodeError is a ValueError)
        if t[i:i + 1] in ("{", "["):
            return self.items(i, t[i] == "{")
        raw = BARE.match(t, i).group(0)
        if not raw:
            raise ValueError(f"a value is missing at {i}")
        return _literal(raw), i + len(raw)

    def items(self, i: int, obj: bool):
        t, close, out = self.text, "}" if obj else "]", {} if obj else []
        i = SPACE.match(t, i + 1).end()
        while not t.startswith(close, i):
            if i >= len(t) or (out and t[i] != ","):
                raise ValueError(f"expected , or {close} at {i}")
            i += 1 if out else 0
            if obj:
                key, i = self.key(i)
                out[key], i = self.value(i)
            else:
                item, i = self.value(i)
                out.append(item)
            i = SPACE.match(t, i).end()
        return out, i + 1

    def key(self, i: int):
        t, i = self.text, SPACE.match(self.text, i).end()
        if t.startswith((QUOTE, '"'), i):
            key, i = self.value(i)
        elif (colon := t.find(":", i)) >= 0:
            key, i = t[i:colon].strip(), colon
        else:
            raise ValueError(f"a key lacks its : at {i}")
        i = SPACE.match(t, i).end()
        if not (isinstance(key, str) and key and t.startswith(":", i)):
            raise ValueError(f"expected key: at {i}")
        return key, i + 1


def _literal(raw: str):
    """A bare value: true/false/null (and the None older templates printed), a number, or else the text itself."""
    if raw in BARE_WORDS:
        return BARE_WORDS[raw]
    try:
        return json.loads(raw)  # ints of any size stay exact; 10000000000.0 and 1e+16 are floats
    except ValueError:
        return raw


# Constraining: an llguidance Lark grammar of the calls

# The special tokens appear in rules as <...> (llguidance matches the tokenizer's special token by name: the
# model writes the one token it was trained on, never its text spelled in pieces). A terminal never matches a
# special token, so a string's body cannot hold the <|"|> token; the text <|"|> spelled in ordinary tokens is
# cut out as well (& ~), or the output would not read back. No whitespace anywhere: the template writes none.
BASE = r"""
STR: /(?s:.+)/ & ~/(?s:.*)<\|"\|>(?s:.*)/
string: <|"|> STR? <|"|>
INT: /-?(0|[1-9][0-9]*)/
NUM: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
KEY: /[^\s:,{}\[\]<"]([^:,{}\[\]<"\n]*[^\s:,{}\[\]<"])?/
value: string | NUM | "true" | "false" | "null" | object | array
object: "{" (KEY ":" value ("," KEY ":" value)*)? "}"
array: "[" (value ("," value)*)? "]"
TEXT: /(?s:.+)/
thought: <|channel> "thought\n" TEXT? <channel|>
"""


def call_grammar(functions: List[dict], choice: str = "auto", parallel: bool = True, *,
                 thinking: bool = False, in_thought: bool = False) -> str:
    """The Lark grammar (llguidance's dialect; for constrained.grammar_of(grammar=...)) of the model's answer
    under tools. functions: {"name", "parameters": JSON Schema}; choice: "auto" (text, then calls if any),
    "required" (calls only) or a function's name (one call of it); parallel: several calls may follow each
    other. thinking: a thought may come first; in_thought: the prompt opened one, which the output closes.

    Arguments follow each function's schema: string, integer, number, boolean, null, enum, const, anyOf/oneOf,
    a list of types, nullable, object (its properties, in the template's order: dictsort; required ones
    required, no others) and array (of its items). Where llguidance cannot follow a schema in this syntax
    the grammar is looser, never stricter: string length, pattern and format, number bounds, array lengths,
    $ref and allOf accept any value of the type (or any value at all); the output then still parses."""
    builder = _Builder()
    named = {f["name"]: f for f in functions}
    if choice not in ("auto", "required") and choice not in named:
        raise ValueError(f"choice is 'auto', 'required' or a function's name, not {choice!r}")
    chosen = list(named.values()) if choice in ("auto", "required") else [named[choice]]
    calls = [builder.call(f["name"], f.get("parameters") or {}) for f in chosen]
    call = builder.rule(" | ".join(calls), "call")
    many = parallel and choice in ("auto", "required")
    lead = "thought? " if thinking else ""
    lead = "TEXT? <channel|> " if in_thought else lead  # (after the close, the answer as usual)
    body = f"TEXT? {call}{'*' if many else '?'}" if choice == "auto" else f"{call}{'+' if many else ''}"
    return f"start: {lead}{body}\n" + builder.text() + BASE


class _Builder:
    """Lark rules, named in order of creation; an identical body gets its first name again."""

    def __init__(self):
        self.rules = {}  # body -> name

    def rule(self, body: str, hint: str = "r") -> str:
        return self.rules.setdefault(body, f"{hint}{len(self.rules)}")

    def text(self) -> str:
        return "".join(f"{name}: {body}\n" for body, name in self.rules.items())

    def call(self, name: str, parameters: dict) -> str:
        if "{" in name or "<" in name:
            raise ValueError(f"a function's name cannot hold {{ or <: {name!r}")
        args = self.object(parameters) if isinstance(parameters, dict) else "object"
        return self.rule(f"<|tool_call> {_lark('call:' + name)} {args} <tool_call|>", "call")

    def value(self, schema) -> str:
        """A Lark expression for values of schema."""
        if not isinstance(schema, dict):
            return "value"
        if "const" in schema:
            return _literal_rule(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return "(" + " | ".join(_literal_rule(v) for v in schema["enum"]) + ")"
        either = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(either, list) and either:
            return "(" + " | ".join(self.value(s) for s in either) + ")"
        kind = schema.get("type", "object" if "properties" in schema else None)
        if isinstance(kind, list) and kind:
            return "(" + " | ".join(self.value(dict(schema, type=k)) for k in kind) + ")"
        simple = {"string": "string", "integer": "INT", "number": "NUM", "boolean": '("true" | "false")',
                  "null": '"null"'}
        expr = simple.get(kind) or {"object": self.object, "array": self.array}.get(kind, lambda s: "value")(schema)
        return f'({expr} | "null")' if schema.get("nullable") is True and kind != "null" else expr

    def array(self, schema: dict) -> str:
        item = self.value(schema["items"]) if isinstance(schema.get("items"), dict) else "value"
        return self.rule(f'"[" ({item} ("," {item})*)? "]"', "a")

    def object(self, schema: dict) -> str:
        """Declared properties (and no others, as in OpenAI's strict mode; {} for none) in dictsort order, each
        required one present: rule t_i is the rest from property i on once something was written, each item
        after its comma; the head picks the first property written (an optional one may be skipped)."""
        props = schema.get("properties")
        if not isinstance(props, dict):
            return "object"
        required = set(schema.get("required") or [])
        items = [(f"{_lark(k + ':')} {self.value(s)}", k in required) for k, s in _dictsort(props)]
        tails = [""] * (len(items) + 1)
        for i in reversed(range(1, len(items))):  # (t_0 would never be used)
            piece = f'"," {items[i][0]}' if items[i][1] else f'("," {items[i][0]})?'
            tails[i] = self.rule(f"{piece} {tails[i + 1]}".strip(), "t")
        head, empty = "", True  # the choices for the first item written; whether none may be written
        for i in reversed(range(len(items))):
            first = f"{items[i][0]} {tails[i + 1]}".strip()
            head, empty = (first, False) if items[i][1] else (f"{first} | {head}" if head else first, empty)
        if not head:
            return '"{}"'
        return self.rule(f'"{{" {self.rule(head, "h")}{"?" if empty else ""} "}}"', "o")


def _lark(text: str) -> str:
    """A Lark string literal (JSON's escapes, which llguidance reads)."""
    return json.dumps(text, ensure_ascii=False)


def _literal_rule(value) -> str:
    """Exactly value as format_value writes it: its text, with each <|"|> the special token."""
    parts = format_value(value).split(QUOTE)
    pieces = []
    for i, part in enumerate(parts):
        pieces += ([QUOTE] if i else []) + ([_lark(part)] if part else [])
    return "(" + " ".join(pieces) + ")"

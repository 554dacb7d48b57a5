"""Tool calls for both APIs: the request's tools checked, put into the prompt, the call constrained, and the
output read back as calls.

Three formats. A chat template that takes `tools` gets them through the tokenizer: Gemma 4's, whose calls
(`<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`) are constrained to the functions' schemas
(gemma4_format.call_grammar) and read by answer.py, and FunctionGemma's, whose calls are read from its own tokens
(`<start_function_call>call:NAME{key:<escape>text<escape>,n:3}<end_function_call>`). Any other template (Gemma
1-3 have no tool tokens) gets Google's documented Gemma function-calling prompt in the first user turn, and
the call is constrained (constrained.py): one compact JSON object `{"name": ..., "parameters": {...}}` per
line whose parameters match the function's schema, so it always parses. Under tool_choice "auto" the model
may instead answer in text (which then cannot start with "{"); "required" or a named function forces a
call; "none" leaves the tools out.
"""

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..decode import constrained
from ..decode.gemma4_format import call_grammar
from ..errors import MlxGemmaError
from .schemas import RequestError

# OpenAI allows [A-Za-z0-9_-]{1,64}; MCP clients send namespaced names (mcp:server:tool, a.b).
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Google's Gemma function-calling prompt (ai.google.dev/gemma/docs/capabilities/function-calling), JSON style;
# the last sentence, for several calls, is ours.
SETUP = ("You have access to functions. If you decide to invoke any of the function(s),\n"
         "you MUST put it in the format of\n"
         '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
         "You SHOULD NOT include any other text in the response if you call a function\n")
SEVERAL = "To call several functions, put each call on its own line.\n"


@dataclass
class Tools:
    functions: List[dict]  # {"name", "description", "parameters"}
    choice: str  # "auto", "required", "none" or a function's name
    parallel: bool = True
    native: bool = False  # the chat template takes the tools itself
    openai: List[dict] = field(default_factory=list)  # as sent, for a template that takes them
    gemma4: bool = False  # the template is Gemma 4's: native calls, constrained

    def grammar(self, thinking: bool = False, in_thought: bool = False) -> Optional[str]:
        """The Lark grammar of the answer (None: unconstrained). Gemma 4: a thought may come first (thinking),
        or the prompt opened one (in_thought)."""
        if self.choice == "none":
            return None
        if self.gemma4:
            return call_grammar(self.functions, self.choice, self.parallel, thinking=thinking, in_thought=in_thought)
        if self.native:
            return None
        names = [f["name"] for f in self.functions] if self.choice in ("auto", "required") else [self.choice]
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": self._schema(n)},
                  "required": ["name", "parameters"], "additionalProperties": False} for n in names]
        schema = dict(calls[0] if len(calls) == 1 else {"anyOf": calls}, **{"x-guidance": constrained.COMPACT})
        many = self.parallel and self.choice in ("auto", "required")
        lines = [f"start: {'calls | text' if self.choice == 'auto' else 'calls'}",
                 'calls: call ("\\n" call)*' if many else "calls: call",
                 f"call: %json {json.dumps(schema)}",
                 'text: /[^{\\n][\\s\\S]*/ | ""']
        return "\n".join(lines) + "\n"

    def _schema(self, name: str) -> dict:
        return next(f["parameters"] for f in self.functions if f["name"] == name)

    def setup(self) -> str:
        """The prompted format's instructions and function list, for the first user turn."""
        listed = [{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in self.functions]
        return SETUP + (SEVERAL if self.parallel else "") + json.dumps(listed, indent=2) + "\n"


def parse_tools(tools, tool_choice, parallel_tool_calls, template: str, ollama: bool = False) -> Optional[Tools]:
    """The request's tools, checked (each a 400 naming what is wrong), or None without any."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    functions, sent = [], []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-128 letters, digits, _ . : or -", param="tools")
        if name in (f["name"] for f in functions):
            raise RequestError(f"tools[{i}]: two functions are named {name!r}", param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema of type object", param="tools")
        functions.append(dict({"description": fn.get("description") or ""}, name=name, parameters=params))
        sent.append({"type": "function", "function": dict(fn, parameters=params)})
    choice = _choice(tool_choice, [f["name"] for f in functions])
    native = bool(template) and "tools" in template
    result = Tools(functions, choice, parallel_tool_calls is not False, native, sent, "<|tool_call>" in (template or ""))
    for f in functions:  # each schema compiles on its own: the error names the function
        try:
            _compile(constrained.grammar_of(json_schema=f["parameters"]))
        except (MlxGemmaError, ValueError) as e:
            raise RequestError(f"tools: the parameters of {f['name']!r} are not a usable JSON Schema: {e}",
                               param="tools") from None
    return result


def _compile(grammar: str) -> None:
    """Whether a grammar compiles (llguidance's check, without a tokenizer)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(constrained._line(error))


def _choice(tool_choice, names: List[str]) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        if fn["name"] not in names:
            raise RequestError(f"tool_choice names {fn['name']!r}, which is not among the tools", param="tool_choice")
        return fn["name"]
    raise RequestError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                       '{"name": ...}}', param="tool_choice")


# The conversation: past calls and their results, in either format


def conversation(turns: List[dict], tools: Optional[Tools], native: bool = False) -> Tuple[List[dict], dict]:
    """Chat turns ({"role", "content", "tool_calls"?, "tool_call_id"?, "name"?, "reasoning"?}) for the template,
    and the template's extra arguments. Every tool message must answer an earlier call (by id, or by name in
    Ollama's messages, which have no ids). native: the template takes tools, calls and results itself."""
    calls = {}  # id -> name, of the calls made so far
    out = []
    for i, t in enumerate(turns):
        if t["role"] == "assistant" and t.get("tool_calls"):
            parsed = [_past_call(c, i) for c in t["tool_calls"]]
            calls.update({cid: name for cid, name, _ in parsed})
            t = dict(t, tool_calls=[{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                                    for cid, name, args in parsed])
        elif t["role"] == "tool":
            cid, named = t.get("tool_call_id"), t.get("name")
            if cid:
                name = calls.get(cid)
            else:  # Ollama's tool messages carry the function's name (or nothing) instead of an id
                name = (named if named in calls.values() else None) if named else next(reversed(calls.values()), None)
            if name is None:
                raise RequestError(f"messages[{i}]: a tool message must answer an earlier tool call "
                                   f"(tool_call_id {cid!r} matches none)", param="messages")
            t = dict(t, name=name)
        out.append(t)
    if native or (tools is not None and tools.native):
        return out, ({"tools": tools.openai} if tools is not None and tools.choice != "none" else {})
    return _prompted(out, tools), {}


def _past_call(call, i: int):
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"messages[{i}].tool_calls: each call needs function.name", param="messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(f"messages[{i}].tool_calls: arguments are not JSON", param="messages") from None
    return call.get("id") or f"call_{i}_{fn['name']}", fn["name"], args


def _prompted(turns: List[dict], tools: Optional[Tools]) -> List[dict]:
    """The prompted format: calls as the JSON lines the model writes, results as user turns, the setup in
    front of the first user turn, and turns of one role next to each other merged (Gemma's templates want
    user and model to alternate)."""
    out, results = [], set()  # indices in out of turns that hold tool results
    for t in turns:
        result = t["role"] == "tool"
        if t["role"] == "assistant" and t.get("tool_calls"):
            lines = [json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]},
                                separators=(",", ":"), ensure_ascii=False) for c in t["tool_calls"]]
            t = {"role": "assistant", "content": "\n".join(([t["content"]] if t.get("content") else []) + lines)}
        elif result:
            t = {"role": "user", "content": f"Result of {t['name']}:\n```tool_output\n{t.get('content') or ''}\n```"}
        else:
            t = {"role": t["role"], "content": t.get("content") or ""}
        if out and out[-1]["role"] == t["role"] and (result or len(out) - 1 in results):
            out[-1] = dict(out[-1], content=out[-1]["content"] + "\n\n" + t["content"])
        else:
            out.append(t)
        if result:
            results.add(len(out) - 1)
    if tools is not None and tools.choice != "none":
        first = next((i for i, t in enumerate(out) if t["role"] == "user"), None)
        if first is None:
            raise RequestError("tools need a user message", param="messages")
        out[first] = dict(out[first], content=tools.setup() + out[first]["content"])
    return out


# The answer: text, or calls


@dataclass
class Call:
    id: str
    name: str
    arguments: dict

    def openai(self, index: Optional[int] = None) -> dict:
        body = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return body if index is None else dict(body, index=index)


def new_id(prefix: str = "call_") -> str:
    """An id as OpenAI's (and Anthropic's) look: a prefix and 24 hex digits."""
    return prefix + uuid.uuid4().hex[:24]


START, END = "<start_function_call>", "<end_function_call>"


def read_calls(text: str, tools: Tools) -> Tuple[str, List[Call]]:
    """(content, calls) of a finished answer."""
    if tools.native:
        calls = [Call(new_id(), *_native_call(body)) for body in re.findall(
            re.escape(START) + r"(.*?)" + re.escape(END), text, re.S)]
        content = re.sub(re.escape(START) + r".*?" + re.escape(END), "", text, flags=re.S).strip()
        return (content if calls else text), calls
    if not text.startswith("{"):
        return text, []
    calls = []
    for line in text.split("\n"):
        call = json.loads(line)  # the grammar made it so
        calls.append(Call(new_id(), call["name"], call["parameters"]))
    return "", calls


def _native_call(body: str):
    """FunctionGemma's `call:NAME{key:value,...}`: strings between <escape> tokens, keys bare."""
    m = re.match(r"\s*call:([^{\s]+)\s*(\{.*\})\s*$", body, re.S)
    if not m:
        return body.strip(), {}
    value, _ = _value(m.group(2), 0)
    return m.group(1), value if isinstance(value, dict) else {"value": value}


def _value(s: str, i: int):
    esc = "<escape>"
    if s.startswith(esc, i):
        end = s.find(esc, i + len(esc))
        end = len(s) if end < 0 else end
        return s[i + len(esc): end], end + len(esc)
    if s[i] in "{[":
        close, items, obj, i = "}" if s[i] == "{" else "]", [], s[i] == "{", i + 1
        while i < len(s) and s[i] != close:
            if obj:
                colon = s.index(":", i)
                key, (val, i) = s[i:colon].strip(), _value(s, colon + 1)
                items.append((key, val))
            else:
                val, i = _value(s, i)
                items.append(val)
            i += 1 if i < len(s) and s[i] == "," else 0
        return (dict(items) if obj else items), i + 1
    m = re.compile(r"[^,}\]]*").match(s, i)
    raw = m.group(0).strip()
    try:
        return json.loads(raw), m.end()
    except ValueError:
        return raw, m.end()


class CallStream:
    """The prompted format's calls as OpenAI streams them: the call's id and name once its name is complete,
    then its arguments in pieces (holding back the character that may close the call). feed(text) returns the
    deltas ({"index", "id"?, "type"?, "function": {"name"?, "arguments"}}) ready so far."""

    HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"parameters":')

    def __init__(self):
        self.buffer, self.index, self.sent, self.head = "", -1, 0, None
        self.made: List[list] = []  # [id, name, arguments text] of each call begun

    def feed(self, text: str, final: bool = False) -> List[dict]:
        self.buffer += text
        out = []
        while True:
            if self.head is None:
                m = self.HEAD.match(self.buffer.lstrip("\n"))
                if not m:
                    return out
                self.buffer = self.buffer.lstrip("\n")
                self.index, self.head, self.sent = self.index + 1, m.end(), m.end()
                out.append({"index": self.index, "id": new_id(), "type": "function",
                            "function": {"name": json.loads(m.group(1)), "arguments": ""}})
                self.made.append([out[-1]["id"], out[-1]["function"]["name"], ""])
            end = _call_end(self.buffer)
            stop = (end - 1) if end is not None else (len(self.buffer) if final else len(self.buffer) - 1)
            if stop > self.sent:
                out.append({"index": self.index, "function": {"arguments": self.buffer[self.sent:stop]}})
                self.made[-1][2] += self.buffer[self.sent:stop]
                self.sent = stop
            if end is None:
                return out
            self.buffer, self.head = self.buffer[end:], None


def _call_end(text: str) -> Optional[int]:
    """Where the first complete JSON object of text ends, or None while it is incomplete."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
        return end
    except json.JSONDecodeError:
        return None


class AnswerStream:
    """One choice's answer as OpenAI streams it: content deltas, or (once its first character is "{", which
    text under tools cannot start with) tool-call deltas. FunctionGemma's calls are sent whole at the end."""

    def __init__(self, tools: Tools):
        self.tools, self.mode, self.buffer, self.calls = tools, None, "", CallStream()
        self.calls_made: List[Call] = []  # once ended by itself ("stop")

    def feed(self, text: str) -> List[dict]:
        if self.tools.native or self.mode is None:
            self.buffer += text
            if self.tools.native or not self.buffer:
                return []
            self.mode = "calls" if self.buffer.startswith("{") else "text"
            text, self.buffer = self.buffer, ""
        if self.mode == "text":
            return [{"content": text}] if text else []
        return [{"tool_calls": [d]} for d in self.calls.feed(text)]

    def end(self, finish: str) -> Tuple[List[dict], str]:
        """The last deltas, and the finish reason ("tool_calls" when the answer was calls)."""
        if self.tools.native:
            content, calls = read_calls(self.buffer, self.tools) if finish == "stop" else (self.buffer, [])
            deltas = ([{"content": content}] if content else []) + [
                {"tool_calls": [c.openai(i)]} for i, c in enumerate(calls)]
            self.calls_made = calls
            return deltas, "tool_calls" if calls else finish
        if self.mode == "calls":
            deltas = [{"tool_calls": [d]} for d in self.calls.feed("", final=True)]
            if finish == "stop":
                self.calls_made = [Call(i, name, json.loads(args)) for i, name, args in self.calls.made]
            return deltas, ("tool_calls" if finish == "stop" else finish)
        return ([{"content": self.buffer}] if self.buffer else []), finish

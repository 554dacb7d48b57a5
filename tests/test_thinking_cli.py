"""Gemma 4's thinking switch in the Python API (stream_generate, generate_reply), python -m mlxgemma.generate and
python -m mlxgemma.chat: the prompt as transformers renders it, thoughts read apart from the answer (kept with
thinking on, dropped with it off), a thinking budget that closes the thought, thoughts on stderr / dimmed /
hidden, and one line with exit code 2 for each bad flag.

The tiny random Gemma 4 checkpoint (gemma4_chat_util) is made to write a script by a constraint: a grammar of
the exact text, or gemma4_chat_util.Forced in place of constrained.constraint_for."""

import importlib
import io
import sys

import pytest

import mlxgemma
from mlxgemma import chat as chat_module
from mlxgemma.decode import constrained
import gemma4_chat_util as g4
from server_util import chat_checkpoint

generate_module = importlib.import_module("mlxgemma.generate")  # (mlxgemma.generate is the function)

SCRIPT = "<|channel>thought\nplan\n<channel|>answer"
EXACT = r'start: <|channel> "thought\n" "plan\n" <channel|> "answer"'  # SCRIPT as a grammar
# The thought opened, then free text (a random model never closes it by itself), a close, free text again.
OPENED = 'start: <|channel> "thought\\n" TEXT <channel|> TEXT\nTEXT: /(?s:.+)/\n'
OPEN, CLOSE, LABEL_TOKENS = 100, 101, len("thought\n")  # (one token a character in this tokenizer)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def g4_path(tmp_path_factory):
    return g4.save(tmp_path_factory.mktemp("g4") / "ckpt")


@pytest.fixture(scope="module")
def g4_model(g4_path):
    return mlxgemma.load(g4_path)


@pytest.fixture(scope="module")
def g3_path(tmp_path_factory):
    return chat_checkpoint("gemma3", tmp_path_factory.mktemp("g3") / "ckpt")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _forced(monkeypatch, text: str = SCRIPT):
    """Every later generation writes exactly `text`, then <turn|>."""
    ids = list(g4.tokenizer().encode(text, add_special_tokens=False))
    monkeypatch.setattr(constrained, "constraint_for", lambda *a, **k: g4.Forced(ids, g4.TURN_END))


def _prompts(monkeypatch):
    """The token ids every later stream_generate renders its prompt into."""
    seen, real = [], generate_module.prompt_ids

    def recording(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(generate_module, "prompt_ids", recording)
    return seen


def _hf_ids(messages, **kwargs):
    return g4.tokenizer().encode(g4.hf_render(messages, **kwargs), add_special_tokens=False)


@pytest.mark.parametrize("flags, kwargs", [
    (["--think"], dict(enable_thinking=True)),
    (["--no-think"], dict(enable_thinking=False)),
    ([], {}),  # the template's default (off), not mlx-lm's (on for a vocabulary with thinking tokens)
    (["--chat-template-args", '{"enable_thinking": true}'], dict(enable_thinking=True)),
    (["--chat-template-args", '{"enable_thinking": true}', "--no-think"], dict(enable_thinking=False)),
])
def test_prompt_is_transformers_render(g4_path, monkeypatch, capsys, flags, kwargs):
    seen = _prompts(monkeypatch)
    assert generate_module.main(["--model", str(g4_path), "--prompt", "hi", "--max-tokens", "1", "--grammar", EXACT]
                                + flags) == 0
    assert seen == [_hf_ids(USER, **kwargs)]
    assert (g4.hf_render(USER) == g4.hf_render(USER, enable_thinking=False)) and "<|think|>" not in g4.hf_render(USER)


def test_thought_and_answer_read_apart(g4_model):
    model, tokenizer = g4_model
    chunks = list(mlxgemma.stream_generate(model, tokenizer, "hi", think=True, grammar=EXACT, max_tokens=40))
    assert "".join(c.text for c in chunks) == "answer" and "".join(c.reasoning for c in chunks) == "plan"
    assert not any(c.text and c.reasoning for c in chunks)
    last_thought = max(i for i, c in enumerate(chunks) if c.reasoning)
    assert last_thought < min(i for i, c in enumerate(chunks) if c.text)  # streamed as it comes: thought first
    assert chunks[-1].finish_reason == "stop"
    reply = mlxgemma.generate_reply(model, tokenizer, "hi", think=True, grammar=EXACT, max_tokens=40)
    assert reply == mlxgemma.Reply("answer", "plan", "stop", [])
    assert mlxgemma.generate(model, tokenizer, "hi", think=True, grammar=EXACT, max_tokens=40) == "answer"


@pytest.mark.parametrize("think", [False, None])
def test_thoughts_dropped_with_thinking_off(g4_model, think):
    model, tokenizer = g4_model
    reply = mlxgemma.generate_reply(model, tokenizer, "hi", think=think, grammar=EXACT, max_tokens=40)
    assert reply == mlxgemma.Reply("answer", "", "stop", [])


def test_stop_strings_apply_to_the_text_as_written_and_calls_are_read(g4_model):
    model, tokenizer = g4_model
    cut = mlxgemma.generate_reply(model, tokenizer, "hi", think=True, grammar=EXACT, max_tokens=40, stop=["swer"])
    assert (cut.text, cut.reasoning, cut.finish_reason) == ("an", "plan", "stop")
    call = r'start: "ok" <|tool_call> "call:get{city:" <|"|> "Paris" <|"|> "}" <tool_call|>'
    reply = mlxgemma.generate_reply(model, tokenizer, "hi", grammar=call, max_tokens=40)
    assert reply == mlxgemma.Reply("ok", "", "stop", [("get", {"city": "Paris"})])


def test_budget_closes_the_thought_after_n_tokens(g4_model):
    model, tokenizer = g4_model
    free = [c.token for c in mlxgemma.stream_generate(model, tokenizer, "hi", think=True, grammar=OPENED,
                                                       max_tokens=40)]
    assert free[0] == OPEN and CLOSE not in free  # unbounded, this model thinks on to max_tokens
    n = LABEL_TOKENS + 4  # the channel's name ("thought\n") is not thought: the budget counts after it
    chunks = list(mlxgemma.stream_generate(model, tokenizer, "hi", think=True, grammar=OPENED, max_tokens=40,
                                           max_thinking_tokens=4))
    tokens = [c.token for c in chunks]
    assert tokens[:n + 1] == free[:n + 1] and tokens[n + 1] == CLOSE  # n tokens of thought, then the close
    assert len(tokens) == 40 and "".join(c.text for c in chunks)  # the answer goes on after it
    assert "".join(c.reasoning for c in chunks) == tokenizer.decode(free[1 + LABEL_TOKENS:n + 1])


def test_budget_counts_a_thought_the_prompt_opened(g4_model):
    """After tool results with thinking on, the prompt ends in `<|channel>thought\\n`: the count starts there."""
    model, tokenizer = g4_model
    call = {"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}
    messages = USER + [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "content": "sunny", "name": "get"}]
    assert g4.hf_render(messages, enable_thinking=True).endswith("<|channel>thought\n")
    grammar = 'start: TEXT <channel|> TEXT\nTEXT: /(?s:.+)/\n'
    chunks = list(mlxgemma.stream_generate(model, tokenizer, messages, think=True, grammar=grammar, max_tokens=12,
                                           max_thinking_tokens=3))
    tokens = [c.token for c in chunks]
    assert tokens[3] == CLOSE and CLOSE not in tokens[:3]
    assert "".join(c.reasoning for c in chunks) == tokenizer.decode(tokens[:3])


def test_generate_cli_thoughts_on_stderr(g4_path, capsys, monkeypatch):
    base = ["--model", str(g4_path), "--prompt", "hi", "--max-tokens", "40", "--grammar", EXACT]
    assert generate_module.main(base + ["--think"]) == 0
    out, err = capsys.readouterr()
    assert out == "answer\n" and err.startswith("plan\n") and "\x1b[" not in err
    monkeypatch.setattr(sys, "stderr", Tty())
    assert generate_module.main(base + ["--think"]) == 0
    assert capsys.readouterr().out == "answer\n" and sys.stderr.getvalue().startswith("\x1b[2mplan\x1b[0m\n")
    monkeypatch.undo()
    for flags in (["--think", "--hide-thinking"], ["--no-think"]):
        assert generate_module.main(base + flags) == 0
        out, err = capsys.readouterr()
        assert out == "answer\n" and "plan" not in err and err.startswith("prompt:")


def test_generate_cli_budget(g4_path, g4_model, capsys):
    model, tokenizer = g4_model
    reply = mlxgemma.generate_reply(model, tokenizer, "hi", think=True, grammar=OPENED, max_tokens=20,
                                    max_thinking_tokens=2)
    assert generate_module.main(["--model", str(g4_path), "--prompt", "hi", "--max-tokens", "20", "--think",
                                 "--grammar", OPENED, "--max-thinking-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == reply.text + "\n" and err.startswith(reply.reasoning + "\n") and reply.text


def test_chat_session_keeps_the_thought_as_reasoning(g4_model, monkeypatch):
    model, tokenizer = g4_model
    _forced(monkeypatch)
    fed, real = [], chat_module.stream_generate

    def recording(model, tokenizer, prompt, history=(), **kw):
        fed.append(list(history) + list(prompt))
        return real(model, tokenizer, prompt, history=history, **kw)

    monkeypatch.setattr(chat_module, "stream_generate", recording)
    session = chat_module.ChatSession(model, tokenizer, think=True, max_tokens=40)
    assert "".join(session.reply("hi")) == "answer" and session.last_reasoning == "plan"
    assert session.messages[-1] == {"role": "assistant", "content": "answer", "reasoning": "plan"}
    assert "".join(session.reply("again")) == "answer"
    assert fed[1] == _hf_ids(session.messages[:3], enable_thinking=True)  # (the template drops the old thought)
    quiet = chat_module.ChatSession(model, tokenizer, think=False, max_tokens=40)
    assert "".join(quiet.reply("hi")) == "answer" and quiet.last_reasoning == ""
    assert quiet.messages[-1] == {"role": "assistant", "content": "answer"}


@pytest.mark.parametrize("flags, stdout, shown", [
    (["--think"], io.StringIO, "plan\nanswer\n"),
    (["--think"], Tty, "\x1b[2mplan\x1b[0m\nanswer\n"),
    (["--think", "--hide-thinking"], Tty, "answer\n"),
    (["--no-think"], io.StringIO, "answer\n"),
])
def test_chat_repl_shows_thoughts_dimmed_or_hides_them(g4_path, monkeypatch, flags, stdout, shown):
    _forced(monkeypatch)
    lines = iter(["hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys, "stdout", stdout())
    assert chat_module.main(["--model", str(g4_path), "--max-tokens", "40"] + flags) == 0
    assert sys.stdout.getvalue() == shown


@pytest.mark.parametrize("flags, message", [
    (["--chat-template-args", "{bad"], "--chat-template-args is not JSON"),
    (["--chat-template-args", "[1]"], "--chat-template-args must be a JSON object"),
    (["--max-thinking-tokens", "-1"], "--max-thinking-tokens must be >= 0, got -1"),
])
@pytest.mark.parametrize("command", [generate_module.main, chat_module.main])
def test_bad_flags_before_loading(tmp_path, capsys, command, flags, message):
    missing = ["--model", str(tmp_path / "no-model")]  # checked before any model loads: it is never looked for
    prompt = ["--prompt", "hi"] if command is generate_module.main else []
    assert command(missing + prompt + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("flags, message", [
    (["--think"], "has no thinking switch"),
    (["--max-thinking-tokens", "5"], "--max-thinking-tokens needs a model with a thought channel"),
])
def test_thinking_flags_on_a_model_without_them(g3_path, capsys, monkeypatch, flags, message):
    assert generate_module.main(["--model", str(g3_path), "--prompt", "hi", "--max-tokens", "2"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and message in err.splitlines()[-1]
    monkeypatch.setattr("builtins.input", lambda prompt="": "/quit")
    assert chat_module.main(["--model", str(g3_path)] + flags) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert generate_module.main(["--model", str(g3_path), "--prompt", "hi", "--max-tokens", "2", "--no-think"]) == 0

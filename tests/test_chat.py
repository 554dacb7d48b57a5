"""The chat REPL: the cache carries over turns (only new tokens are prefilled) without changing the replies;
/reset, /quit, Ctrl-C."""

import io
import json
import sys

import pytest

import mlxgemma
from mlxgemma import chat as chat_module
from mlxgemma.chat import ChatSession, main
from reference import hf_model, save_checkpoint

# Like Gemma's: a past reply is rendered after the same header the generation prompt ends with (t8).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}t4 {{ m['content'] }} t6 {% else %}"
            "t8 {{ m['content'] }} t7 {% endif %}{% endfor %}{% if add_generation_prompt %}t8{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_checkpoint(hf_model("gemma2", tie_word_embeddings=False, eos_token_id=1),
                           tmp_path_factory.mktemp("chat") / "ckpt")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    return path


def test_turns_prefill_only_new_tokens(ckpt, monkeypatch):
    fed = []
    real = chat_module.stream_generate

    def recording(model, tokenizer, prompt, **kw):
        fed.append(len(prompt))
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(chat_module, "stream_generate", recording)
    model, tokenizer = mlxgemma.load(ckpt)
    session = ChatSession(model, tokenizer, max_tokens=6)
    first = "".join(session.reply("t10 t11 t12"))
    second = "".join(session.reply("t20 t21"))
    full = chat_module.prompt_ids(tokenizer, session.messages[:-1])
    assert fed[1] < len(full) // 2, "the second turn re-prefilled the conversation"
    assert session.cache[0].offset == len(session.cached)
    fresh = ChatSession(model, tokenizer, max_tokens=6)
    fresh.messages = session.messages[:2]
    assert "".join(fresh.reply("t20 t21")) == second and first


def test_repl_commands_and_ctrl_c(ckpt, monkeypatch, capsys):
    real = chat_module.stream_generate

    def interrupted(*a, **kw):
        for i, chunk in enumerate(real(*a, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield chunk

    lines = iter(["t10 t11", "/reset", "t12", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(chat_module, "stream_generate", interrupted)
    assert main(["--model", str(ckpt), "--max-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert err.count("[stopped]") == 2 and "[conversation reset]" in err


def test_repl_eof_and_no_template(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--model", str(ckpt)]) == 0
    plain = save_checkpoint(hf_model("gemma"), tmp_path / "plain")
    assert main(["--model", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_a_refused_turn_leaves_the_conversation_as_it_was(ckpt, tmp_path):
    """A turn longer than the context is one error; it does not stay in the history, so the next turn works
    and gives what it gives in a conversation that never saw the refused turn."""
    import shutil

    from mlxgemma import MlxGemmaError

    path = shutil.copytree(ckpt, tmp_path / "short")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=40)))
    model, tokenizer = mlxgemma.load(path)
    session = ChatSession(model, tokenizer, max_tokens=4)
    first = "".join(session.reply("t10 t11"))
    with pytest.raises(MlxGemmaError, match="but the model's context is 40"):
        "".join(session.reply(" ".join(["t12"] * 50)))
    assert len(session.messages) == 2
    after = "".join(session.reply("t13"))
    fresh = ChatSession(model, tokenizer, max_tokens=4)
    assert "".join(fresh.reply("t10 t11")) == first and "".join(fresh.reply("t13")) == after
    assert [m["content"] for m in session.messages] == [m["content"] for m in fresh.messages]

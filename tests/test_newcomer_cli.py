"""A new user's first hour on the command line: every option checked before the model loads, backslash
escapes in --stop, a summary line that never claims a speed it did not measure, defaults in --help."""

import pytest

import mlxgemma
from mlxgemma.cli import unescape
from mlxgemma.generate import Chunk, configure_parser, main, summary
from reference import hf_model, save_checkpoint


def test_options_are_checked_before_the_model_loads(capsys):
    # the model path does not exist: only a check made before loading can answer
    for args, words in [(["--prompt", "   "], "the prompt is empty"), (["--prompt", "hi", "--temp", "-1"], "--temp"),
                        (["--prompt", "hi", "--top-p", "0"], "--top-p"), (["--prompt", "hi", "-m", "0"], "--max-tokens")]:
        assert main(["--model", "./not-here", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_stop_escapes_work_as_typed():
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb"
    assert unescape("plain") == "plain" and unescape("ends with \\") == "ends with \\"  # not an escape: as typed
    assert unescape("日本\\n") == "日本\n"


def test_stop_reaches_generation_unescaped(tmp_path, monkeypatch, capsys):
    path = save_checkpoint(hf_model("gemma"), tmp_path / "m")
    seen = {}
    real = mlxgemma.generate.__globals__["stream_generate"]

    def spy(*a, **kw):
        seen.update(kw)
        yield from real(*a, **kw)
    monkeypatch.setitem(mlxgemma.generate.__globals__, "stream_generate", spy)
    assert main(["--model", str(path), "--prompt", "t5 t6", "--ignore-chat-template", "-m", "3",
                 "--stop", r"\n\n"]) == 0
    assert seen["stop"] == ["\n\n"]


def test_summary_has_no_speed_for_one_token():
    one = Chunk("", 5, -0.1, "stop", prompt_tokens=7, prompt_tps=50.0, generation_tokens=1, generation_tps=20600.0)
    line = summary(one)
    assert "generation: 1 token |" in line and "20600" not in line
    many = Chunk("", 5, -0.1, "length", prompt_tokens=7, prompt_tps=50.0, generation_tokens=9, generation_tps=12.5)
    assert "generation: 9 tokens, 12.5 tokens/s" in summary(many)


@pytest.mark.parametrize("flag", ["--temp", "--top-p", "--top-k", "--min-p", "--max-tokens", "--seed"])
def test_help_states_defaults(flag):
    text = configure_parser().format_help()
    options = text[text.index("options:"):]
    block = options[options.index(f"\n  {flag}"):]
    assert "default" in block[: block.index("\n  -", 1)]

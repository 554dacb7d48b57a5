"""EmbeddingGemma (a sentence-transformers folder: a bidirectional Gemma 3 encoder, mean pooling, two Dense
modules, Normalize, task prompts) against sentence-transformers itself, on a tiny random float32 checkpoint
whose window (6, halved to 4 as transformers does) is shorter than the inputs and whose tokenizer adds <bos>
and <eos> as EmbeddingGemma's does: texts of several lengths, every prompt, Matryoshka dimensions, batches
with padding (each row equal to its input alone), inputs cut at max_seq_length, token ids; the command line;
bad input."""

import json

import numpy as np
import pytest

import mlx.core as mx

import mlxgemma
from embedding_util import MAX_LEN, PROMPTS, TEXTS, save
from mlxgemma.errors import MlxGemmaError

@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    """(sentence-transformers model, its folder, mlxgemma's (model, tokenizer))."""
    st, path = save(tmp_path_factory.mktemp("embeddinggemma"))
    return st, path, mlxgemma.load(path)


def _ours(model, tok, texts, **kw):
    return np.array(mlxgemma.embed(model, tok, texts, **kw))


def _close(ours, ref):
    ref = np.asarray(ref, dtype=np.float64)
    cosine = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.max(np.abs(ours - ref)) <= 1e-5 and cosine.min() >= 0.99999


@pytest.mark.parametrize("prompt_name", [None, *PROMPTS])
def test_equals_sentence_transformers(st_model, prompt_name):
    """Every prompt; batches of 2 (padded) and the whole list at once: each row as sentence-transformers."""
    st, _, (model, tok) = st_model
    ref = st.encode(TEXTS, prompt_name=prompt_name)
    for batch_size in (2, 32):
        _close(_ours(model, tok, TEXTS, prompt_name=prompt_name, batch_size=batch_size), ref)
    alone = np.concatenate([_ours(model, tok, [t], prompt_name=prompt_name) for t in TEXTS])
    _close(alone, ref)


@pytest.mark.parametrize("dim", [8, 16, 31])
def test_matryoshka_dimensions(st_model, dim):
    st, _, (model, tok) = st_model
    ref = st.encode(TEXTS, prompt_name="query", truncate_dim=dim, normalize_embeddings=True)
    _close(_ours(model, tok, TEXTS, prompt_name="query", dim=dim), ref)
    raw = st.encode(TEXTS, prompt_name="query", truncate_dim=dim)  # (sentence-transformers' default: as cut)
    _close(_ours(model, tok, TEXTS, prompt_name="query", dim=dim, normalize=False), raw)


def test_long_inputs_are_cut_and_ids_are_taken(st_model):
    """An input longer than max_seq_length is cut there, as sentence-transformers cuts it; the same ids given
    as token ids give the same embedding."""
    st, _, (model, tok) = st_model
    ids = st.tokenizer([TEXTS[2]], truncation=True, max_length=MAX_LEN)["input_ids"][0]
    assert len(ids) == MAX_LEN
    ours = _ours(model, tok, [TEXTS[2], list(ids)])
    _close(ours[:1], st.encode([TEXTS[2]]))
    _close(ours[1:], ours[:1])
    assert np.array(mlxgemma.embed(model, tok, list(ids))).shape == (1, 32)  # one list of ids is one input


def test_command_line(st_model, tmp_path, capsys, monkeypatch):
    import io

    from mlxgemma.embed import main

    st, path, (model, tok) = st_model
    files = []
    for i, t in enumerate(TEXTS[:3]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(t)
    assert main(["--model", str(path), "--prompt-name", "document", *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == list(map(str, files))
    _close(np.array([r["embedding"] for r in rows]), st.encode(TEXTS[:3], prompt_name="document"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS[:4]).encode())))
    assert main(["--model", str(path), "--dim", "16", "--batch-size", "2", "-o", str(tmp_path / "v.npy")]) == 0
    _close(np.load(tmp_path / "v.npy"), st.encode(TEXTS[:4], truncate_dim=16, normalize_embeddings=True))


def test_bad_input(st_model, tmp_path, capsys):
    from mlxgemma.embed import main

    _, path, (model, tok) = st_model
    for kw, message in [(dict(inputs=[]), "non-empty list"), (dict(inputs=[[]]), "non-empty list of token ids"),
                        (dict(inputs=["t5"], dim=0), "dimensions must be 1..32"),
                        (dict(inputs=["t5"], dim=33), "dimensions must be 1..32"),
                        (dict(inputs=["t5"], prompt_name="search"), "not one of this model's prompts"),
                        (dict(inputs=["t5"], prompt_name="query", prompt="x"), "not both"),
                        (dict(inputs=[[5, 500]]), "token ids must be integers in 0..95"),
                        (dict(inputs=["t5"], batch_size=0), "batch_size must be a positive integer")]:
        with pytest.raises(MlxGemmaError, match=message):
            mlxgemma.embed(model, tok, **kw)
    chat_model, chat_tok = mlxgemma.load(path.parent / "encoder")  # the bare encoder: no pooling head
    with pytest.raises(MlxGemmaError, match="not an embedding model"):
        mlxgemma.embed(chat_model, chat_tok, "t5")
    assert main(["--model", str(path), str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--model", str(path), "--output", str(tmp_path / "v.txt"), str(path / "modules.json")]) == 2
    assert ".npy" in capsys.readouterr().err
    assert mx.array([0]).size == 1


@pytest.mark.slow
def test_convert_and_quantize(st_model, tmp_path):
    """convert keeps the sentence-transformers folder (its Dense modules exact: copied) and writes the encoder:
    in float the embeddings are the source's; -q quantizes the encoder only; sentence-transformers loads the
    float output."""
    from sentence_transformers import SentenceTransformer

    from mlxgemma.checkpoints.convert import convert

    st, path, (model, tok) = st_model
    ref = st.encode(TEXTS, prompt_name="query")
    out = convert(path, tmp_path / "float")
    _close(_ours(*mlxgemma.load(out), TEXTS, prompt_name="query"), ref)
    _close(SentenceTransformer(str(out)).encode(TEXTS, prompt_name="query"), ref)
    quantized, qtok = mlxgemma.load(convert(path, tmp_path / "q", quantize=True, q_group_size=32, q_bits=8))
    assert type(quantized.model.layers[0].mlp.gate_proj).__name__ == "QuantizedLinear"
    assert all(type(d).__name__ == "Linear" for d in quantized.dense)
    assert (tmp_path / "q" / "2_Dense" / "model.safetensors").read_bytes() == (path / "2_Dense" / "model.safetensors").read_bytes()
    q = _ours(quantized, qtok, TEXTS, prompt_name="query")
    assert ((q * ref).sum(-1)).min() > 0.99  # (8-bit: close, not equal)


@pytest.mark.slow
def test_search_example(st_model, tmp_path):
    """examples/search.py indexes a folder (passages of each text file, document prompt) and answers a query
    (query prompt) with the passages whose vectors score highest against it, best first."""
    import subprocess
    import sys
    from pathlib import Path

    _, path, (model, tok) = st_model
    notes = tmp_path / "notes"
    notes.mkdir()
    for i, t in enumerate(TEXTS[:4]):
        (notes / f"{i}.txt").write_text(t + "\n")
    (notes / "skip.bin").write_bytes(b"\xff\xfe")
    script = Path(__file__).parent.parent / "examples" / "search.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a, "--model", str(path), "--index",  # noqa: E731
                                     str(tmp_path / "ix")], capture_output=True, text=True, timeout=300)
    assert run("index", str(notes)).returncode == 0
    out = run("query", "t12 t13", "--top", "2")
    assert out.returncode == 0, out.stderr
    docs = np.array(mlxgemma.embed(model, tok, [t + "\n" for t in TEXTS[:4]], prompt_name="document"))
    query = np.array(mlxgemma.embed(model, tok, "t12 t13", prompt_name="query"))[0]
    best = np.argsort(-(docs @ query))[:2]
    lines = [line for line in out.stdout.splitlines() if line.strip() and not line.startswith(" ")]
    assert [Path(line.split()[1]).name for line in lines] == [f"{i}.txt" for i in best]
    assert run("query", "x", "--top", "1").returncode == 0
    assert "error:" in run("index", str(tmp_path / "empty-missing")).stderr


def test_batches_keep_padding_small():
    """Inputs sorted longest first go into batches of at most batch_size whose padded tokens stay within a
    quarter of their real ones (plus 64): every input once, in order."""
    from mlxgemma.embedding.encode import batches

    lengths = list(np.random.default_rng(0).integers(1, 600, 200))
    order = sorted(range(200), key=lambda i: -lengths[i])
    out = batches(order, lengths, 16)
    assert [i for b in out for i in b] == order and all(len(b) <= 16 for b in out)
    assert all(len(b) == 1 or lengths[b[0]] * len(b) <= 1.25 * sum(lengths[i] for i in b) + 64 for b in out)

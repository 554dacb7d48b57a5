"""The server's embeddings through the real clients: OpenAI's /v1/embeddings (strings, token ids, dimensions,
base64) and Ollama's /api/embed and /api/embeddings, each equal to mlxgemma.embed; an embedding model served
alone (chat refused) and beside a chat model (--embedding-model), where an embedding request is answered while
a long generation runs; bad input one 4xx each."""

import base64

import httpx
import numpy as np
import openai
import pytest

import mlxgemma
from embedding_util import MAX_LEN, TEXTS, save
from mlxgemma.errors import MlxGemmaError
from reference import WINDOW, random_ids
from server_util import chat_checkpoint, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save(tmp_path_factory.mktemp("embed-server"))[1]


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_openai_and_ollama_clients(folder):
    import ollama

    model, tok = mlxgemma.load(folder)
    server = serve(folder)
    try:
        client = _client(server)
        ref = np.array(mlxgemma.embed(model, tok, TEXTS))
        for fmt in (openai.NOT_GIVEN, "float", "base64"):  # (not given: the client asks base64 and decodes it)
            out = client.embeddings.create(model="m", input=TEXTS, encoding_format=fmt)
            assert [d.index for d in out.data] == list(range(len(TEXTS)))
            got = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                   for d in out.data]
            assert np.max(np.abs(np.array(got) - ref)) <= 1e-6
        ids = tok._tokenizer(TEXTS[:2])["input_ids"]
        assert out.usage.prompt_tokens == out.usage.total_tokens > 0
        by_ids = client.embeddings.create(model="m", input=ids)
        assert np.max(np.abs(np.array([d.embedding for d in by_ids.data]) - ref[:2])) <= 1e-6
        small = client.embeddings.create(model="m", input="t12 t13", dimensions=16,
                                         extra_body={"prompt_name": "query"})
        expected = np.array(mlxgemma.embed(model, tok, "t12 t13", dim=16, prompt_name="query"))[0]
        assert np.max(np.abs(np.array(small.data[0].embedding) - expected)) <= 1e-6
        o = ollama.Client(host=server.url)
        embedded = o.embed(model="m", input=TEXTS[:3], dimensions=16)
        ref16 = np.array(mlxgemma.embed(model, tok, TEXTS[:3], dim=16))
        assert np.max(np.abs(np.array(embedded.embeddings) - ref16)) <= 1e-6 and embedded.prompt_eval_count > 0
        legacy = o.embeddings(model="m", prompt=TEXTS[1])
        assert np.max(np.abs(np.array(legacy.embedding) - ref[1])) <= 1e-6
        with pytest.raises(openai.BadRequestError, match="is an embedding model"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        for body, message in [({"input": []}, "non-empty list"), ({"input": [[]]}, "non-empty list of token ids"),
                              ({"input": "t5", "dimensions": 33}, "dimensions must be 1..32"),
                              ({"input": "t5", "dimensions": 0}, "greater than 0"),
                              ({"input": "t5", "prompt_name": "nope"}, "not one of this model's prompts"),
                              ({"input": "t5", "encoding_format": "int8"}, "encoding_format"),
                              ({"input": [[5, 700]]}, "token ids must be integers"),
                              ({"input": ["a"] * 2049}, "at most 2048")]:
            r = httpx.post(server.url + "/v1/embeddings", json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
        long = " ".join(["t40"] * (MAX_LEN + 5))
        r = httpx.post(server.url + "/api/embed", json={"input": long, "truncate": False})
        assert r.status_code == 400 and "more than this model takes" in r.json()["error"]
        assert httpx.post(server.url + "/api/embed", json={"input": long}).status_code == 200
    finally:
        server.stop()


def test_beside_a_chat_model(folder, tmp_path):
    """--embedding-model beside a chat model: both answer; an embedding request made while a long generation
    streams is answered before that generation ends (the scheduler runs it between decode steps)."""
    chat = chat_checkpoint("gemma3", tmp_path / "chat")
    server = serve(chat, "--embedding-model", str(folder))
    try:
        client = _client(server)
        model, tok = mlxgemma.load(folder)
        prompt = random_ids(1, 6, seed=2, low=4)[0].tolist()  # (a prompt it continues to max_tokens)
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=40 * WINDOW, temperature=0,
                                           stream=True)
        chunks = iter(stream)
        next(chunks)  # (it decodes)
        out = client.embeddings.create(model="m", input=TEXTS)
        rest = list(chunks)
        assert len(rest) > 10 and rest[-1].choices[0].finish_reason == "length"  # it was still generating
        ref = np.array(mlxgemma.embed(model, tok, TEXTS))
        assert np.max(np.abs(np.array([d.embedding for d in out.data]) - ref)) <= 1e-6
    finally:
        server.stop()
    with pytest.raises(MlxGemmaError, match="not an embedding model"):
        serve(chat, "--embedding-model", str(chat))


def test_no_embedding_model(tmp_path):
    server = serve(chat_checkpoint("gemma3", tmp_path / "chat"))
    try:
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400 and "no embedding model" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/api/embed", json={"input": "hi"})
        assert r.status_code == 400 and "no embedding model" in r.json()["error"]
    finally:
        server.stop()

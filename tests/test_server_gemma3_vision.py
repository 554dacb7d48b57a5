"""The server with Gemma 3 and images: image_url parts and Ollama's images give what the library gives,
the prompt cache reuses a prefix only for the same image (every image's tokens are the same id), an image
sent again is not encoded again, and concurrent requests with different images equal each alone. And a
prompt-cache file preloaded into the server's prompt cache."""

import base64
import io
import threading

import numpy as np
import ollama
import openai
import pytest
from PIL import Image

import mlxgemma
from mlxgemma.media.features import FEATURES
from server_util import serve
from test_gemma3_vision import hf_gemma3_vision
from test_gemma3_vision_paths import vision_checkpoint


@pytest.fixture(scope="module")
def g3v(tmp_path_factory):
    server = serve(vision_checkpoint(hf_gemma3_vision(seed=6, eos_token_id=1), tmp_path_factory.mktemp("g3v") / "c"))
    yield server
    server.stop()


def concurrently(request, n: int) -> list:
    """request(i) for i < n, each from its own thread at once; the answers in order."""
    out = [None] * n

    def run(i):
        out[i] = request(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _ask(server, png: bytes, text: str = "t20 t21", max_tokens: int = 6):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens)


def _library(server, png: bytes, text: str = "t20 t21", max_tokens: int = 6) -> str:
    model, processor = server.engine.model, server.engine.processor
    return mlxgemma.generate(model, processor, [{"role": "user", "content": "<start_of_image>" + text}],
                             image=[Image.open(io.BytesIO(png))], max_tokens=max_tokens)


def test_image_url_and_ollama_images_equal_the_library(g3v):
    png = _png(0)
    ref = _library(g3v, png)
    assert _ask(g3v, png).choices[0].message.content == ref
    o = ollama.Client(host=g3v.url).chat(model="m", messages=[{"role": "user", "content": "t20 t21",
                                                               "images": [base64.b64encode(png).decode()]}],
                                         options={"num_predict": 6})
    assert o.message.content == ref
    assert "vision" in ollama.Client(host=g3v.url).show("m").capabilities


def test_prompt_cache_tells_images_apart(g3v):
    a, b = _png(1), _png(2)
    first = _ask(g3v, a)
    misses = FEATURES.misses
    other = _ask(g3v, b)  # same text, another image: nothing of a's cache may be reused past the image
    assert other.choices[0].message.content == _library(g3v, b)
    assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 6
    again = _ask(g3v, a)  # a repeat: its cache and its encoded image are reused
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    assert FEATURES.misses == misses + 1  # b alone was encoded


def test_concurrent_requests_with_different_images(g3v):
    pngs = [_png(10 + i) for i in range(4)]
    expected = [_library(g3v, p, f"t{30 + i}", 8) for i, p in enumerate(pngs)]
    out = concurrently(lambda i: _ask(g3v, pngs[i], f"t{30 + i}", 8).choices[0].message.content, 4)
    assert out == expected


def test_prompt_cache_file_preloaded(tmp_path):
    """A cached prompt given at start-up: a completion that begins with it prefills only the rest, and gives
    what the library gives for the whole prompt."""
    from mlxgemma.cache_prompt import cache_prompt
    from reference import hf_model, save_checkpoint

    path = save_checkpoint(hf_model("gemma2", eos_token_id=1), tmp_path / "g2")
    model, tok = mlxgemma.load(path)
    text = " ".join(f"t{10 + i}" for i in range(20))  # past gemma2's window of 6
    cache_prompt(model, tok, text, tmp_path / "p.safetensors")
    server = serve(path, "--prompt-cache-file", str(tmp_path / "p.safetensors"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="m", prompt=text + " t40 t41", max_tokens=6)
        assert out.usage.prompt_tokens_details.cached_tokens == len(tok.encode(text))
        assert out.choices[0].text == mlxgemma.generate(model, tok, text + " t40 t41", max_tokens=6, chat_template=False)
    finally:
        server.stop()
    with pytest.raises(mlxgemma.MlxGemmaError, match="not found"):
        serve(path, "--prompt-cache-file", str(tmp_path / "none.safetensors"))
    with pytest.raises(mlxgemma.MlxGemmaError, match="needs a prompt cache"):
        serve(path, "--prompt-cache-file", str(tmp_path / "p.safetensors"), "--prompt-cache-size", "0")


def test_quantized_kv_caches(tmp_path):
    """--kv-bits: each request as the library gives it with the same quantized caches (quantized from its
    prefill on), alone, batched with others, and again from the prompt cache."""
    from reference import hf_model, save_checkpoint

    path = save_checkpoint(hf_model("gemma2", eos_token_id=1, head_dim=32), tmp_path / "g2")
    model, tok = mlxgemma.load(path)
    prompts = [" ".join(f"t{10 + (i * k) % 80}" for i in range(14)) for k in (1, 3, 7)]  # past the window
    expected = [mlxgemma.generate(model, tok, p, max_tokens=8, chat_template=False, kv_bits=8, kv_group_size=32,
                                  quantized_kv_start=0) for p in prompts]
    server = serve(path, "--kv-bits", "8", "--kv-group-size", "32")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        out = concurrently(lambda i: client.completions.create(model="m", prompt=prompts[i], max_tokens=8)
                           .choices[0].text, 3)
        assert out == expected
        again = client.completions.create(model="m", prompt=prompts[0], max_tokens=8)
        assert again.choices[0].text == expected[0] and again.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        server.stop()
    with pytest.raises(mlxgemma.MlxGemmaError, match="kv-group-size"):
        serve(path, "--kv-bits", "8", "--kv-group-size", "48")


def test_prompt_lookup_speculation(tmp_path):
    """--prompt-lookup-ngram: a lone greedy request is checked several tokens a forward, past the window,
    and answers what plain greedy answers; concurrent requests decode batched as before."""
    from reference import hf_model, save_checkpoint

    path = save_checkpoint(hf_model("gemma2", eos_token_id=1), tmp_path / "g2")
    model, tok = mlxgemma.load(path)
    prompts = [" ".join(f"t{10 + i % 7}" for i in range(16)), " ".join(f"t{30 + i % 5}" for i in range(12))]
    expected = [mlxgemma.generate(model, tok, p, max_tokens=20, chat_template=False) for p in prompts]
    server = serve(path, "--prompt-lookup-ngram", "1", "--num-draft-tokens", "4")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="m", prompt=prompts[0], max_tokens=20).choices[0].text == expected[0]
        stats = server.engine.scheduler.stats
        assert stats["proposed"] > 0 and stats["accepted"] > 0
        out = concurrently(lambda i: client.completions.create(model="m", prompt=prompts[i], max_tokens=20)
                           .choices[0].text, 2)
        assert out == expected
        again = client.completions.create(model="m", prompt=prompts[1], max_tokens=20)  # from the prompt cache
        assert again.choices[0].text == expected[1] and again.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        server.stop()

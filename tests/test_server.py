"""The server, driven live with the real openai and ollama clients on tiny models: both APIs whole and
streamed, usage and cached tokens over a conversation longer than the window, stop strings, seeds, images
(T5Gemma 2); 8 concurrent requests equal to each request alone (Gemma 2, Gemma 3, StableLM); a client
leaving mid-stream; every bad input a 4xx with a clear message, the server unharmed."""

import base64
import io
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import ollama
import openai
import pytest
from PIL import Image

import mlxgemma
from reference import TOL, WINDOW, hf_t5gemma2, max_diff, random_ids, save_t5_checkpoint
from server_util import TEMPLATE, chat_checkpoint, serve

CONTEXT = 96


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Started on first use, shared by the module, stopped at its end."""
    root, running = tmp_path_factory.mktemp("server"), {}

    def get(name, family="gemma3", *options):
        if name not in running:
            path = root / family
            if not path.exists() and family.startswith("gemma4-"):  # tests/test_gemma4.py's variants
                from test_gemma4 import VARIANTS, hf_gemma4

                chat_checkpoint(hf_gemma4(**VARIANTS[family[7:]]), path)
            elif not path.exists():
                chat_checkpoint(family, path, max_position_embeddings=CONTEXT)
            running[name] = serve(path, "--max-request-bytes", "200000", *options)
        return running[name]

    yield get
    for s in running.values():
        s.stop()


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def chat(server, messages, **kw):
    return client(server).chat.completions.create(model="m", messages=messages, **kw)


def user(text):
    return {"role": "user", "content": text}


# Both APIs


def test_chat_whole_and_streamed(servers):
    s = servers("g3")
    whole = chat(s, [user("t10 t11 t12")], max_tokens=8)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(s.engine.chat(_messages([user("t10 t11 t12")])).ids)
    chunks = list(chat(s, [user("t10 t11 t12")], max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def _messages(ms):
    from mlxgemma.server.schemas import Message

    return [Message(**m) for m in ms]


def test_completions_match_the_library(servers):
    """Text and token-id prompts, whole and streamed, equal mlxgemma.generate's greedy output."""
    s = servers("g3")
    c = client(s)
    ref = list(mlxgemma.stream_generate(s.engine.model, s.engine.tokenizer, "t20 t21 t22", chat_template=False,
                                        max_tokens=10))
    for prompt in ["t20 t21 t22", s.engine.tokenizer.encode("t20 t21 t22")]:
        out = c.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
        assert out.choices[0].text == "".join(r.text for r in ref)
        assert max_diff(out.choices[0].logprobs.token_logprobs, [r.logprob for r in ref]) <= TOL
        assert all(len(t) == 2 for t in out.choices[0].logprobs.top_logprobs)
    streamed = c.completions.create(model="m", prompt="t20 t21 t22", max_tokens=10, stream=True)
    assert "".join(x.choices[0].text for x in streamed if x.choices) == "".join(r.text for r in ref)


def test_chat_logprobs_n_and_models(servers):
    s = servers("g3")
    out = chat(s, [user("t30")], max_tokens=5, logprobs=True, top_logprobs=3, n=2, temperature=1.0, seed=4)
    assert [c.index for c in out.choices] == [0, 1]
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens // 2 or len(content) <= 5
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert client(s).models.list().data[0].id == "gemma3"


def test_stop_strings_and_seeds(servers):
    s = servers("g3")
    text = chat(s, [user("t40 t41")], max_tokens=12).choices[0].message.content
    words = text.split()
    stop = words[min(2, len(words) - 1)]
    cut = text[: text.find(stop)]
    for stream in (False, True):
        out = chat(s, [user("t40 t41")], max_tokens=12, stop=[stop], stream=stream)
        got = "".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream else (
            out.choices[0].message.content)
        assert got == cut
    sampled = lambda seed: chat(s, [user("t40 t41")], max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                                extra_body={"top_k": 20, "min_p": 0.01}).choices[0].message.content
    assert sampled(7) == sampled(7)
    assert len({sampled(k) for k in range(4)}) > 1


def test_ollama_client(servers):
    s = servers("g3")
    o = ollama.Client(host=s.url)
    expected = chat(s, [user("t50 t51")], max_tokens=6).choices[0].message.content
    r = o.chat(model="gemma3", messages=[user("t50 t51")], options={"num_predict": 6})
    assert r.message.content == expected and r.done and r.eval_count <= 6 and r.prompt_eval_count > 0
    assert r.done_reason in ("stop", "length")
    parts = list(o.chat(model="gemma3", messages=[user("t50 t51")], options={"num_predict": 6}, stream=True))
    assert "".join(p.message.content for p in parts) == expected and parts[-1].done
    g = o.generate(model="gemma3", prompt="t20 t21 t22", raw=True, options={"num_predict": 10, "temperature": 0})
    ref = mlxgemma.generate(s.engine.model, s.engine.tokenizer, "t20 t21 t22", chat_template=False, max_tokens=10)
    assert g.response == ref
    assert o.list().models[0].model == "gemma3"
    assert "completion" in o.show("gemma3").capabilities
    assert httpx.get(s.url + "/api/version").json()["version"]
    assert httpx.get(s.url + "/health").json() == {"status": "ok"}


# The prompt cache


def test_conversation_past_the_window_reuses_the_cache(servers):
    """4 turns, the conversation far longer than the window: each turn after the first reuses the whole
    previous sequence (prompt + reply) and gives exactly the replies of a server without a prompt cache."""
    cached, plain = servers("g3"), servers("g3-nocache", "gemma3", "--prompt-cache-size", "0")
    messages, previous = [], None
    for turn in range(4):
        messages.append(user(" ".join(f"t{10 + (turn * 7 + i) % 80}" for i in range(WINDOW + 2))))
        a, b = chat(cached, messages, max_tokens=6), chat(plain, messages, max_tokens=6)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert b.usage.prompt_tokens_details.cached_tokens == 0
        if previous is not None:  # the previous prompt and reply (its last token too unless it was the eos)
            prompt_tokens, completion, finish = previous
            reused = a.usage.prompt_tokens_details.cached_tokens
            assert reused == prompt_tokens + completion - 1 if finish == "stop" else (
                prompt_tokens + completion - 1 <= reused <= prompt_tokens + completion)
        previous = (a.usage.prompt_tokens, a.usage.completion_tokens, a.choices[0].finish_reason)
        messages.append({"role": "assistant", "content": a.choices[0].message.content})
    assert a.usage.prompt_tokens > 4 * WINDOW
    # the last reply regenerated (the same messages again, sampled): all but the prompt's last token reused
    again = chat(cached, messages[:-1], max_tokens=6, temperature=1.0, seed=1)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == chat(plain, messages[:-1], max_tokens=6, temperature=1.0,
                                                    seed=1).choices[0].message.content
    # an edited conversation (the last user message changed) reuses less, and still gives the plain answer
    messages[-2] = user("t90 t91")
    a, b = chat(cached, messages[:-1], max_tokens=6), chat(plain, messages[:-1], max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert 0 < a.usage.prompt_tokens_details.cached_tokens < a.usage.prompt_tokens


# Continuous batching


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "stablelm", "gemma4-E", "gemma4-moe"])
def test_eight_concurrent_requests_equal_each_alone(servers, family, monkeypatch):
    s = servers(family, family, "--prefill-step-size", "5")  # long prompts prefill in chunks between steps
    lengths = [1, 3, 5, WINDOW, WINDOW + 2, 2 * WINDOW, 2 * WINDOW + 5, 3 * WINDOW + 1]
    prompts = [[int(t) for t in random_ids(1, n, seed=n, low=4)[0]] for n in lengths]
    max_tokens = [12 + 2 * i for i in range(8)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait(timeout=30)
        results[i] = client(s).completions.create(model="m", prompt=prompts[i], max_tokens=max_tokens[i],
                                                  temperature=0, logprobs=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    scheduler, held, lock = s.engine.scheduler, [], threading.Lock()

    def submit_together(request):  # all 8 reach the scheduler at once, however the threads are timed
        with lock:
            held.append(request)
            if len(held) == 8:
                for r in held:
                    type(scheduler).submit(scheduler, r)

    monkeypatch.setattr(scheduler, "submit", submit_together)
    scheduler.stats["peak_rows"] = 0
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert scheduler.stats["peak_rows"] >= 4  # they did decode together
    for i in range(8):
        ref = list(mlxgemma.stream_generate(s.engine.model, s.engine.tokenizer, prompts[i], max_tokens=max_tokens[i]))
        choice = results[i].choices[0]
        assert choice.text == "".join(r.text for r in ref)
        assert max_diff(choice.logprobs.token_logprobs, [r.logprob for r in ref]) <= TOL


def test_a_client_leaving_mid_stream_frees_its_row(servers):
    s = servers("g3")
    body = {"messages": [user("t60 t61")], "max_tokens": CONTEXT - 10, "stream": True}
    other = {}

    def short():
        other["text"] = chat(s, [user("t70 t71")], max_tokens=8).choices[0].message.content

    cancelled = s.engine.scheduler.stats["cancelled"]
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            t = threading.Thread(target=short)
            t.start()
            deadline = time.time() + 5  # (leave once the short one decodes beside it: a fixed wait raced the
            while len(s.engine.scheduler.rows) < 2 and time.time() < deadline:  # long one's end on a quiet machine)
                time.sleep(0.002)
    assert any(line.startswith("data: ") for line in got)
    t.join(timeout=60)
    deadline = time.time() + 5
    while s.engine.scheduler.rows and time.time() < deadline:
        time.sleep(0.05)
    assert not s.engine.scheduler.rows and s.engine.scheduler.stats["cancelled"] == cancelled + 1
    assert other["text"] == chat(s, [user("t70 t71")], max_tokens=8).choices[0].message.content


# Images (T5Gemma 2)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = save_t5_checkpoint(hf_t5gemma2(eos_token_id=1), tmp_path_factory.mktemp("t5") / "ckpt")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    server = serve(path)
    yield server
    server.stop()


def _png(seed=0, size=(24, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_images_in_chat(t5):
    png = _png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "t5 t6"}]
    out = chat(t5, [{"role": "user", "content": content}], max_tokens=8)
    model, processor = t5.engine.model, t5.engine.processor
    ref = mlxgemma.generate(model, processor, [user("<start_of_image>t5 t6")], image=[Image.open(io.BytesIO(png))],
                            max_tokens=8)
    assert out.choices[0].message.content == ref
    assert "vision" in ollama.Client(host=t5.url).show("t5").capabilities
    o = ollama.Client(host=t5.url).chat(model="t5", messages=[dict(user("t5 t6"), images=[base64.b64encode(png).decode()])],
                                        options={"num_predict": 8})
    assert o.message.content == ref


# Bad input


def _post(server, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30)


PNG_URL = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
BAD = [
    ("malformed JSON", "/v1/chat/completions", None, b"{not json", 400, "not valid JSON"),
    ("not an object", "/v1/chat/completions", [1, 2], None, 400, "JSON object"),
    ("wrong type", "/v1/chat/completions", {"messages": [user("t9")], "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "t9"}]}, None, 400, "role"),
    ("no messages", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("too long", "/v1/chat/completions", {"messages": [user("t9 " * CONTEXT)]}, None, 400, "context"),
    ("max_tokens 0", "/v1/chat/completions", {"messages": [user("t9")], "max_tokens": 0}, None, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {"prompt": "t9", "temperature": -0.5}, None, 400, "temperature"),
    ("image to a text model", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}]},
     None, 400, "text-only"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, None, 400, "empty"),
    ("tools", "/v1/chat/completions", {"messages": [user("t9")], "tools": [{"type": "function"}]}, None, 400, "tool"),
    ("ollama bad options", "/api/chat", {"messages": [user("t9")], "options": {"temperature": "hot"}}, None, 400,
     "temperature"),
    ("too big", "/v1/chat/completions", {"messages": [user("t9 " * 100000)]}, None, 413, "limit"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_clear_4xx(servers, case):
    s = servers("g3")
    _, path, body, raw, status, words = case
    r = _post(s, path, body, raw)
    assert r.status_code == status
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert words in message and "Traceback" not in message and "\n" not in message
    if not path.startswith("/api/"):
        assert error["type"] == "invalid_request_error"


def test_bad_images(t5, servers):
    for url, words in [("https://example.com/cat.png", "data URL"), ("file:///etc/passwd", "data URL"),
                       (PNG_URL, "not an image"), ("data:image/png;base64,@@@", "base64")]:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "t5"}]
        r = _post(t5, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
        assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert chat(t5, [user("t5 t6")], max_tokens=2).choices[0].message.content is not None


def test_api_key_and_cors(servers):
    s = servers("g3-key", "gemma3", "--api-key", "sekrit", "--allowed-origins", "http://app.example")
    with pytest.raises(openai.AuthenticationError):
        client(s, api_key="wrong").models.list()
    assert httpx.get(s.url + "/api/tags").status_code == 401
    assert client(s, api_key="sekrit").models.list().data
    assert httpx.get(s.url + "/").status_code == 200  # the page itself, which then asks for the key
    pre = httpx.options(s.url + "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.headers.get("access-control-allow-origin") == "http://app.example"
    other = httpx.get(s.url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer sekrit"})
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(servers("g3").url + "/v1/models", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_a_model_that_fails_to_load_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlxgemma.server", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")

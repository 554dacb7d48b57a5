"""The server under `mlx.launch -n 2 --backend ring` (ranks.py), tensor and pipeline: concurrent requests
(greedy completions of prompts past the window, chunked prefills, seeded sampling with n=2, a JSON schema)
give what one process gives; a client leaving mid-stream frees its row on every rank (the next requests
still agree); Ctrl-C ends every rank; and the option that cannot hold across ranks is refused."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

import mlxgemma
from reference import TOL, WINDOW, max_diff, random_ids
from server_util import free_port, serve
from structured_util import structured_checkpoint
from test_distributed import LAUNCH

pytestmark = pytest.mark.slow  # servers under mlx.launch

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y", "z"]}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return structured_checkpoint("gemma3", tmp_path_factory.mktemp("sd") / "m")


@pytest.fixture(scope="module")
def alone(ckpt):
    s = serve(ckpt, "--prefill-step-size", "5")
    yield s
    s.stop()


def start(ckpt, *options):
    port = free_port()
    proc = subprocess.Popen([LAUNCH, "-n", "2", "--backend", "ring", sys.executable, "-m", "mlxgemma.server",
                             "--model", str(ckpt), "--port", str(port), *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the sharded server did not start: " + proc.communicate()[1][-2000:])


def interrupt_ranks(proc) -> None:
    """Ctrl-C as a terminal sends it to every rank (not to mlx.launch itself here: interrupted while it
    moves the ranks' output, it can keep a lock and never exit, an mlx.launch matter)."""
    ranks = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, ranks):
        if pid != proc.pid:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def post(url, path, body) -> dict:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def requests():
    """(path, body) of the concurrent requests: completions of 1 to 3 windows, sampling, a schema."""
    lengths = [3, WINDOW + 2, 2 * WINDOW + 5, 3 * WINDOW + 1]
    out = [("/v1/completions", {"prompt": [int(t) for t in random_ids(1, n, seed=n, low=4)[0]],
                                "max_tokens": 10 + 2 * i, "temperature": 0, "logprobs": 0})
           for i, n in enumerate(lengths)]
    out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}],
                                         "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2}))
    out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "give a and b"}],
                                         "max_tokens": 60, "response_format": {"type": "json_schema", "json_schema":
                                                                               {"name": "x", "schema": SCHEMA}}}))
    return out


def together(url, reqs) -> list:
    results = [None] * len(reqs)

    def one(i):
        results[i] = post(url, *reqs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def leave_mid_stream(url) -> None:
    body = {"messages": [{"role": "user", "content": "a long one"}], "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(4))


@pytest.mark.parametrize("split", [[], ["--pipeline"]], ids=["tensor", "pipeline"])
def test_sharded_server_equals_one_process(ckpt, alone, split):
    proc, url = start(ckpt, "--prefill-step-size", "5", *split)
    try:
        reqs = requests()
        got = together(url, reqs)
        model, tokenizer = alone.engine.model, alone.engine.tokenizer
        for (path, body), r in zip(reqs[:4], got[:4]):
            ref = list(mlxgemma.stream_generate(model, tokenizer, body["prompt"], max_tokens=body["max_tokens"]))
            assert r["choices"][0]["text"] == "".join(c.text for c in ref)
            assert max_diff(r["choices"][0]["logprobs"]["token_logprobs"], [c.logprob for c in ref]) <= TOL
        for (path, body), r in zip(reqs[4:], got[4:]):
            expected = post(alone.url, path, body)
            assert [c["message"]["content"] for c in r["choices"]] == \
                [c["message"]["content"] for c in expected["choices"]]
        answer = json.loads(got[5]["choices"][0]["message"]["content"])
        assert set(answer) == {"a", "b"}
        leave_mid_stream(url)
        again = post(url, *reqs[4])  # the row of the client that left is gone on both ranks
        assert [c["message"]["content"] for c in again["choices"]] == \
            [c["message"]["content"] for c in got[4]["choices"]]
        assert post(url, *reqs[2])["choices"][0]["text"] == got[2]["choices"][0]["text"]  # from the prompt cache
    finally:
        interrupt_ranks(proc)
        out, err = proc.communicate(timeout=60)
    # every rank ended (at its Ctrl-C, or as mlx.launch ends the run when one has)
    left = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left and "Traceback" not in err, err[-3000:]


def test_pipeline_refuses_a_byte_bound(ckpt):
    out = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", sys.executable, "-m", "mlxgemma.server", "--model",
                          str(ckpt), "--port", str(free_port()), "--pipeline", "--prompt-cache-bytes", "1000000"],
                         capture_output=True, text=True, timeout=120)
    assert "--prompt-cache-bytes with --pipeline" in out.stderr and "Traceback" not in out.stderr

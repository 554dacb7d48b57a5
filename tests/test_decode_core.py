"""The one decode core, seen from its four doors: a seed gives the same tokens through generate, its command
line, chat and the server (alone and in a batch of 8); the server speculates for every row (a draft model,
prompt lookup), 8 concurrent greedy and sampled requests, each greedy one equal to the request alone without
speculation, token for token and logprob for logprob, past the sliding window, on Gemma 2, 3 and 4."""

import threading

import openai
import pytest

import mlxgemma
from reference import TOL, WINDOW, hf_model, max_diff, random_ids
from server_util import chat_checkpoint, serve

LENGTHS = [2, 3, 5, WINDOW, WINDOW + 2, 2 * WINDOW, 2 * WINDOW + 5, 3 * WINDOW + 1]  # 8 rows, most past the window


def _checkpoint(root, family, seed=0):
    path = root / f"{family}-{seed}"
    if path.exists():
        return path
    if family.startswith("gemma4"):
        from test_gemma4 import VARIANTS, hf_gemma4

        return chat_checkpoint(hf_gemma4(seed=seed, **VARIANTS["E"]), path)
    return chat_checkpoint(hf_model(family, seed=seed, eos_token_id=1), path)


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _together(server, calls):
    """Run the calls from 8 threads, all reaching the scheduler at once; their results in order."""
    scheduler, held, lock = server.engine.scheduler, [], threading.Lock()
    real = scheduler.submit

    def submit(request):
        with lock:
            held.append(request)
            if len(held) == len(calls):
                for r in held:
                    real(r)
    scheduler.submit = submit
    results = [None] * len(calls)

    def one(i):
        results[i] = calls[i]()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    try:
        scheduler.stats["peak_rows"] = 0
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        scheduler.submit = real
    assert scheduler.stats["peak_rows"] >= 4  # they did decode together
    return results


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("core")


def test_a_seed_gives_the_same_tokens_everywhere(root, capsys):
    from mlxgemma.chat import ChatSession
    from mlxgemma.generate import main

    path = _checkpoint(root, "gemma3")
    model, tok = mlxgemma.load(path)
    texts = [f"t{10 + i} t{20 + i} t{30 + i}" for i in range(8)]
    options = dict(temp=1.0, top_p=0.95, max_tokens=2 * WINDOW)
    alone = ["".join(c.text for c in mlxgemma.stream_generate(model, tok, [{"role": "user", "content": t}],
                                                                seed=i, **options)) for i, t in enumerate(texts)]
    assert len(set(alone)) > 1  # it samples
    assert "".join(ChatSession(model, tok, seed=3, **options).reply(texts[3])) == alone[3]
    capsys.readouterr()
    assert main(["--model", str(path), "--prompt", texts[5], "--temp", "1.0", "--top-p", "0.95", "--seed", "5",
                 "-m", str(2 * WINDOW)]) == 0
    assert capsys.readouterr().out == alone[5] + "\n"
    server = serve(path)
    try:
        def ask(i):
            return lambda: _client(server).chat.completions.create(
                model="m", messages=[{"role": "user", "content": texts[i]}], seed=i, temperature=1.0, top_p=0.95,
                max_tokens=2 * WINDOW).choices[0].message.content
        assert ask(2)() == alone[2]
        assert _together(server, [ask(i) for i in range(8)]) == alone
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("family,speculation", [(f, s) for f in ("gemma2", "gemma3", "gemma4")
                                                for s in ("draft", "lookup")] + [("gemma4", "assistant")])
def test_server_speculates_for_every_row(root, family, speculation):
    """8 concurrent requests, greedy and sampled alternating, every row proposing: a draft model that is
    mostly wrong (another random model: rollbacks after the rings wrapped), Gemma 4's assistant drafter (a
    random one) or prompt lookup over prompts that repeat. Each greedy row equals the request alone without
    speculation; sampled rows follow their seed (the same output again) and the acceptance rule
    (tests/test_speculative.py checks its distribution)."""
    path = _checkpoint(root, family)
    option = ["--draft-model", str(_checkpoint(root, family, seed=7))] if speculation == "draft" else [
        "--prompt-lookup-ngram", "1"]
    if speculation == "assistant":
        from gemma4_assistant_util import hf_assistant

        hf_assistant(seed=3).save_pretrained(root / "assistant")
        option = ["--draft-model", str(root / "assistant")]
    server = serve(path, "--num-draft-tokens", "3", *option)
    model, tok = server.engine.model, server.engine.tokenizer
    prompts = [[int(t) for t in random_ids(1, n, seed=n, low=4)[0]] * 2 for n in LENGTHS]  # each said twice
    max_tokens = [3 * WINDOW + i for i in range(8)]

    def ask(i, seed=None):
        sampled = dict(temperature=1.0, seed=seed) if i % 2 else dict(temperature=0)
        return lambda: _client(server).completions.create(model="m", prompt=prompts[i], max_tokens=max_tokens[i],
                                                          logprobs=0, **sampled).choices[0]
    try:
        results = _together(server, [ask(i, seed=i) for i in range(8)])
        stats = server.engine.scheduler.stats
        assert stats["proposed"] > 0 and stats["accepted"] > 0
        for i in range(0, 8, 2):
            ref = list(mlxgemma.stream_generate(model, tok, prompts[i], max_tokens=max_tokens[i]))
            assert results[i].text == "".join(r.text for r in ref)
            assert max_diff(results[i].logprobs.token_logprobs, [r.logprob for r in ref]) <= TOL
        again = _together(server, [ask(i, seed=i) for i in range(8)])
        assert [r.text for r in again[1::2]] == [r.text for r in results[1::2]]
    finally:
        server.stop()


def test_server_draft_model_bad_input(root):
    from mlxgemma.errors import MlxGemmaError
    from mlxgemma.server.__main__ import check_args, configure_parser

    args = configure_parser().parse_args(["--draft-model", "x", "--prompt-lookup-ngram", "2"])
    with pytest.raises(MlxGemmaError, match="not both"):
        check_args(args)
    with pytest.raises(MlxGemmaError, match="--temp must be >= 0"):
        check_args(configure_parser().parse_args(["--temp", "-1"]))


def test_draft_rows_with_one_token_prompts(root):
    """A one-token prompt gives its row an empty draft prefill; batched with others it still speculates
    and equals plain greedy."""
    path = _checkpoint(root, "gemma2")
    server = serve(path, "--draft-model", str(_checkpoint(root, "gemma2", seed=7)))
    model, tok = server.engine.model, server.engine.tokenizer
    prompts = [[5], [7], [9, 10, 11], [12]]
    try:
        def ask(p):
            return lambda: _client(server).completions.create(model="m", prompt=p, max_tokens=3 * WINDOW,
                                                              temperature=0).choices[0].text
        results = _together(server, [ask(p) for p in prompts])
        for p, text in zip(prompts, results):
            assert text == mlxgemma.generate(model, tok, p, max_tokens=3 * WINDOW)
    finally:
        server.stop()

"""Gemma 4 through the library's other paths: the chat REPL's cache carried over turns, and max_kv_size
(every owned cache bounded; the KV-shared layers read their donors' bounded caches)."""


import pytest

import mlxgemma
from mlxgemma.decode.decoder import prefill
from mlxgemma.chat import ChatSession
from reference import TOL, WINDOW, max_diff, random_ids
from server_util import chat_checkpoint
from test_gemma4 import VARIANTS, hf_gemma4


@pytest.fixture(scope="module")
def e_model(tmp_path_factory):
    path = chat_checkpoint(hf_gemma4(**VARIANTS["E"]), tmp_path_factory.mktemp("g4") / "ckpt")
    return mlxgemma.load(path)


def test_chat_turns_reuse_the_cache_and_answer_as_fresh(e_model):
    model, tokenizer = e_model
    session = ChatSession(model, tokenizer, max_tokens=5)
    first = "".join(session.reply(" ".join(f"t{10 + i}" for i in range(WINDOW + 1))))
    second = "".join(session.reply("t20 t21"))
    assert session.cache[0].offset == len(session.cached) > 2 * WINDOW
    fresh = ChatSession(model, tokenizer, max_tokens=5)
    fresh.messages = session.messages[:2]
    assert "".join(fresh.reply("t20 t21")) == second and first


def test_max_kv_size_bounds_owned_caches_and_is_exact_within_it(e_model):
    model, _ = e_model
    ids = [int(t) for t in random_ids(1, WINDOW + 3, seed=5)[0]]
    bounded, full = model.make_cache(max_kv_size=4 * WINDOW), model.make_cache()
    assert len(bounded) == model.config.first_kv_shared_layer_idx
    worst = max_diff(prefill(model, bounded, ids), prefill(model, full, ids))
    for step in range(2 * WINDOW):  # decoding until the bound is reached: nothing evicted, same logits
        token = [int(t) for t in random_ids(1, 1, seed=step)[0]]
        worst = max(worst, max_diff(prefill(model, bounded, token), prefill(model, full, token)))
    assert worst <= TOL
    for _ in range(3 * WINDOW):  # past the bound: memory stays at it
        prefill(model, bounded, [7])
    assert all(c.keys.shape[2] <= 4 * WINDOW for c in bounded)

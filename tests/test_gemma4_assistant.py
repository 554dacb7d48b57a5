"""Gemma 4's assistant drafters (gemma4_assistant, gemma4_unified_assistant) against transformers and against
plain decoding. The drafter's logits and state equal transformers' given transformers' own target states
(its masked embedder included), and given the states our caches hold (single and batch caches, past the
window); drafting keeps greedy output plain greedy's token for token over 3 windows for 1-6 draft tokens, on a
target with KV sharing (E2B-like) and one without (31B-like), with quantized KV, with an image and a clip,
for a drafter that is mostly wrong and one made always right (whose state then follows the target's exactly);
transformers' assisted generation gives the same tokens; the server drafts for 8 concurrent rows; bad
pairings are one clear line."""

import importlib

import numpy as np
import pytest
import torch

import mlx.core as mx

import mlxgemma
from gemma4_assistant_util import DRAFTER, hf_assistant
from mlxgemma.decode import proposers
from mlxgemma.decode.decoder import fill, last_prompt_step
from mlxgemma.errors import MlxGemmaError
from mlxgemma.models.batch_cache import merge_caches
from reference import TOL, WINDOW, max_diff, random_ids, save_checkpoint
from test_gemma4 import VARIANTS, hf_gemma4

S, F = "sliding_attention", "full_attention"
STEPS = 3 * WINDOW


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(target variant, ordered) -> (hf target, hf drafter, model, tokenizer, drafter), built once."""
    root, built = tmp_path_factory.mktemp("assistant"), {}

    def get(name="E", ordered=True):
        if (name, ordered) not in built:
            target, drafter = hf_gemma4(**VARIANTS[name]), hf_assistant(seed=3, ordered=ordered)
            path = save_checkpoint(target, root / f"{name}")
            drafter.save_pretrained(root / f"{name}-{ordered}-drafter")
            built[name, ordered] = (target, drafter, *mlxgemma.load(path),
                                    mlxgemma.load_model(root / f"{name}-{ordered}-drafter"))
        return built[name, ordered]
    return get


def _hf_draft(hf_drafter, hf_target, ids, token, states, steps=3):
    """transformers' drafting loop (Gemma4AssistantCandidateGenerator's): (logits, state) of each step, from the
    target's last hidden state after ids and its shared_kv_states `states`, drafting greedily after `token`."""
    with torch.no_grad():
        hidden = hf_target(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][:, -1:]
        position, out, last = torch.tensor([[len(ids)]]), [], torch.tensor([[token]])
        for _ in range(steps):
            embeds = torch.cat([hf_target.get_input_embeddings()(last), hidden], dim=-1)
            o = hf_drafter(inputs_embeds=embeds, position_ids=position, shared_kv_states=states)
            out.append((o.logits[0, -1].numpy(), o.last_hidden_state[0, -1].numpy()))
            last, hidden = o.logits.argmax(-1), o.last_hidden_state
    return out


def _ours(drafter, target, shared, offset, state, token, steps=3):
    out, last = [], mx.array([[token]])
    for _ in range(steps):
        logits, state = drafter(drafter.inputs(target, last, state), shared, offset)
        out.append((np.array(logits[0, -1]), np.array(state[0, -1])))
        last = mx.argmax(logits[:, -1], axis=-1)[:, None]
    return out


def _hf_states(hf_target, ids, sliding_keys=None):
    with torch.no_grad():
        states = hf_target(torch.tensor([ids]), return_shared_kv_states=True).shared_kv_states
    states = {k: (v[0], v[1]) for k, v in states.items()}
    if sliding_keys is not None:  # what a ring of that many tokens holds
        states[S] = tuple(x[:, :, -sliding_keys:] for x in states[S])
    return states


def _close(ours, ref):
    for (lo, so), (lr, sr) in zip(ours, ref):
        assert max_diff(lo, lr) <= TOL and max_diff(so, sr) <= TOL


def _given_transformers_states(hf_target, hf_drafter, model, drafter):
    """Three drafting steps after a prompt 2.5 windows long, from transformers' own states (every key; its
    sliding mask is inclusive, so there the last WINDOW + 1 keys): our logits and states equal its."""
    ids = random_ids(1, int(2.5 * WINDOW), seed=4)[0].tolist()
    states = _hf_states(hf_target, ids)
    ref = _hf_draft(hf_drafter, hf_target, ids, 17, states)
    with torch.no_grad():
        hidden = hf_target(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][:, -1:]
    shared = {t: (mx.array(k.numpy()), mx.array(v.numpy()), None) for t, (k, v) in states.items()}
    keep = mx.arange(len(ids)) >= len(ids) - WINDOW - 1
    shared[S] = (*shared[S][:2], keep[None, None, None])
    _close(_ours(drafter, model, shared, len(ids), mx.array(hidden.numpy()), 17), ref)


@pytest.mark.parametrize("ordered", [True, False])
def test_drafter_equals_transformers_given_its_states(pair, ordered):
    """The sparse head (ordered) and the full one, on transformers' own states."""
    hf_target, hf_drafter, model, _, drafter = pair("E", ordered)
    _given_transformers_states(hf_target, hf_drafter, model, drafter)


def test_drafter_from_our_caches(pair):
    """The states our caches hold, past the window (the ring: the last WINDOW keys), alone and as rows of a
    batch of other lengths: transformers' drafter given those keys."""
    hf_target, hf_drafter, model, _, drafter = pair("E")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (2 * WINDOW + 3, WINDOW - 2, 3 * WINDOW)]
    caches, states = [], []
    for ids in prompts:
        cache = model.make_cache()
        fill(model, cache, ids[:-1])
        _, state = last_prompt_step(model, mx.array([ids[-1:]]), cache, proposers.Assistant(drafter, model))
        caches.append(cache)
        states.append(state)
        ref = _hf_draft(hf_drafter, hf_target, ids, 17, _hf_states(hf_target, ids, sliding_keys=WINDOW))
        shared, offset = drafter.target_states(model, cache)
        _close(_ours(drafter, model, shared, offset, state[:, None], 17), ref)
    shared, offset = drafter.target_states(model, merge_caches(caches))  # (the rows' copies)
    logits, state = drafter(drafter.inputs(model, mx.array([[17]] * 3), mx.concatenate(states)[:, None]), shared,
                            offset)
    for b, ids in enumerate(prompts):
        lr, sr = _hf_draft(hf_drafter, hf_target, ids, 17, _hf_states(hf_target, ids, WINDOW), steps=1)[0]
        assert max_diff(np.array(logits[b, -1]), lr) <= TOL and max_diff(np.array(state[b, -1]), sr) <= TOL


def _run(model, tok, prompt, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=STEPS, **kw))
    return [c.token for c in chunks], np.array([c.logprob for c in chunks]), chunks[-1]


@pytest.mark.parametrize("name,ordered", [("E", True), ("k_eq_v", False)])
def test_greedy_equals_plain(pair, name, ordered):
    """1-6 draft tokens, 3 windows of output: plain greedy's tokens and logprobs; the drafter (random) is
    mostly wrong, so checks roll back after the rings wrapped."""
    _, _, model, tok, drafter = pair(name, ordered)
    prompt = random_ids(1, WINDOW + 2, seed=3)[0].tolist()  # (it runs STEPS tokens: no eos)
    plain = _run(model, tok, prompt)
    assert len(plain[0]) == STEPS
    for n in range(1, 7):
        spec = _run(model, tok, prompt, draft_model=drafter, num_draft_tokens=n)
        assert spec[0] == plain[0] and max_diff(spec[1], plain[1]) <= TOL
        assert spec[2].draft_tokens > 0 and spec[2].accepted_tokens < spec[2].draft_tokens


def test_always_right_drafter_follows_the_target(pair, monkeypatch):
    """A drafter made always right (its proposals replaced by plain greedy's continuation, after it ran):
    every proposal is kept, the output is plain greedy's, and the state it starts each round from is the
    target's hidden state at the token before the last, as transformers computes it."""
    hf_target, _, model, tok, drafter = pair("E")
    prompt = random_ids(1, WINDOW + 2, seed=3)[0].tolist()  # (it runs STEPS tokens: no eos)
    plain = _run(model, tok, prompt)[0]
    seen = []

    class Oracle(proposers.Assistant):
        def propose(self, rows, n, target_cache=None):
            drafted = super().propose(rows, n, target_cache)
            done = len(rows[0].seq) - len(prompt)
            seen.append((list(rows[0].seq), np.array(self.state[0])))
            return [plain[done:done + len(d)] for d in drafted]
    monkeypatch.setattr(importlib.import_module("mlxgemma.generate"), "Assistant", Oracle)
    spec = _run(model, tok, prompt, draft_model=drafter, num_draft_tokens=4)
    assert spec[0] == plain and spec[2].accepted_tokens == spec[2].draft_tokens > 0 and len(seen) >= 3
    for seq, state in seen:
        with torch.no_grad():
            ref = hf_target(torch.tensor([seq[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert max_diff(state, ref.numpy()) <= TOL


def test_transformers_assisted_generation(pair):
    """transformers' generate with the assistant (batch 1, greedy) gives the tokens ours gives with it."""
    hf_target, hf_drafter, model, tok, drafter = pair("E")
    prompt = random_ids(1, WINDOW + 2, seed=3)[0].tolist()  # (it runs STEPS tokens: no eos)
    hf_drafter.generation_config.num_assistant_tokens = 3  # (a released drafter's generation_config says)
    with torch.no_grad():
        ref = hf_target.generate(torch.tensor([prompt]), assistant_model=hf_drafter, max_new_tokens=2 * WINDOW,
                                 do_sample=False, eos_token_id=1, pad_token_id=0)
    ours = [c.token for c in mlxgemma.stream_generate(model, tok, prompt, max_tokens=2 * WINDOW, draft_model=drafter)]
    assert ours == ref[0, len(prompt):].tolist()


def test_with_image_and_audio(tmp_path):
    """A multimodal Gemma 4 with an image and a clip in the prompt: the drafter reads the target's states
    (which saw them); greedy output is plain greedy's, with float and with 8-bit KV caches."""
    import gemma4_chat_util as chat
    import gemma4_media_util as media

    path = media.save(tmp_path / "mm")
    model, processor = mlxgemma.load(path)
    hf_assistant(seed=5, head_dim=32, global_head_dim=64, vocab_size=chat.VOCAB_SIZE).save_pretrained(tmp_path / "d")
    drafter = mlxgemma.load_model(tmp_path / "d")
    common = dict(image=[media.image(28, 44, seed=5)], audio=[media.tone(0.5)], max_tokens=STEPS)
    plain = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", **common)]
    spec = list(mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", draft_model=drafter,
                                         num_draft_tokens=3, **common))
    assert [c.token for c in spec] == plain and spec[-1].draft_tokens > 0
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)  # the drafter reads the quantized keys
    quantized = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", **kv, **common)]
    spec = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|><|audio|> Say", draft_model=drafter,
                                                      **kv, **common)]
    assert spec == quantized


def test_bad_pairings(pair, tmp_path):
    """A drafter of another size or vocabulary, or of the 12B Unified, for this target; media for a text-only
    target; ranks of mlx.launch; a drafter loaded as a model; a drafter config whose layers compute keys: one
    line each."""
    _, _, model, tok, drafter = pair("E")
    for i, (kw, message) in enumerate([(dict(backbone=48), "hidden size 48"),
                                       (dict(vocab_size=128), "128 tokens"),
                                       (dict(unified=True), "drafts for gemma4_unified")]):
        hf_assistant(seed=1, **kw).save_pretrained(tmp_path / f"d{i}")
        other = mlxgemma.load_model(tmp_path / f"d{i}")
        with pytest.raises(MlxGemmaError, match=message):
            _run(model, tok, [2, 5, 6], draft_model=other)
    with pytest.raises(MlxGemmaError, match="text-only model: it takes no image"):  # (E is Gemma4ForCausalLM)
        _run(model, tok, [2, 5, 6], draft_model=drafter, image=np.zeros((8, 8, 3), dtype=np.uint8))

    class TwoRanks:
        def size(self):
            return 2
    import mlxgemma.models.distributed as distributed

    real = distributed.world
    distributed.world = lambda group=None: TwoRanks()
    try:
        with pytest.raises(MlxGemmaError, match="cannot read keys split across the ranks"):
            _run(model, tok, [2, 5, 6], draft_model=drafter)
    finally:
        distributed.world = real
    save_checkpoint(hf_assistant(seed=1), tmp_path / "as-model")
    with pytest.raises(MlxGemmaError, match="drafts for a Gemma 4 and runs on none of its own"):
        mlxgemma.load(tmp_path / "as-model")
    import json

    config = json.loads((tmp_path / "d0" / "config.json").read_text())
    config["text_config"]["num_kv_shared_layers"] = 1
    (tmp_path / "d0" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MlxGemmaError, match="every layer of a Gemma 4 assistant reads the target's keys"):
        mlxgemma.load_model(tmp_path / "d0")
    assert DRAFTER["num_hidden_layers"] == 3


def test_unified_drafter(tmp_path):
    """The 12B Unified's drafter (gemma4_unified_assistant) on a tiny Unified: its logits and states equal
    transformers' given transformers' states; with an image in the prompt, greedy output is plain greedy's."""
    import gemma4_chat_util as chat
    import gemma4_media_util as media
    from test_gemma4_unified import save as save_unified

    hf_target = save_unified(tmp_path / "u")
    model, processor = mlxgemma.load(tmp_path / "u")
    hf_drafter = hf_assistant(seed=6, unified=True, vocab_size=chat.VOCAB_SIZE)
    hf_drafter.save_pretrained(tmp_path / "d")
    drafter = mlxgemma.load_model(tmp_path / "d")
    _given_transformers_states(hf_target, hf_drafter, model, drafter)
    common = dict(image=[media.image(36, 52)], max_tokens=STEPS, chat_template=False)
    plain = [c.token for c in mlxgemma.stream_generate(model, processor, "<|image|> Say", **common)]
    spec = list(mlxgemma.stream_generate(model, processor, "<|image|> Say", draft_model=drafter, **common))
    assert [c.token for c in spec] == plain and spec[-1].draft_tokens > 0


@pytest.mark.slow
def test_cli_and_server_report_drafts(tmp_path, capsys):
    """generate --draft-model ASSISTANT prints plain greedy's text and the draft summary; chat turns with it
    equal chat turns without it; the server's usage
    gives OpenAI's accepted/rejected prediction counts, which add up to what it proposed; a drafter for
    another size stops the server's start with one line."""
    import openai

    from mlxgemma.generate import main
    from server_util import chat_checkpoint, serve

    path = chat_checkpoint(hf_gemma4(**VARIANTS["E"]), tmp_path / "t")
    hf_assistant(seed=3).save_pretrained(tmp_path / "d")
    hf_assistant(seed=3, backbone=48).save_pretrained(tmp_path / "other")
    args = ["--model", str(path), "--prompt", "t9 t10 t11", "-m", str(STEPS)]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft-model", str(tmp_path / "d"), "--num-draft-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "tokens accepted" in err
    assert main(args + ["--draft-model", str(tmp_path / "other")]) == 2
    assert "hidden size 48" in capsys.readouterr().err
    from mlxgemma.chat import ChatSession

    model, tok = mlxgemma.load(path)
    drafter = mlxgemma.load_model(tmp_path / "d")
    plain_chat, spec_chat = ChatSession(model, tok, max_tokens=STEPS), ChatSession(model, tok, max_tokens=STEPS,
                                                                                  draft_model=drafter)
    for turn in ("t9 t10", "t11"):  # (the second turn continues the conversation's cache)
        assert "".join(spec_chat.reply(turn)) == "".join(plain_chat.reply(turn))
    server = serve(path, "--draft-model", str(tmp_path / "d"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "t9 t10"}],
                                               max_tokens=STEPS, temperature=0)
        details = reply.usage.completion_tokens_details
        stats = server.engine.scheduler.stats
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == stats["proposed"] > 0
        assert details.accepted_prediction_tokens == stats["accepted"]
    finally:
        server.stop()
    with pytest.raises(MlxGemmaError, match="hidden size 48"):
        serve(path, "--draft-model", str(tmp_path / "other"))


@pytest.mark.slow
def test_convert_and_quantize(pair, tmp_path):
    """convert writes the drafter as loaded (its float logits equal the source's) and -q quantizes it (greedy
    output with it stays plain greedy's); mlx-vlm loads both with our parameters; --calibrate is refused."""
    from mlx.utils import tree_flatten
    from mlx_vlm.speculative.drafters import load_drafter

    from mlxgemma.checkpoints.convert import convert

    _, _, model, tok, _ = pair("E")
    hf_assistant(seed=4, hidden_size=64, intermediate_size=64).save_pretrained(tmp_path / "d")
    source = mlxgemma.load_model(tmp_path / "d")
    outputs = [convert(tmp_path / "d", tmp_path / "float"), convert(tmp_path / "d", tmp_path / "q", quantize=True)]
    ids = random_ids(1, 2 * WINDOW + 1, seed=2)[0].tolist()
    cache = model.make_cache()
    fill(model, cache, ids[:-1])
    _, state = last_prompt_step(model, mx.array([ids[-1:]]), cache, proposers.Assistant(source, model))
    shared, offset = source.target_states(model, cache)
    drafted = {}
    for name, d in (("source", source), ("float", mlxgemma.load_model(outputs[0]))):
        drafted[name] = _ours(d, model, shared, offset, state[:, None], 17)
    _close(drafted["float"], drafted["source"])
    quantized = mlxgemma.load_model(outputs[1])
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    prompt = random_ids(1, WINDOW + 2, seed=3)[0].tolist()  # (it runs STEPS tokens: no eos)
    assert _run(model, tok, prompt, draft_model=quantized)[0] == _run(model, tok, prompt)[0]
    for out in outputs:
        theirs, kind = load_drafter(str(out))
        ours = dict(tree_flatten(mlxgemma.load_model(out).parameters()))
        assert kind == "mtp" and set(dict(tree_flatten(theirs.parameters()))) == set(ours)
        assert all(mx.array_equal(v, ours[k]) for k, v in tree_flatten(theirs.parameters()))
    with pytest.raises(MlxGemmaError, match="without --calibrate"):
        convert(tmp_path / "d", tmp_path / "c", quantize=True, calibrate=True)

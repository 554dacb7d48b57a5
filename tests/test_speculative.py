"""Speculative decoding against plain decoding: greedy with a draft model (a good one, a bad one) and with
prompt lookup gives plain greedy's tokens and their log-probabilities over 4 windows of generation, for every
family (Gemma 2's softcaps and sliding layers included), T5Gemma 2's decoder and Gemma 3 with images; a
rejection right after the ring wraps; speculative sampling keeps the target's distribution; chat and the
CLI; bad options."""

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.decode import proposers as speculative
from mlxgemma.errors import MlxGemmaError
from reference import WINDOW, hf_model, hf_t5gemma2, image_prompt, random_pixels, save_checkpoint, save_t5_checkpoint

STEPS = 4 * WINDOW  # generated tokens: the sliding rings wrap four times


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root, loaded = tmp_path_factory.mktemp("spec"), {}

    def get(family, seed=0):
        if (family, seed) not in loaded:
            loaded[family, seed] = mlxgemma.load(save_checkpoint(hf_model(family, seed=seed), root / f"{family}{seed}"))
        return loaded[family, seed]
    return get


def _run(model, tok, prompt, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=STEPS, **kw))
    return [c.token for c in chunks], np.array([c.logprob for c in chunks]), chunks[-1]


def _same(plain, spec):
    assert spec[0] == plain[0]
    assert np.max(np.abs(spec[1] - plain[1])) <= 1e-4  # every step's logprob: the caches held the same keys


PROMPT = [2] + list(range(10, 22)) + list(range(10, 16))  # a repeat, for prompt lookup


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "stablelm"])
def test_greedy_equals_plain(models, family):
    model, tok = models(family)
    plain = _run(model, tok, PROMPT)
    for n in (1, 3, 5):
        _same(plain, _run(model, tok, PROMPT, draft_model=model, num_draft_tokens=n))  # accepts all
    bad = models(family, seed=7)[0]  # another random model: rejects nearly everything
    spec = _run(model, tok, PROMPT, draft_model=bad, num_draft_tokens=4)
    _same(plain, spec)
    assert spec[2].draft_tokens > 0 and spec[2].accepted_tokens < spec[2].draft_tokens
    for ngram in (1, 2):
        lookup = _run(model, tok, PROMPT, prompt_lookup_ngram=ngram, num_draft_tokens=4)
        _same(plain, lookup)
        assert lookup[2].draft_tokens > 0


def test_rejection_right_after_the_wrap(models, monkeypatch):
    """A verification that crosses the wrap of every sliding ring, then is rejected entirely: the rings must
    give back what the check overwrote."""
    model, tok = models("gemma2")
    prompt = list(range(3, 3 + 2 * WINDOW - 2))  # the prompt ends 2 before the second wrap
    plain = _run(model, tok, prompt)
    real = speculative.lookup
    monkeypatch.setattr(speculative, "lookup", lambda seq, ngram, n, sources=(): [95] * n if n else real(seq, ngram, n))
    spec = _run(model, tok, prompt, prompt_lookup_ngram=1, num_draft_tokens=5)
    _same(plain, spec)
    assert spec[2].accepted_tokens < spec[2].draft_tokens


def test_t5gemma2_decoder(tmp_path):
    path = save_t5_checkpoint(hf_t5gemma2(), tmp_path / "t5")
    model, processor = mlxgemma.load(path)
    image = tmp_path / "i.png"
    from PIL import Image

    Image.fromarray((random_pixels(1)[0].transpose(1, 2, 0) * 60 + 128).clip(0, 255).astype(np.uint8)).save(image)
    plain = _run(model, processor, " t5 t6 t7 t5 t6", image=image)
    _same(plain, _run(model, processor, " t5 t6 t7 t5 t6", image=image, prompt_lookup_ngram=1))
    _same(plain, _run(model, processor, " t5 t6 t7 t5 t6", image=image, draft_model=model, num_draft_tokens=3))
    assert image_prompt(1)  # (the encoder's ids feed the lookup too)


def test_gemma3_with_images_by_prompt_lookup(tmp_path):
    from test_gemma3_vision import hf_gemma3_vision
    from test_gemma3_vision_paths import vision_checkpoint

    model, processor = mlxgemma.load(vision_checkpoint(hf_gemma3_vision(seed=4), tmp_path / "g3"))
    image = tmp_path / "i.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(image)
    plain = _run(model, processor, "t20 t21 t20", image=image)
    _same(plain, _run(model, processor, "t20 t21 t20", image=image, prompt_lookup_ngram=1))
    with pytest.raises(MlxGemmaError, match="cannot see images"):
        _run(model, processor, "t20", image=image, draft_model=model.language_model)


@pytest.mark.parametrize("with_draft", [True, False])
def test_sampling_keeps_the_target_distribution(with_draft):
    """The acceptance rule: over 4000 draws the first emitted token follows the target's p, not the draft's
    q (total variation < 0.05; the sampling noise is about 0.02 here, p and q are 0.6 apart). Without a
    draft (prompt lookup) the proposal is certain and always the same token."""
    p = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    from mlxgemma.decode.decoder import Decoder, Row
    from mlxgemma.decode.sampling import SamplingOptions

    sampler, rng = SamplingOptions(temp=1.0, seed=0).sampler(), np.random.default_rng(0)
    logprobs = mx.log(mx.array(np.stack([p, p]), dtype=mx.float32))
    first = []
    for _ in range(4000):
        d = int(rng.choice(6, p=q)) if with_draft else 4
        row = Row(sampler, [0], 2, probs=[mx.array(q, dtype=mx.float32)] if with_draft else [])
        kept, final = Decoder._accept(row, logprobs, [d])
        first.append(d if kept else final)
    freq = np.bincount(first, minlength=6) / len(first)
    assert 0.5 * np.abs(freq - p).sum() < 0.05


def test_sampled_generation_runs_and_is_seeded(models):
    model, tok = models("gemma3")
    draft = models("gemma3", seed=7)[0]
    runs = [[c.token for c in mlxgemma.stream_generate(model, tok, PROMPT, max_tokens=STEPS, temp=0.8, seed=3,
                                                       draft_model=draft)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == STEPS


def test_chat_with_a_draft(models):
    from mlxgemma.chat import ChatSession
    from server_util import TEMPLATE

    model, tok = models("gemma2")
    tok._tokenizer.chat_template = TEMPLATE
    plain, spec = ChatSession(model, tok, max_tokens=8), ChatSession(model, tok, max_tokens=8,
                                                                       draft_model=models("gemma2", 7)[0])
    for text in ["t10 t11", "t12 t13 t14", "t15"]:
        assert "".join(plain.reply(text)) == "".join(spec.reply(text))
    # what each cache holds is what it says (speculation may leave the last token not yet fed)
    assert spec.cached == plain.cached[: len(spec.cached)] and spec.cache[0].offset == len(spec.cached)


def test_cli_summary_and_bad_options(models, tmp_path, capsys):
    from mlxgemma.generate import main

    path = tmp_path / "m"
    save_checkpoint(hf_model("gemma2"), path)
    args = ["--model", str(path), "--prompt", "t10 t11 t10", "--ignore-chat-template", "-m", "6"]
    assert main(args + ["--draft-model", str(path)]) == 0
    assert "draft: " in capsys.readouterr().err
    for extra, words in [(["--num-draft-tokens", "0"], "--num-draft-tokens must be positive"),
                         (["--prompt-lookup-ngram", "0"], "--prompt-lookup-ngram must be positive"),
                         (["--prompt-lookup-ngram", "1", "--repetition-penalty", "1.1"], "repetition-penalty")]:
        assert main(args + extra) == 2
        assert words in capsys.readouterr().err
    assert mx.array(1).item() == 1

"""Prompt-cache files: a prompt cached past the window and continued gives the tokens and logprobs of the
whole prompt run at once, for every decoder family (Gemma 4 and Gemma 3 with an image included), through the
API, generate's and chat's --prompt-cache-file and the cache_prompt tool; every bad file is one clear error."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import mlxgemma
from mlxgemma.checkpoints import cache_file
from mlxgemma.cache_prompt import cache_prompt
from mlxgemma.cache_prompt import main as cache_main
from mlxgemma.errors import MlxGemmaError
from mlxgemma.generate import main as generate_main
from reference import WINDOW, hf_model, save_checkpoint

PREFIX = " ".join(f"t{10 + i % 50}" for i in range(3 * WINDOW))  # cached past the window
MORE = " t70 t71 t72"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("cachefile"), {}

    def get(family):
        if family not in made:
            if family.startswith("gemma4-"):
                from test_gemma4 import VARIANTS, hf_gemma4

                made[family] = save_checkpoint(hf_gemma4(**VARIANTS[family[7:]]), root / family)
            else:
                made[family] = save_checkpoint(hf_model(family), root / family)
        return made[family]
    return get


def _tokens(model, tok, prompt, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=2 * WINDOW, **kw))
    return [c.token for c in chunks], np.array([c.logprob for c in chunks])


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "stablelm", "gemma4-dense", "gemma4-E"])
def test_round_trip_past_the_window(ckpts, family, tmp_path):
    model, tok = mlxgemma.load(ckpts(family))
    n = cache_prompt(model, tok, PREFIX, tmp_path / "p.safetensors")
    assert n == len(tok.encode(PREFIX)) > 2 * WINDOW
    cache, held = cache_file.load(tmp_path / "p.safetensors", model)
    more = list(tok.encode(MORE, add_special_tokens=False))
    resumed = _tokens(model, tok, more, prompt_cache=cache, history=held)
    whole = _tokens(model, tok, held + more)
    assert resumed[0] == whole[0] and np.max(np.abs(resumed[1] - whole[1])) <= 1e-4


def test_generate_and_cache_prompt_cli(ckpts, tmp_path, capsys):
    path = ckpts("gemma2")
    f = tmp_path / "c.safetensors"
    assert cache_main(["--model", str(path), "--prompt", PREFIX, "--prompt-cache-file", str(f)]) == 0
    assert "cached" in capsys.readouterr().err
    assert generate_main(["--model", str(path), "--prompt-cache-file", str(f), "--prompt", MORE, "-m", "6"]) == 0
    out = capsys.readouterr().out
    model, tok = mlxgemma.load(path)
    ids = list(tok.encode(PREFIX)) + list(tok.encode(MORE, add_special_tokens=False))
    assert out.strip() == mlxgemma.generate(model, tok, ids, max_tokens=6).strip()
    assert generate_main(["--model", str(path), "--prompt-cache-file", str(f), "--prompt", MORE, "-m", "6",
                          "--prompt-lookup-ngram", "2"]) == 0  # with speculation too
    assert capsys.readouterr().out == out


def test_chat_continues_the_cached_prompt(ckpts, tmp_path):
    from mlxgemma.chat import ChatSession
    from server_util import TEMPLATE

    model, tok = mlxgemma.load(ckpts("gemma3"))
    tok._tokenizer.chat_template = TEMPLATE
    f = cache_file.save(tmp_path / "c.safetensors", model, *_prefilled(model, tok))
    session = ChatSession(model, tok, prompt_cache_file=f, max_tokens=5)
    first, second = "".join(session.reply("t80")), "".join(session.reply("t81 t82"))
    from mlxgemma.generate import prompt_ids

    def after_prefix(conversation):  # the conversation's ids continue the file's (one <bos>: the file's)
        ids = prompt_ids(tok, conversation)
        return list(tok.encode(PREFIX)) + (ids[1:] if ids[:1] == [tok.bos_token_id] else ids)

    conversation = [{"role": "user", "content": "t80"}]
    assert first == mlxgemma.generate(model, tok, after_prefix(conversation), max_tokens=5)
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "t81 t82"}]
    assert second == mlxgemma.generate(model, tok, after_prefix(conversation), max_tokens=5)


def _prefilled(model, tok):
    from mlxgemma.decode.decoder import fill

    ids, cache = list(tok.encode(PREFIX)), model.make_cache()
    fill(model, cache, ids)
    return cache, ids


def test_gemma3_with_an_image(tmp_path):
    from PIL import Image

    from test_gemma3_vision import hf_gemma3_vision
    from test_gemma3_vision_paths import vision_checkpoint

    model, processor = mlxgemma.load(vision_checkpoint(hf_gemma3_vision(seed=4), tmp_path / "g3"))
    image = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(image)
    cache_prompt(model, processor, "t20 <start_of_image> t21", tmp_path / "c.safetensors", image=image)
    cache, held = cache_file.load(tmp_path / "c.safetensors", model)
    more = processor("t22 t23", add_special_tokens=False)["input_ids"][0].tolist()
    resumed = _tokens(model, processor, more, prompt_cache=cache, history=held)
    whole = _tokens(model, processor, "t20 <start_of_image> t21 t22 t23", image=image, chat_template=False)
    assert resumed[0] == whole[0] and np.max(np.abs(resumed[1] - whole[1])) <= 1e-4


def test_bad_files(ckpts, tmp_path):
    path = ckpts("gemma2")
    model, tok = mlxgemma.load(path)
    good = cache_file.save(tmp_path / "good.safetensors", model, *_prefilled(model, tok))
    other = mlxgemma.load_model(ckpts("gemma3"))
    with pytest.raises(MlxGemmaError, match="another model"):
        cache_file.load(good, other)
    changed = shutil.copytree(path, tmp_path / "changed")  # the same shapes, one weight changed
    weights = mx.load(str(changed / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    mx.save_safetensors(str(changed / "model.safetensors"), weights, metadata={"format": "pt"})
    with pytest.raises(MlxGemmaError, match="another model"):
        cache_file.load(good, mlxgemma.load_model(changed))
    with pytest.raises(MlxGemmaError, match="max-kv-size"):
        cache_file.load(good, model, max_kv_size=4)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(MlxGemmaError, match="truncated"):
        cache_file.load(truncated, model)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(MlxGemmaError, match="not an mlxgemma prompt-cache file"):
        cache_file.load(foreign, model)
    edited = tmp_path / "edited.safetensors"
    arrays, meta = mx.load(str(good), return_metadata=True)
    mx.save_safetensors(str(edited), arrays, metadata=dict(meta, tokens=json.dumps([1, 2])))
    with pytest.raises(MlxGemmaError, match="do not fit|cache is"):
        cache_file.load(edited, model)
    for missing in (tmp_path / "none.safetensors", tmp_path):
        with pytest.raises(MlxGemmaError):
            cache_file.load(missing, model)
    with pytest.raises(MlxGemmaError, match="cannot write"):
        cache_file.save(tmp_path / "no" / "dir.safetensors", model, *_prefilled(model, tok))
    assert generate_main(["--model", str(path), "--prompt-cache-file", str(foreign), "--prompt", MORE]) == 2

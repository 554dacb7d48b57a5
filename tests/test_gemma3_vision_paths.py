"""Gemma 3 with images end to end: mlxgemma.load gives the processor, generation (API and CLI, with and
without pan-and-scan) gives transformers' greedy tokens from its processor's inputs, chat turns about a photo
reuse the cache and the encoded image, a checkpoint without its tower loads as the text model, and each bad
input is one clear error."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from reference import T5_TOKENS, hf_processor, save_t5_checkpoint
from test_gemma3_vision import hf_gemma3_vision

# Like Gemma 3's: the user turn, then the generation prompt; images are <start_of_image> in the text.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}t4 {{ m['content'] }} t6 {% else %}"
            "t8 {{ m['content'] }} t7 {% endif %}{% endfor %}{% if add_generation_prompt %}t8{% endif %}")


def vision_checkpoint(hf, path):
    """A Gemma 3 with images checkpoint with the tiny processor and a chat template."""
    path = save_t5_checkpoint(hf, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("g3paths")
    hf = hf_gemma3_vision(seed=4)
    hf.generation_config.eos_token_id = None  # greedy runs to max tokens on both sides
    path = vision_checkpoint(hf, root / "ckpt")
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 40), (30, 90)]):  # the second is wide: pan-and-scan crops it
        images.append(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images[-1])
    return hf, path, images


def _hf_tokens(hf, text, images, n=6, **processor_kwargs):
    inputs = hf_processor()(text=text, images=[Image.open(p) for p in images] or None, return_tensors="pt",
                            **processor_kwargs)
    inputs.pop("num_crops", None)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def _tokens(model, processor, prompt, n=6, **kw):
    return [c.token for c in mlxgemma.stream_generate(model, processor, prompt, max_tokens=n, **kw)]


def _same(model, processor, prompt, ref, **kw):
    """Our greedy tokens and their log-probabilities against transformers' (tokens, logprobs)."""
    chunks = list(mlxgemma.stream_generate(model, processor, prompt, max_tokens=len(ref[0]), **kw))
    assert [c.token for c in chunks] == ref[0]
    assert np.max(np.abs(np.array([c.logprob for c in chunks]) - ref[1])) <= 1e-4
    return chunks


def test_load_gives_the_processor(ckpt):
    _, path, _ = ckpt
    model, processor = mlxgemma.load(path)
    assert isinstance(processor, mlxgemma.Gemma3Processor)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_greedy_equals_transformers(ckpt, n_images):
    hf, path, images = ckpt
    model, processor = mlxgemma.load(path)
    text = "t9 " + "<start_of_image> t11 " * n_images + "t12"
    _same(model, processor, text, _hf_tokens(hf, text, images[:n_images]), image=images[:n_images] or None,
          chat_template=False, prefill_step_size=3)  # chunks that would cut every image block


def test_pan_and_scan_equals_transformers(ckpt, tmp_path):
    """The 30x90 image gives 3 crops at a minimum crop size of 4 (set in a preprocessor_config.json)."""
    hf, path, images = ckpt
    import shutil

    shutil.copytree(path, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps({"pan_and_scan_min_crop_size": 4}))
    model, processor = mlxgemma.load(tmp_path / "ckpt")
    text = "t9 <start_of_image> t12"
    ref = _hf_tokens(hf, text, images[1:], do_pan_and_scan=True, pan_and_scan_min_crop_size=4)
    chunks = _same(model, processor, text, ref, image=images[1:], chat_template=False, pan_and_scan=True)
    plain = list(mlxgemma.stream_generate(model, processor, text, image=images[1:], chat_template=False, max_tokens=1))
    assert chunks[0].prompt_tokens > plain[0].prompt_tokens + 3 * T5_TOKENS


def test_chat_template_and_placeholders_in_front(ckpt):
    hf, path, images = ckpt
    model, processor = mlxgemma.load(path)
    ref = _hf_tokens(hf, processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<start_of_image>t20 t21"}], add_generation_prompt=True, tokenize=False),
        images[:1], add_special_tokens=False)
    _same(model, processor, "t20 t21", ref, image=images[0])


def test_ids_and_features_as_prompt(ckpt):
    _, path, images = ckpt
    model, processor = mlxgemma.load(path)
    inputs = processor("t9 <start_of_image> t12", [images[0]])
    ids = inputs["input_ids"][0].tolist()
    features = model.get_image_features(inputs["pixel_values"])
    assert _tokens(model, processor, ids, image_features=features) == _tokens(model, processor, ids, image=images[0])


def test_cli_with_image(ckpt, capsys):
    _, path, images = ckpt
    from mlxgemma.generate import main

    args = ["--model", str(path), "--prompt", "t9 <start_of_image> t12", "--ignore-chat-template", "-m", "4"]
    assert main(args + ["--image", str(images[1]), "--pan-and-scan"]) == 0
    model, processor = mlxgemma.load(path)
    expected = mlxgemma.generate(model, processor, "t9 <start_of_image> t12", image=images[1], chat_template=False,
                                 pan_and_scan=True, max_tokens=4)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_chat_turns_about_a_photo(ckpt):
    """Turn 2 prefills only its own tokens and encodes no image; its reply equals a fresh run of the whole
    conversation."""
    from mlxgemma.chat import ChatSession
    from mlxgemma.media.features import FEATURES

    _, path, images = ckpt
    model, processor = mlxgemma.load(path)
    session = ChatSession(model, processor, max_tokens=4)
    first = "".join(session.reply("t20 t21", images=[images[0]]))
    held, misses = len(session.cached), FEATURES.misses
    second = list(session.reply("t30"))
    assert FEATURES.misses == misses and session.cache[0].offset == len(session.cached) > held
    conversation = [{"role": "user", "content": "<start_of_image>t20 t21"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "t30"}]
    fresh = mlxgemma.generate(model, processor, conversation, image=images[0], max_tokens=4)
    assert "".join(second) == fresh
    third = "".join(session.reply("t40", images=[images[1]]))  # a second photo later in the conversation
    conversation += [{"role": "assistant", "content": "".join(second)},
                     {"role": "user", "content": "<start_of_image>t40"}]
    assert third == mlxgemma.generate(model, processor, conversation, image=images, max_tokens=4)


def test_checkpoint_without_its_tower_is_the_text_model(ckpt, tmp_path):
    """What mlx-lm's converter writes for a gemma3 checkpoint: config.json as it was (vision_config included),
    the language model's weights only (language_model.model.*). (Its converter itself cannot take this tiny
    model: its Gemma 3 reads no vocab_size from text_config.)"""
    import shutil

    from mlx.utils import tree_flatten

    hf, path, _ = ckpt
    full = mlxgemma.load_model(path)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {f"language_model.{k}": v for k, v in tree_flatten(full.language_model.parameters())})
    model = mlxgemma.load_model(tmp_path)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = [[2, 9, 10, 11]]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.max(np.abs(np.array(model(mx.array(ids))) - ref)) <= 1e-4


def test_bad_inputs(ckpt, tmp_path):
    _, path, images = ckpt
    model, processor = mlxgemma.load(path)
    with pytest.raises(MlxGemmaError, match="placeholder"):
        _tokens(model, processor, "<start_of_image> <start_of_image> t9", image=images[0])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(MlxGemmaError, match="not an image file"):
        _tokens(model, processor, "t9", image=tmp_path / "bad.png")
    ids = processor("t9 <start_of_image>", [images[0]])["input_ids"][0].tolist()
    with pytest.raises(MlxGemmaError, match=r"holds 4 media placeholder token\(s\) but the media give 0"):
        _tokens(model, processor, ids)  # image tokens, no image
    with pytest.raises(MlxGemmaError, match="ends inside an image"):
        _tokens(model, processor, ids[: ids.index(processor.image_token_id) + 2], image=images[0])
    text_model = mlxgemma.load_model(path).language_model
    with pytest.raises(MlxGemmaError, match="text-only model"):
        _tokens(text_model, processor.tokenizer, "t9", image=images[0])
    with pytest.raises(MlxGemmaError, match="pan-and-scan"):
        _tokens(text_model, processor.tokenizer, "t9", pan_and_scan=True)
    assert T5_TOKENS == 4


def test_repl_image_command(ckpt, monkeypatch, capsys):
    """/image PATH attaches a photo to the next message; a bad path is one error and the REPL goes on."""
    from mlxgemma import chat

    _, path, images = ckpt
    lines = iter(["/image /no/such.png", f"/image {images[0]}", "t20 t21", "t30", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    replies = []
    real = chat.ChatSession.stream  # (what the REPL calls: chunks with the thought apart)

    def spy(self, text, images=(), audio=(), videos=()):
        replies.append((text, len(images)))
        return real(self, text, images, audio, videos)

    monkeypatch.setattr(chat.ChatSession, "stream", spy)
    assert chat.main(["--model", str(path), "--max-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "not found" in err and "[1 image(s) for your next message]" in err
    assert replies == [("t20 t21", 1), ("t30", 0)]


def test_generate_batch_rows_equal_each_alone(ckpt):
    from mlxgemma.decode.batch import generate_batch

    _, path, images = ckpt
    model, processor = mlxgemma.load(path)
    texts = ["t9 <start_of_image> t12", "<start_of_image> t13 <start_of_image>", "t14 t15"]
    per_row = [[images[0]], [images[1], images[0]], []]
    out = generate_batch(model, processor, texts, per_row, max_tokens=5)
    alone = [mlxgemma.generate(model, processor, t, image=i or None, chat_template=False, max_tokens=5)
             for t, i in zip(texts, per_row)]
    assert out == alone


def test_caption_example_in_batches(ckpt, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _, path, images = ckpt
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(images[i % 2], folder / f"p{i}.png")
    (folder / "p1b.png").write_bytes(b"broken")
    script = Path(__file__).parent.parent / "examples" / "caption.py"
    run = subprocess.run([sys.executable, str(script), "--model", str(path), str(folder), "--max-tokens", "3",
                          "--batch-size", "2", "--prompt", "t20"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    model, processor = mlxgemma.load(path)
    expected = [f"p{i}.png: " + " ".join(mlxgemma.generate(model, processor, "t20", image=images[i % 2],
                                                             max_tokens=3).split()) for i in range(3)]
    assert run.stdout.strip().splitlines() == expected
    assert "p1b.png: error" in run.stderr


def test_feature_cache_is_exact_and_bounded(ckpt):
    from mlxgemma.media.features import FeatureCache
    from reference import random_pixels

    _, path, _ = ckpt
    model = mlxgemma.load_model(path)
    cache, pixels = FeatureCache(max_items=2), random_pixels(3, seed=11)
    first = cache.encode(model, pixels)  # more images than it keeps: all come back, two stay
    expected = np.array(model.get_image_features(pixels))
    assert np.array_equal(np.array(first), expected.reshape(-1, expected.shape[-1]))
    assert (cache.misses, len(cache.entries)) == (3, 2)
    again = cache.encode(model, pixels[1:])
    per_image = expected.shape[1]
    assert cache.hits == 2 and np.array_equal(np.array(again), np.array(first[per_image:]))
    other = mlxgemma.load_model(path)  # another model: its own features, never another model's
    cache.encode(other, pixels[1:2])
    assert cache.misses == 4

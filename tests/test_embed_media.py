"""mlxgemma.embed with EmbeddingGemma 2: texts (batched, with prompts, Matryoshka dimensions) and media inputs
(an image, a clip, a video, an image with text, mixed with texts in one call) equal transformers' model on its
processor's inputs for the same layout (the prompt, one placeholder per item, then the text), pooled as
transformers' doc says (masked mean, normalised); a media input for a text-only embedder is one line."""

import numpy as np
import pytest
import torch

import gemma4_media_util as media
import mlxgemma
from mlxgemma.errors import MlxGemmaError
from test_embedding_gemma2 import INPUTS, hf_model, reference  # noqa: F401  (reference: a fixture)

PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, reference):  # noqa: F811
    hf, path = hf_model(seed=2), tmp_path_factory.mktemp("embed_media")
    hf.save_pretrained(path)
    reference.save_pretrained(path)
    model, processor = mlxgemma.load(path)
    model.prompts = PROMPTS  # (a sentence-transformers folder would carry them)
    return hf, model, processor, path


def _expected(hf, reference, text=None, **media_inputs):  # noqa: F811
    inputs = reference(text=text, return_tensors="pt", **media_inputs)
    with torch.no_grad():
        h = hf(**{k: v for k, v in inputs.items() if k in INPUTS}).last_hidden_state[0].double()
    pooled = h[inputs["attention_mask"][0].bool()].mean(0)
    return (pooled / pooled.norm()).numpy()


def test_text_and_media(pair, reference):  # noqa: F811
    hf, model, processor, _ = pair
    image, clip = media.image(30, 44, seed=1), media.tone(0.4)
    frames = np.random.default_rng(0).integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)
    inputs = ["The weather is lovely today.", {"image": image}, "ok", {"audio": clip},
              {"image": image, "text": "a photo"}, {"video": frames}]
    ours = np.array(mlxgemma.embed(model, processor, inputs, prompt_name="document", batch_size=2))
    p = PROMPTS["document"]
    expected = [_expected(hf, reference, p + inputs[0]), _expected(hf, reference, p + "<|image|>", images=[image]),
                _expected(hf, reference, p + "ok"), _expected(hf, reference, p + "<|audio|>", audio=[clip]),
                _expected(hf, reference, p + "<|image|> a photo", images=[image]),
                _expected(hf, reference, p + "<|video|>", videos=[frames])]
    assert np.max(np.abs(ours - np.stack(expected))) <= 1e-5
    alone = np.array(mlxgemma.embed(model, processor, {"image": image}))[0]  # no prompt: transformers' own layout
    assert np.max(np.abs(alone - _expected(hf, reference, images=[image]))) <= 1e-5
    small = np.array(mlxgemma.embed(model, processor, inputs[:2], prompt_name="document", dim=8))
    cut = ours[:2, :8] / np.linalg.norm(ours[:2, :8], axis=-1, keepdims=True)  # (Matryoshka: cut, normalised)
    assert small.shape == (2, 8) and np.max(np.abs(small - cut)) <= 1e-6


def test_media_for_a_text_only_embedder(tmp_path):
    from embedding_util import save

    _, path = save(tmp_path)
    model, tok = mlxgemma.load(path)
    with pytest.raises(MlxGemmaError, match="takes text only"):
        mlxgemma.embed(model, tok, [{"image": media.image(8, 8)}])
    with pytest.raises(MlxGemmaError, match="a media input is a dict of image, audio, video"):
        mlxgemma.embed(model, tok, [{"picture": "x.png"}])


def test_command_line_with_an_image(pair, tmp_path, capsys):
    """python -m mlxgemma.embed takes an image file as a media input (by its suffix), beside a text file."""
    import json

    from mlxgemma.embed import main

    _, model, processor, path = pair
    media.image(30, 44, seed=1).save(tmp_path / "photo.png")
    (tmp_path / "note.txt").write_text("The weather is lovely today.")
    assert main(["--model", str(path), str(tmp_path / "photo.png"), str(tmp_path / "note.txt")]) == 0
    rows = [json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()]
    expected = np.array(mlxgemma.embed(model, processor, [{"image": str(tmp_path / "photo.png")},
                                                          "The weather is lovely today."]))
    assert len(rows) == 2 and np.max(np.abs(np.array(rows) - expected)) <= 1e-6


@pytest.mark.slow
def test_convert_and_quantize(pair, tmp_path):
    """convert writes EmbeddingGemma 2 so that it embeds as the source does (float: equal); -q quantizes the
    encoder with the recipe and its towers at --q-vision-bits / --q-audio-bits."""
    from mlxgemma.checkpoints.convert import convert

    _, model, processor, path = pair
    inputs = ["hello there", {"image": media.image(30, 44, seed=1)}, {"audio": media.tone(0.4)}]
    ref = np.array(mlxgemma.embed(model, processor, inputs))
    assert np.max(np.abs(np.array(mlxgemma.embed(*mlxgemma.load(convert(path, tmp_path / "f")), inputs)) - ref)) == 0
    q, qp = mlxgemma.load(convert(path, tmp_path / "q", quantize=True, q_group_size=32, q_vision_bits=8))
    bits = {n: m.bits for n, m in q.model.named_modules() if hasattr(m, "bits") and "scales" in m}
    assert bits and all(b == 8 for n, b in bits.items() if q.model.in_vision_tower(n))
    assert any(b == 4 for n, b in bits.items() if n.startswith("language_model.layers"))
    assert np.array(mlxgemma.embed(q, qp, inputs)).shape == ref.shape

"""T5Gemma 2 generation: the Python API and `python -m mlxgemma.generate --image` give transformers'
greedy tokens from the start token; several images; examples/caption.py; one clear error per bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from mlxgemma.generate import main
from reference import T5_WINDOW, TOL, hf_processor, max_diff, hf_t5gemma2, save_t5_checkpoint

STEPS = 2 * T5_WINDOW + 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    hf = hf_t5gemma2(eos_token_id=1)
    path = save_t5_checkpoint(hf, root / "ckpt")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (64, 64), (20, 50)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    return hf, path, sorted(images.glob("*.png"))


def _hf_generate(hf, text, images):
    """transformers' greedy tokens after the start token 2, and their log-probabilities."""
    inputs = hf_processor()(text=text, images=[Image.open(p) for p in images] or None, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    tokens = out.sequences[0, 1:].tolist()
    logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def _hf_tokens(hf, text, images):
    return _hf_generate(hf, text, images)[0]


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_equals_transformers_generate(ckpt, n_images):
    hf, path, images = ckpt
    model, processor = mlxgemma.load(path)
    images = images[:n_images]
    chunks = list(mlxgemma.stream_generate(model, processor, " t5 t6", image=[str(p) for p in images],
                                           max_tokens=STEPS))
    # without placeholders in the prompt, one per image goes first (as the CLI's --image)
    ref, ref_logprobs = _hf_generate(hf, "<start_of_image>" * n_images + " t5 t6", images)
    assert [c.token for c in chunks] == ref[: len(chunks)] and (len(chunks) == STEPS or ref[len(chunks) - 1] == 1)
    assert max_diff([c.logprob for c in chunks], ref_logprobs[: len(chunks)]) <= TOL


def test_text_only_prompt_and_placeholders_where_written(ckpt):
    hf, path, images = ckpt
    model, processor = mlxgemma.load(path)
    ours = [c.token for c in mlxgemma.stream_generate(model, processor, "t9 t10 t11", max_tokens=STEPS)]
    assert ours == _hf_tokens(hf, "t9 t10 t11", [])[: len(ours)]
    text = "t7 <start_of_image> t8"
    from_text = [c.token for c in mlxgemma.stream_generate(model, processor, text, image=images[0], max_tokens=4)]
    assert from_text == _hf_tokens(hf, text, images[:1])[:4]
    ids = processor(text, [images[0]])["input_ids"][0].tolist()  # token ids, already expanded, work too
    assert [c.token for c in mlxgemma.stream_generate(model, processor, ids, image=images[0], max_tokens=4)] == from_text


def test_cli_with_images(ckpt, capsys):
    _, path, images = ckpt
    args = ["--model", str(path), "--prompt", " t5 t6", "--max-tokens", "4"]
    assert main(args + ["--image", str(images[0]), "--image", str(images[1])]) == 0
    out, err = capsys.readouterr()
    assert "prompt:" in err and "generation:" in err


@pytest.mark.parametrize("bad,message", [
    ("mismatch", "image placeholder"), ("garbage", "not an image file"), ("truncated", "truncated"),
    ("missing", "not found"),
])
def test_cli_bad_images(ckpt, tmp_path, capsys, bad, message):
    _, path, images = ckpt
    prompt, image = "t5", tmp_path / "x.jpg"
    if bad == "mismatch":
        prompt, image = "<start_of_image> t5 <start_of_image>", images[0]
    elif bad == "garbage":
        image.write_text("hello")
    elif bad == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        image.write_bytes(image.read_bytes()[:300])
    code = main(["--model", str(path), "--prompt", prompt, "--image", str(image), "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_api_bad_inputs(ckpt):
    _, path, _ = ckpt
    model, processor = mlxgemma.load(path)
    with pytest.raises(MlxGemmaError, match="image list is empty"):
        mlxgemma.generate(model, processor, "t5", image=[])
    with pytest.raises(MlxGemmaError, match="prompt is empty"):
        mlxgemma.generate(model, processor, "  ")


def test_caption_example(ckpt):
    _, path, images = ckpt
    script = Path(__file__).parent.parent / "examples" / "caption.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(path), str(images[0].parent),
                          "--max-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [p.name for p in images]


def test_chat_refuses_encoder_decoder(ckpt, capsys):
    from mlxgemma.chat import main as chat_main

    assert chat_main(["--model", str(ckpt[1])]) == 2
    assert "T5Gemma 2" in capsys.readouterr().err

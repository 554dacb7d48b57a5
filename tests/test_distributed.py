"""Tensor and pipeline parallelism (distributed.py) with `mlx.launch --backend ring` on this machine: for every
family (T5Gemma 2's encoder and decoder included, by tensor parallelism only), float and 4-bit, at 2 ranks, and
at 4 where a model's heads allow (fewer key/value heads than ranks included) or a layer per rank (ranks that
hold only sliding layers included), the sharded model's logits equal the whole model's within 1e-4 (prefill
past the window, a left-padded batch, cached greedy decoding over 3 windows), greedy generation is
token-identical, every rank agrees on each token, and a rank holds at most 0.55 of the weights at 2 ranks;
sizes that do not split are one clear error; `python -m mlxgemma.generate` under mlx.launch prints once, with
the tokens of one process, either way."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import gemma4_media_util

import mlxgemma
from reference import TOL, WINDOW, hf_model, hf_t5gemma2, save_checkpoint, save_t5_checkpoint
from test_gemma3_vision import hf_gemma3_vision
from test_gemma4 import VARIANTS, hf_gemma4

pytestmark = pytest.mark.slow  # mlx.launch processes: the suite's slowest file

LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS = 3 * WINDOW


def launch(n: int, *args, timeout=300, input=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([LAUNCH, "-n", str(n), "--backend", "ring", sys.executable, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, input=input)


def results(proc) -> dict:
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout + proc.stderr
    return {r["name"]: r for r in lines}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    paths = {}
    for family in ("gemma", "gemma2", "gemma3", "stablelm"):
        paths[family] = save_checkpoint(hf_model(family), root / family)
    wide = dict(hidden_size=64, intermediate_size=128, head_dim=16)  # whole groups of 32 on each of 2 ranks
    for family in ("gemma3", "stablelm"):
        src = save_checkpoint(hf_model(family, **dict(wide, head_dim=None if family == "stablelm" else 16)),
                              root / f"{family}-wide")
        paths[f"{family}-4bit"] = mlxgemma.convert(src, root / f"{family}-4bit", quantize=True, q_group_size=32)
    paths["t5gemma2"] = save_t5_checkpoint(hf_t5gemma2(), root / "t5gemma2")
    for name in ("E", "moe", "k_eq_v"):  # KV-shared layers and per-layer inputs; experts; one global KV head
        # (seed 1: its greedy tokens never reach the tokenizer's eos within the test's steps)
        paths[f"gemma4-{name}"] = save_checkpoint(hf_gemma4(seed=1, **dict(VARIANTS[name], eos_token_id=None)),
                                                  root / f"gemma4-{name}")
    src = save_checkpoint(hf_gemma4(**dict(VARIANTS["moe"], eos_token_id=None, moe_intermediate_size=64, **wide)),
                          root / "gemma4-wide")
    paths["gemma4-moe-4bit"] = mlxgemma.convert(src, root / "gemma4-moe-4bit", quantize=True, q_group_size=32)
    hf = hf_gemma3_vision(seed=4)
    hf.generation_config.eos_token_id = None
    paths["gemma3-vision"] = save_t5_checkpoint(hf, root / "gemma3-vision")
    paths["gemma4-media"] = _without_eos(gemma4_media_util.save(root / "gemma4-media", seed=2))
    paths["odd-heads"] = save_checkpoint(hf_model("gemma", num_attention_heads=3, num_key_value_heads=1, head_dim=8),
                                         root / "odd-heads")
    paths["three-layers"] = save_checkpoint(hf_model("gemma2", num_hidden_layers=3), root / "three-layers")
    return paths


def _without_eos(path):
    """No eos anywhere: greedy decoding runs its STEPS tokens."""
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = config["text_config"]["eos_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "pad_token_id": 0}))
    return path


def _check(r):
    assert r["prefill"] <= TOL, r
    assert r.get("padded", 0) <= TOL and r.get("decode", 0) <= TOL, r
    assert r["same_greedy"] and r["ranks_agree"] and r["tokens"] == STEPS, r


def test_two_ranks(checkpoints):
    """Every family, Gemma 4's variants and 4-bit experts included, Gemma 3 with an image and Gemma 4 with an
    image and a clip (towers whole on every rank)."""
    names = [n for n in checkpoints if n not in ("odd-heads", "three-layers")]
    out = results(launch(2, WORKER, STEPS, "tensor", *[checkpoints[n] for n in names], checkpoints["odd-heads"]))
    for name in names:
        _check(out[name])
    assert "3 attention heads do not split over 2 ranks (--pipeline splits by layers" in out["odd-heads"]["error"]
    assert out["gemma3"]["weights"] <= 0.55, out["gemma3"]


def test_pipeline_two_ranks(checkpoints):
    """Runs of layers: 2 + 2, and 2 + 1 for three layers; heads that do not split by ranks are no matter."""
    names = [n for n in checkpoints if n != "t5gemma2" and not n.startswith("gemma4")]
    out = results(launch(2, WORKER, STEPS, "pipeline", *[checkpoints[n] for n in names], checkpoints["t5gemma2"],
                         checkpoints["gemma4-E"]))
    for name in names:
        _check(out[name])
    assert out["gemma3"]["weights"] <= 0.55, out["gemma3"]
    for name in ("t5gemma2", "gemma4-E"):
        assert "runs across ranks by tensor parallelism only" in out[name]["error"]


def test_pipeline_four_ranks(checkpoints):
    """A layer per rank: Gemma 3's ranks 2 and 3 hold only sliding layers, rank 1 only the full one."""
    names = ["gemma", "gemma2", "gemma3", "stablelm", "gemma3-4bit"]
    out = results(launch(4, WORKER, STEPS, "pipeline", *[checkpoints[n] for n in names], checkpoints["three-layers"]))
    for name in names:
        _check(out[name])
    assert "3 decoder layers do not split over 4 ranks" in out["three-layers"]["error"]


def test_four_ranks(checkpoints):
    """4 query heads, 2 key/value heads: each rank keeps the key/value head its query head reads."""
    names = ["gemma2", "gemma3", "stablelm", "gemma4-E", "gemma4-moe", "gemma4-k_eq_v"]
    out = results(launch(4, WORKER, STEPS, "tensor", *[checkpoints[n] for n in names]))
    for name in names:
        _check(out[name])


def test_shard_and_pipeline_methods(checkpoints, tmp_path):
    """model.shard(group) and model.pipeline(group), mlx-lm's convention, on a whole loaded model: the same
    logits, exactly, as distributed.py's functions and as the loader's split, and the whole model's within
    TOL; Gemma 4's experts, a vision tower, T5Gemma 2, and StableLM's per-head q/k norms (keep_heads)."""
    qk = save_checkpoint(hf_model("stablelm", qk_layernorm=True), tmp_path / "stablelm-qk")
    names = ["gemma3", "gemma4-moe", "gemma3-vision", "t5gemma2"]
    out = results(launch(2, WORKER, STEPS, "tensor-methods", *[checkpoints[n] for n in names], qk))
    out.update(results(launch(2, WORKER, STEPS, "pipeline-methods", checkpoints["gemma2"])))
    for name in names + ["stablelm-qk", "gemma2"]:
        r = out[name]
        assert r["function"] == 0 and r["loader"] == 0, r
        assert r["prefill"] <= TOL and r.get("padded", 0) <= TOL and r.get("decode", 0) <= TOL, r
        assert r["weights"] <= 0.75, r  # (each rank holds its part; T5Gemma 2's table and tower stay whole)


@pytest.mark.parametrize("split", [[], ["--pipeline"]], ids=["tensor", "pipeline"])
def test_generate_cli(checkpoints, split):
    cmd = ["-m", "mlxgemma.generate", "--model", checkpoints["gemma2"], "--prompt", "t5 t6 t7", "--max-tokens",
           "10", "--temp", "1", "--seed", "3"]
    one = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=120)
    two = launch(2, *cmd, *split)
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == one.stdout.strip() and two.stdout.count("\n") == one.stdout.count("\n")
    assert two.stderr.count("generation:") == 1  # the summary, from rank 0 only


CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}t4 {{ m['content'] }} t6 {% else %}"
        "t8 {{ m['content'] }} t7 {% endif %}{% endfor %}{% if add_generation_prompt %}t8{% endif %}")


@pytest.mark.parametrize("split", [[], ["--pipeline"]], ids=["tensor", "pipeline"])
def test_chat(checkpoints, tmp_path, split):
    """Rank 0 reads each line and every rank hears it: the replies of one process, printed once; /image on a
    text model is the same one error on every rank. (mlx.launch never closes the ranks' input: /quit ends.)"""
    path = tmp_path / "chat"
    shutil.copytree(checkpoints["gemma2"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=CHAT)))
    cmd = ["-m", "mlxgemma.chat", "--model", path, "--max-tokens", "8", "--temp", "1", "--seed", "5"]
    lines = "t10 t11\n/image nowhere.png\nt12 t13 t14\n/reset\nt15\n/quit\n"
    one = subprocess.run([sys.executable, *map(str, cmd)], input=lines, capture_output=True, text=True, timeout=120)
    two = launch(2, *cmd, *split, input=lines)
    assert one.returncode == 0 and "exited with code" not in two.stderr, two.stderr
    assert two.stdout == one.stdout and one.stdout.count("\n") == 3, (one.stdout, two.stdout)
    assert two.stderr.count("text-only model") == 1 and "Traceback" not in two.stderr


def test_other_commands_refuse_ranks(checkpoints, tmp_path):
    out = launch(2, "-m", "mlxgemma.cache_prompt", "--model", checkpoints["gemma2"], "--prompt", "t5 t6",
                 "--prompt-cache-file", tmp_path / "c.safetensors")
    text = out.stdout + out.stderr  # (mlx.launch itself exits 0; it reports each rank's code)
    assert "does not run across ranks yet" in text and "exited with code 2" in text
    assert "Traceback" not in text
    out = launch(2, "-m", "mlxgemma.generate", "--model", checkpoints["gemma2"], "--prompt", "t5",
                 "--prompt-cache-file", tmp_path / "c.safetensors")
    assert "cannot be split across the ranks" in out.stderr and "Traceback" not in out.stderr


def test_shared_input_and_images_in_process(checkpoints, tmp_path):
    """What chat shares from rank 0 (here a group of one: the same code path, no launch): bytes, the empty
    line and the end of input; /image's file as rank 0 read it, and its errors."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from mlxgemma.chat import _image_command
    from mlxgemma.cli import share
    from mlxgemma.errors import MlxGemmaError
    from mlxgemma.media.processor import load_image

    group = mx.distributed.init()
    assert share(group, b"t5 \xc3\xa9") == b"t5 \xc3\xa9" and share(group, b"") == b"" and share(group, None) is None
    model, processor = mlxgemma.load(checkpoints["gemma3-vision"])
    session = SimpleNamespace(model=model, processor=processor)
    path = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(path)
    got = _image_command(session, f"/image {path}", group)
    assert np.array_equal(np.asarray(got), np.asarray(load_image(path)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for line, message in ((f"/image {tmp_path / 'none.png'}", "not found"), (f"/image {tmp_path / 'bad.png'}",
                          "not an image file"), ("/image", "needs a path")):
        with pytest.raises(MlxGemmaError, match=message):
            _image_command(session, line, group)

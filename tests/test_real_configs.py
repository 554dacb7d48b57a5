"""The config.json (and safetensors index) files of released checkpoints, vendored byte for byte from public
repositories (tests/real_configs/SOURCES.md says where each came from): each parses, builds its model lazily
(no weight is allocated, so a 27B model builds on a CI machine), and, where the index is known, expects
exactly the index's tensor names and, through the index's total_size, exactly its bytes."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxgemma
from mlxgemma.models import config_from_dict

ROOT = Path(__file__).parent / "real_configs"
CHECKPOINTS = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())
# Checkpoints mlxgemma does not run (yet): the one clear error each gives instead.
REFUSED = {
    "stabilityai__stablelm-zephyr-3b": "model_type 'stablelm_epoch'.*current revision",
}
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _read(name: str, file: str) -> dict:
    return json.loads((ROOT / name / file).read_text())


def test_the_corpus_is_there():
    assert len(CHECKPOINTS) >= 7 and (ROOT / "SOURCES.md").is_file()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_real_config_builds_lazily(name):
    d = _read(name, "config.json")
    if name in REFUSED:
        with pytest.raises(mlxgemma.MlxGemmaError, match=REFUSED[name]):
            mlxgemma.build_model(d)
        return
    config_from_dict(d)
    before = mx.get_active_memory()
    model = mlxgemma.build_model(d)
    params = dict(tree_flatten(model.parameters()))
    assert mx.get_active_memory() - before < 2**20  # nothing evaluated: weights are never allocated
    assert sum(math.prod(p.shape) for p in params.values()) > 10**8  # a real size, billions for the big ones
    # One cache per layer that computes keys and values (Gemma 4's KV-shared layers, at the end, have none).
    owners = getattr(model.config, "first_kv_shared_layer_idx", len(model.layers))
    assert len(model.make_cache()) == owners and len(model.layers) == model.config.num_hidden_layers


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if (ROOT / n / "model.safetensors.index.json").is_file()])
def test_real_config_matches_its_index(name):
    d, index = _read(name, "config.json"), _read(name, "model.safetensors.index.json")
    model = mlxgemma.build_model(d)
    expected = dict(tree_flatten(model.parameters()))
    stored = model.sanitize({k: None for k in index["weight_map"]})  # the names as the loader maps them
    assert set(stored) == set(expected)
    width = BYTES[d.get("torch_dtype") or d.get("dtype")]
    assert sum(math.prod(p.shape) for p in expected.values()) * width == index["metadata"]["total_size"]


# Gemma 4: no index of the released checkpoints is public, so the names and shapes to expect are those of
# transformers' own Gemma4ForConditionalGeneration built from the same config.json (on the meta device: no
# memory). Its total with the vision and
# audio towers is the size the model cards give: 5.1B for E2B ("with embeddings"), 31B.
GEMMA4 = {"google__gemma-4-E2B-it": 5.1, "google__gemma-4-31B-it": 31}


@pytest.mark.parametrize("name", sorted(GEMMA4))
def test_gemma4_real_config_matches_transformers(name):
    import torch
    import transformers

    d = _read(name, "config.json")
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**d))
    reference = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    model = mlxgemma.build_model(d)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    # the checkpoint's names and shapes as the loader maps them, towers included (arrays of no memory)
    empty = {k: np.lib.stride_tricks.as_strided(np.zeros(1, bool), s, (0,) * len(s)) for k, s in reference.items()}
    stored = {k: tuple(v.shape) for k, v in model.sanitize(empty).items()}
    assert stored == ours
    total = sum(math.prod(s) for s in ours.values())
    assert round(total / 1e9, 1 if GEMMA4[name] < 10 else 0) == GEMMA4[name]


def test_gemma4_e2b_layout():
    """E2B: 35 layers, the last 20 KV-shared (no k/v weights, no cache, double-wide MLPs), full layers with
    512-wide heads, and a per-layer input table of 35 x 256 per token."""
    model = mlxgemma.build_model(_read("google__gemma-4-E2B-it", "config.json"))
    params = dict(tree_flatten(model.language_model.parameters()))  # (the text part)
    config = model.config
    assert config.first_kv_shared_layer_idx == 15 and config.kv_donors == {"sliding_attention": 13,
                                                                             "full_attention": 14}
    assert params["model.embed_tokens_per_layer.weight"].shape == (262144, 35 * 256)
    assert params["model.layers.4.self_attn.q_proj.weight"].shape == (8 * 512, 1536)
    assert params["model.layers.4.self_attn.k_proj.weight"].shape == (512, 1536)
    assert "model.layers.15.self_attn.k_proj.weight" not in params
    assert params["model.layers.14.mlp.gate_proj.weight"].shape == (6144, 1536)
    assert params["model.layers.15.mlp.gate_proj.weight"].shape == (2 * 6144, 1536)


def test_gemma4_31b_layout():
    """31B: no sharing, no per-layer inputs; full layers take values from k_proj, with 4 KV heads of 512."""
    model = mlxgemma.build_model(_read("google__gemma-4-31B-it", "config.json"))
    params = dict(tree_flatten(model.language_model.parameters()))
    assert params["model.layers.5.self_attn.k_proj.weight"].shape == (4 * 512, 5376)
    assert "model.layers.5.self_attn.v_proj.weight" not in params
    assert params["model.layers.0.self_attn.v_proj.weight"].shape == (16 * 256, 5376)
    assert not any("per_layer" in k for k in params)
    assert "audio_tower" not in model and "vision_tower" in model  # 31B sees, does not hear
    assert model.config.final_logit_softcapping == 30.0 and not model.config.bidirectional  # "vision": causal text

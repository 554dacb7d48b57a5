"""The config.json (and safetensors index) files of released checkpoints, vendored byte for byte from public
repositories (tests/real_configs/SOURCES.md says where each came from): each parses, builds its model lazily
(no weight is allocated, so a 27B model builds on a CI machine), and, where the index is known, expects
exactly the index's tensor names and, through the index's total_size, exactly its bytes."""

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlxgemma
from mlxgemma.models import config_from_dict

ROOT = Path(__file__).parent / "real_configs"
CHECKPOINTS = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())
# Checkpoints mlxgemma does not run (yet): the one clear error each gives instead.
REFUSED = {
    "google__gemma-4-E2B-it": "model_type 'gemma4'",
    "google__gemma-4-31B-it": "model_type 'gemma4'",
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
    assert len(model.make_cache()) == len(model.layers)


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if (ROOT / n / "model.safetensors.index.json").is_file()])
def test_real_config_matches_its_index(name):
    d, index = _read(name, "config.json"), _read(name, "model.safetensors.index.json")
    model = mlxgemma.build_model(d)
    expected = dict(tree_flatten(model.parameters()))
    stored = model.sanitize({k: None for k in index["weight_map"]})  # the names as the loader maps them
    assert set(stored) == set(expected)
    width = BYTES[d.get("torch_dtype") or d.get("dtype")]
    assert sum(math.prod(p.shape) for p in expected.values()) * width == index["metadata"]["total_size"]

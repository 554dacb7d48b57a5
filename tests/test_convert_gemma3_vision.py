"""Converting Gemma 3 with images: float without loss, -q with the language model at the default recipe and
the tower at 8 bits (or --q-vision-bits), the processor files carried along; mlx-vlm loads our output and we
load mlx-vlm's (float and quantized), weight for weight."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxgemma
from mlxgemma.checkpoints.quantize import layer_specs
from mlxgemma.convert import convert, main
from reference import TOL, max_diff, random_pixels, save_t5_checkpoint
from test_convert_t5gemma2 import _dequantized_twin
from test_gemma3_vision import hf_gemma3_vision, hf_logits, ours, prompt

IDS, PIXELS = [prompt(1)], random_pixels(1, seed=5)


def _logits(model):
    return ours(model, IDS, PIXELS)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    hf = hf_gemma3_vision(seed=3, text={"intermediate_size": 64}, vision={"intermediate_size": 64, "hidden_size": 32})
    path = save_t5_checkpoint(hf, tmp_path_factory.mktemp("g3conv") / "src")
    # What mlx-vlm's Gemma 3 reads from text_config (real checkpoints rely on its defaults; transformers
    # ignores these): mlx_vlm.convert can then take this tiny checkpoint.
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(mm_tokens_per_image=4, sliding_window_pattern=2)
    (path / "config.json").write_text(json.dumps(config))
    return hf, path


def test_float_conversion_is_lossless(src, tmp_path):
    hf, path = src
    dst = convert(path, tmp_path / "mlx")
    model, processor = mlxgemma.load(dst)
    assert isinstance(processor, mlxgemma.Gemma3Processor)
    assert max_diff(_logits(model), _logits(mlxgemma.load_model(path))) == 0
    assert max_diff(_logits(model), hf_logits(hf, IDS, PIXELS)) <= TOL
    assert "processor = mlxgemma.load" in (dst / "README.md").read_text()
    assert any(k.startswith("vision_tower.vision_model.") for k in mx.load(str(dst / "model.safetensors")))


def test_quantized_conversion(src, tmp_path):
    _, path = src
    dst = convert(path, tmp_path / "q", quantize=True, q_group_size=32)
    model = mlxgemma.load_model(dst)
    tower = model.vision_tower.vision_model
    assert tower.encoder.layers[0].mlp.fc1.bits == 8  # the tower at 8 bits, the language model at the recipe's
    plan = layer_specs(mlxgemma.load_model(path), 4, 32)  # the budget recipe, on the language model only
    assert {p: m.bits for p, m in model.named_modules() if p in plan} == {p: v["bits"] for p, v in plan.items()}
    assert model.language_model.model.layers[0].self_attn.o_proj.bits == 4 and not any("vision" in p for p in plan)
    assert not hasattr(model.multi_modal_projector, "scales")
    assert max_diff(_logits(model), _logits(_dequantized_twin(model, path))) <= TOL
    ref = _logits(mlxgemma.load_model(path))
    assert np.linalg.norm(_logits(model) - ref) / np.linalg.norm(ref) <= 0.5  # random tiny weights: see test_convert
    assert main(["--hf-path", str(path), "--mlx-path", str(tmp_path / "v"), "-q", "--q-group-size", "32",
                 "--q-vision-bits", "float"]) == 0
    assert not hasattr(mlxgemma.load_model(tmp_path / "v").vision_tower.vision_model.encoder.layers[0].mlp.fc1,
                       "scales")


def _same_weights(a, b):
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    wb.pop("language_model.lm_head.weight", None)  # mlx-vlm unties the head into a copy of the table
    assert set(wa) == set(wb)
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)


@pytest.mark.parametrize("scaled", [False, True])
def test_mlx_vlm_loads_our_float_output(src, tmp_path, scaled):
    """(Not our quantized output: mlx-vlm's Gemma 3 wants a head of its own, quantized beside the quantized
    table; ours is tied, as in the checkpoint, and a copy would add 335 MiB to a 4-bit 4B.) With the full
    layers' linear rope scaling (gemma-3-4b's factor 8), which mlx-vlm reads only from text_config.rope_scaling."""
    load_model = pytest.importorskip("mlx_vlm.utils", reason="mlx-vlm (.ci/run installs it)").load_model
    _, path = src
    if scaled:
        hf = hf_gemma3_vision(seed=3, text={"intermediate_size": 64, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
            vision={"intermediate_size": 64, "hidden_size": 32})
        path = save_t5_checkpoint(hf, tmp_path / "scaled")
        assert "rope_scaling" not in json.loads((path / "config.json").read_text())["text_config"]
    dst = convert(path, tmp_path / "mlx")
    theirs = load_model(dst)
    _same_weights(mlxgemma.load_model(dst), theirs)
    text = mx.array([IDS[0][:5]])  # no image: mlx-vlm's text path (its embedding scale is rounded to bf16)
    assert max_diff(np.array(theirs.language_model(text).logits), np.array(mlxgemma.load_model(dst)(text))) <= 1e-2


@pytest.mark.parametrize("quantize", [False, True])
def test_we_load_mlx_vlm_output(src, tmp_path, quantize):
    """mlx_vlm.convert's output, float (== transformers) or quantized (its tower kept in float): every stored
    tensor is ours as stored. Its source is our float output: mlx-vlm 0.7.10 cannot convert a checkpoint in
    transformers 5 names (model.vision_tower.vision_model.* lose their vision_model level)."""
    vlm_convert = pytest.importorskip("mlx_vlm.convert", reason="mlx-vlm (.ci/run installs it)").convert
    hf, path = src
    ours_float = convert(path, tmp_path / "ours")
    vlm_convert(str(ours_float), mlx_path=str(tmp_path / "vlm"), quantize=quantize, q_group_size=32)
    model, processor = mlxgemma.load(tmp_path / "vlm")
    stored = model.sanitize(mx.load(str(tmp_path / "vlm" / "model.safetensors")))
    ours = dict(tree_flatten(model.parameters()))
    assert set(stored) == set(ours) and all(mx.array_equal(stored[k], ours[k]).item() for k in ours)
    assert hasattr(model.language_model.model.layers[0].mlp.gate_proj, "scales") == quantize
    if not quantize:
        assert max_diff(_logits(model), hf_logits(hf, IDS, PIXELS)) <= TOL

"""Converting T5Gemma 2: both key layouts, float without loss, quantized (the vision tower's treatment
chosen by benchmarks/t5gemma2_vision_quant.py), back to float, and the processor files carried along."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import save_file

import mlxgemma
from mlxgemma.convert import convert
from mlxgemma.media.processor import T5Gemma2Processor
from reference import TOL, hf_t5gemma2, image_prompt, max_diff, random_pixels, save_t5_checkpoint

IDS, DEC, PIXELS = np.array([image_prompt(1)]), np.array([[2, 5, 9, 14, 3]]), random_pixels(1)


def _logits(model):
    return np.array(model(mx.array(IDS), mx.array(DEC), pixel_values=mx.array(PIXELS)))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_t5_checkpoint(hf_t5gemma2(text={"intermediate_size": 64}, vision={"intermediate_size": 64, "hidden_size": 32}),
                              tmp_path_factory.mktemp("t5conv") / "src")


@pytest.mark.parametrize("layout", ["on disk", "in memory"])
def test_float_conversion_is_lossless(src, tmp_path, layout):
    if layout == "in memory":  # transformers' module names: encoder.text_model., vision_tower.vision_model.
        hf = hf_t5gemma2(text={"intermediate_size": 64}, vision={"intermediate_size": 64, "hidden_size": 32})
        state = {k.replace("vision_tower.", "vision_tower.vision_model."): v.contiguous()
                 for k, v in hf.state_dict().items() if not k.startswith(("lm_head", "model.decoder.embed_tokens"))}
        (tmp_path / "src").mkdir()
        for f in src.iterdir():
            if f.suffix == ".json":
                (tmp_path / "src" / f.name).write_bytes(f.read_bytes())
        save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
        source = tmp_path / "src"
    else:
        source = src
    dst = convert(source, tmp_path / "mlx")
    model, processor = mlxgemma.load(dst)
    assert isinstance(processor, T5Gemma2Processor)
    assert max_diff(_logits(model), _logits(mlxgemma.load_model(src))) == 0
    assert (dst / "preprocessor_config.json").is_file() or (dst / "processor_config.json").is_file()
    assert "processor = mlxgemma.load" in (dst / "README.md").read_text()


def _dequantized_twin(quantized, float_path):
    """The float model holding exactly the weights the quantized layers dequantize to."""
    twin = mlxgemma.load_model(float_path)
    weights = dict(tree_flatten(quantized.parameters()))
    for name, m in quantized.named_modules():
        if hasattr(m, "scales"):
            weights[f"{name}.weight"] = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size,
                                                      bits=m.bits)
            del weights[f"{name}.scales"], weights[f"{name}.biases"]
    twin.load_weights(list(weights.items()))
    return twin


def test_quantized_conversion(src, tmp_path):
    dst = convert(src, tmp_path / "q", quantize=True, q_group_size=32)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, _ = mlxgemma.load(dst)
    tower = model.model.encoder.vision_tower
    assert hasattr(model.model.encoder.embed_tokens, "scales") and "eoi_embedding" in model.model.encoder.embed_tokens
    assert tower.encoder.layers[0].mlp.fc1.bits == 8  # the vision tower at 8 bits (measured), the rest at 4
    ours = _logits(model)
    assert max_diff(ours, _logits(_dequantized_twin(model, src))) <= TOL
    with torch.no_grad():  # and it still tracks the float model (random tiny weights: loose, see test_convert)
        ref = _logits(mlxgemma.load_model(src))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 0.5


def test_vision_tower_in_float_or_4_bits(src, tmp_path):
    float_tower = convert(src, tmp_path / "f", quantize=True, q_group_size=32, q_vision_bits=None)
    assert not hasattr(mlxgemma.load_model(float_tower).model.encoder.vision_tower.encoder.layers[0].mlp.fc1, "scales")
    from mlxgemma.convert import main

    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "v4"), "-q", "--q-group-size", "32",
                 "--q-vision-bits", "4"]) == 0
    assert mlxgemma.load_model(tmp_path / "v4").model.encoder.vision_tower.encoder.layers[0].mlp.fc1.bits == 4


def test_dequantize_keeps_the_eoi_embedding(src, tmp_path):
    q = convert(src, tmp_path / "q", quantize=True, q_bits=8, q_group_size=32)
    back = convert(q, tmp_path / "f", dequantize=True)
    model = mlxgemma.load_model(back)
    assert not hasattr(model.model.encoder.embed_tokens, "scales")
    assert max_diff(_logits(model), _logits(mlxgemma.load_model(q))) <= TOL

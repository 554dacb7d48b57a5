"""Gemma 4 and mlx-lm, both ways, float and quantized: checkpoints in mlx-lm's layout (what mlx_lm.convert
writes and mlx-community publishes: language_model.model.* for multimodal configs, experts split into
experts.switch_glu.{gate,up,down}_proj, quantized experts, a quantized per-layer table, the shared layers
without k/v, the towers stripped) load in mlxgemma and give mlx-lm's logits; what mlxgemma.convert writes
loads in mlx_lm and gives ours. Tiny float32 models of the variants mlx-lm's gemma4_text implements (tanh GELU,
no attention biases): dense, "E" (per-layer inputs, KV sharing, double-wide MLPs), mixture of experts, keys as
values. Widths are multiples of the group size (32), so that every layer, the per-layer table and the
experts included, is quantized. mlx-lm's converter reads the released config form (global_head_dim), not the
per_layer_config transformers 5 saves, so its sources get that form."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import mlxgemma
from mlxgemma.convert import convert
from mlxgemma.models.gemma4_moe import ROUTER_BITS, QuantizedSwitchLinear
from reference import TOL, WINDOW, hf_logits, max_diff, random_ids, randomize, save_checkpoint
from test_gemma4 import BASE, F, S, hf_gemma4, randomize_scalars

WIDE = dict(hidden_size=64, intermediate_size=64)
VARIANTS = {
    "dense": dict(tie_word_embeddings=False, rope_parameters={
        S: {"rope_type": "default", "rope_theta": 100.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4}}),
    # 7 layers, the last 3 shared (sliding 4, 5 read layer 2, full 6 reads layer 3), as E2B: double-wide MLPs
    # on the shared layers, per-layer inputs (7 x 32 wide).
    "E": dict(num_hidden_layers=7, layer_types=[S, F, S, F, S, S, F], num_kv_shared_layers=3,
              hidden_size_per_layer_input=32, use_double_wide_mlp=True),
    "moe": dict(enable_moe_block=True, num_experts=5, top_k_experts=3, moe_intermediate_size=32),
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
}
NAMES = list(VARIANTS)
QUANT = dict(quantize=True, q_group_size=32)


def released_config(config: dict) -> dict:
    """transformers 5's per_layer_config back to the released form (global_head_dim, and the full layers'
    KV heads for k_eq_v), which is what mlx-lm's gemma4_text reads."""
    config = dict(config)
    full = config.pop("per_layer_config")[str(config["layer_types"].index(F))]
    config["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        config["num_global_key_value_heads"] = full["num_key_value_heads"]
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> (transformers model, its checkpoint, the same with the released config form)."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = hf_gemma4(**dict(WIDE, **VARIANTS[name]))
            root = tmp_path_factory.mktemp(name)
            src = save_checkpoint(hf, root / "hf")
            released = root / "released"
            shutil.copytree(src, released)
            config = json.loads((src / "config.json").read_text())
            (released / "config.json").write_text(json.dumps(released_config(config)))
            cache[name] = (hf, src, released)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def checkpoints(built, tmp_path_factory):
    """checkpoints(name, writer, quantized) -> path: writer "mlx-lm" (mlx_lm.convert, its default 4-bit
    recipe) or "mlxgemma" (mlxgemma.convert, ours: the budget recipe at 4 bits)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    cache = {}

    def get(name, writer, quantized):
        key = (name, writer, quantized)
        if key not in cache:
            _, src, released = built(name)
            out = tmp_path_factory.mktemp(f"{name}-{writer}") / ("q" if quantized else "f")
            if writer == "mlx-lm":
                mlx_lm_convert(str(released), str(out), quantize=quantized, q_group_size=32)
            else:
                convert(src, out, **(QUANT if quantized else {}))
            cache[key] = out
        return cache[key]

    return get


def _mlx_lm(path):
    from mlx_lm.utils import load_model

    return load_model(path)[0]


def _logits(model, ids):
    return np.array(model(mx.array(ids)))


IDS = random_ids(2, int(2.5 * WINDOW))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("name", NAMES)
def test_mlx_lm_checkpoint_loads(checkpoints, built, name, quantized):
    """mlx_lm.convert's output (experts split into switch_glu layers, quantized ones as QuantizedSwitchLinear,
    the router at mlx-lm's 8 bits) loads in mlxgemma and gives mlx-lm's logits; the float one transformers'."""
    path = checkpoints(name, "mlx-lm", quantized)
    stored = mx.load(str(path / "model.safetensors"))
    if name == "moe":
        assert "model.layers.0.experts.switch_glu.up_proj.weight" in stored
        assert ("model.layers.0.experts.switch_glu.up_proj.scales" in stored) == quantized
    ours = mlxgemma.load_model(path)
    assert max_diff(_logits(ours, IDS), _logits(_mlx_lm(path), IDS)) <= TOL
    if not quantized:
        assert max_diff(_logits(ours, IDS), hf_logits(built(name)[0], IDS)) <= TOL
        return
    layer = ours.model.layers[0]
    if name == "moe":
        assert isinstance(layer.experts.gate_up_proj, QuantizedSwitchLinear)
        assert layer.router.proj.bits == 8 and layer.experts.down_proj.bits == 4
    if name == "E":
        assert ours.model.embed_tokens_per_layer.bits == 4  # mlx-lm quantizes the per-layer table too


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_mlx_lm_multimodal_checkpoint(tmp_path, quantized):
    """A gemma4 (multimodal) source through mlx_lm.convert: language_model.model.* weights, the towers
    stripped, the config still model_type gemma4 (mlx-lm's wrapper reads the text vocab from the top level)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    hf, src = _multimodal(tmp_path)
    out = tmp_path / "mlx-lm"
    mlx_lm_convert(str(src), str(out), quantize=quantized, q_group_size=32)
    assert all(k.startswith("language_model.model.") for k in mx.load(str(out / "model.safetensors")))
    ids = random_ids(2, 15, high=89)
    ours = mlxgemma.load_model(out)
    assert max_diff(_logits(ours, ids), _logits(_mlx_lm(out), ids)) <= TOL
    if not quantized:
        assert max_diff(_logits(ours, ids), hf_logits(hf, ids)) <= TOL
    # ... and through mlxgemma.convert: a text checkpoint both read as the same model
    dst = convert(out, tmp_path / "ours")
    assert json.loads((dst / "config.json").read_text())["model_type"] == "gemma4_text"
    assert max_diff(_logits(mlxgemma.load_model(dst), ids), _logits(ours, ids)) == 0
    assert max_diff(_logits(_mlx_lm(dst), ids), _logits(ours, ids)) <= TOL


def _multimodal(tmp_path):
    text = dict(BASE, **WIDE, num_hidden_layers=3, layer_types=[S, F, F], num_kv_shared_layers=1,
                hidden_size_per_layer_input=32)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=16,
                 subsampling_conv_channels=[8, 4])
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                                       image_token_id=95, boi_token_id=93, eoi_token_id=94, audio_token_id=92,
                                       boa_token_id=91, eoa_token_index=90, video_token_id=89,
                                       attn_implementation="eager")
    hf = randomize_scalars(randomize(transformers.Gemma4ForConditionalGeneration(config)))
    src = save_checkpoint(hf, tmp_path / "mm")
    d = json.loads((src / "config.json").read_text())
    d["text_config"] = released_config(d["text_config"])
    d["vocab_size"] = text["vocab_size"]  # mlx-lm's gemma4 takes the text vocab from here (default 262144)
    (src / "config.json").write_text(json.dumps(d))
    return hf, src


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("name", NAMES)
def test_our_checkpoint_loads_in_mlx_lm(checkpoints, built, name, quantized):
    """mlxgemma.convert's output loads in mlx_lm and gives our logits. It states global_head_dim (and the
    full layers' KV heads for k_eq_v) beside transformers' per_layer_config, which mlxgemma still reads
    first: the float output is exactly the source model. Float experts keep transformers' names; quantized
    ones are written as mlx-lm's QuantizedSwitchLinears (the only quantized layout mlx-lm reads)."""
    hf, src, _ = built(name)
    path = checkpoints(name, "mlxgemma", quantized)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["global_head_dim"] == 32
    assert config["per_layer_config"] == json.loads((src / "config.json").read_text())["per_layer_config"]
    assert ("num_global_key_value_heads" in config) == (name == "k_eq_v")
    ours = mlxgemma.load_model(path)
    assert max_diff(_logits(ours, IDS), _logits(_mlx_lm(path), IDS)) <= TOL
    stored = mx.load(str(path / "model.safetensors"))
    if name == "moe":
        split = "model.layers.0.experts.switch_glu.gate_proj.scales" in stored
        assert split == quantized and ("model.layers.0.experts.gate_up_proj" in stored) == (not quantized)
    if not quantized:
        assert max_diff(_logits(ours, IDS), _logits(mlxgemma.load_model(src), IDS)) == 0
        assert max_diff(_logits(ours, IDS), hf_logits(hf, IDS)) <= TOL


def test_config_fields_mlx_lm_defaults_differently(tmp_path):
    """A config that leaves out what mlx-lm defaults differently (layer_types: its pattern is 4:1 with the
    last layer not forced full; the softcap: 30; num_kv_shared_layers: 20; use_double_wide_mlp: true; one
    KV head) still reaches mlx-lm as transformers reads it: convert writes the resolved values."""
    hf = hf_gemma4(**WIDE, num_hidden_layers=6, layer_types=None, final_logit_softcapping=None, num_key_value_heads=4)
    src = save_checkpoint(hf, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    for key in ("layer_types", "final_logit_softcapping", "num_kv_shared_layers", "use_double_wide_mlp",
                "num_key_value_heads"):  # all at transformers' defaults in this model
        config.pop(key)
    (src / "config.json").write_text(json.dumps(config))
    assert hf.config.layer_types == [S] * 5 + [F]
    dst = convert(src, tmp_path / "dst")
    written = json.loads((dst / "config.json").read_text())
    assert written["layer_types"] == [S] * 5 + [F] and written["final_logit_softcapping"] is None
    assert written["num_kv_shared_layers"] == 0 and written["use_double_wide_mlp"] is False
    assert written["num_key_value_heads"] == 4
    ids = random_ids(2, 15)
    ref = hf_logits(hf, ids)
    assert max_diff(_logits(mlxgemma.load_model(dst), ids), ref) <= TOL
    assert max_diff(_logits(_mlx_lm(dst), ids), ref) <= TOL


def _dequantized(path, tmp_path):
    """The float checkpoint of exactly the weights a quantized one holds (convert --dequantize)."""
    return mlxgemma.load_model(convert(path, tmp_path / "dequantized", dequantize=True))


@pytest.mark.parametrize("writer", ["mlxgemma", "mlx-lm"])
def test_quantized_experts(checkpoints, built, writer, tmp_path):
    """Quantized experts (mx.gather_qmm) compute what their dequantized weights say, on the sorted path (a
    prefill: 90 token-expert pairs) and the plain one (decoding, 3 pairs), within float rounding; the drift
    from the float model is what 4-bit weights give (relative RMS of the logits: 0.37 measured for both
    writers; random weights have no structure to keep, test_convert bounds the other families by 0.6 too)."""
    path = checkpoints("moe", writer, True)
    model, twin = mlxgemma.load_model(path), _dequantized(path, tmp_path)
    stored = load_file(str(tmp_path / "dequantized" / "model.safetensors"))
    assert stored["model.layers.0.experts.gate_up_proj"].shape == (5, 64, 64)  # back to transformers' tensors
    ids = random_ids(2, 15)
    ours = _logits(model, ids)
    assert max_diff(ours, _logits(twin, ids)) <= TOL
    cache, twin_cache = model.make_cache(), twin.make_cache()
    model(mx.array(ids[:1, :WINDOW]), cache=cache)
    twin(mx.array(ids[:1, :WINDOW]), cache=twin_cache)
    for t in range(WINDOW, ids.shape[1]):
        step = ids[:1, t : t + 1]
        assert max_diff(np.array(model(mx.array(step), cache=cache)),
                        np.array(twin(mx.array(step), cache=twin_cache))) <= TOL
    ref = hf_logits(built("moe")[0], ids)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 0.6


def test_recipe_bits(checkpoints, built):
    """mlxgemma's 4-bit default (the budget recipe) on Gemma 4: the router at ROUTER_BITS whatever the budget,
    the experts' down_proj that mlx-lm's mixed_4_6 favours (layers 2 and 4 of 5) raised before any other, every
    expert within 4..6 bits, each module at the bits layer_specs planned on the float model; config.json names
    each quantized module by its on-disk path (gate_proj and up_proj alike); the E models' per-layer table at the
    recipe's 4 bits (benchmarks/gemma4_quant.py: more bits buy nothing measurable there)."""
    from mlxgemma.checkpoints.quantize import layer_specs

    moe = checkpoints("moe", "mlxgemma", True)
    q = json.loads((moe / "config.json").read_text())["quantization"]
    model = mlxgemma.load_model(moe)
    bits = {i: (layer.experts.gate_up_proj.bits, layer.experts.down_proj.bits, layer.router.proj.bits)
            for i, layer in enumerate(model.layers)}
    plan = layer_specs(mlxgemma.load_model(built("moe")[1]), 4, QUANT["q_group_size"])

    def at(i, leaf):
        return next(v["bits"] for p, v in plan.items() if p.endswith(f"layers.{i}.{leaf}"))

    assert bits == {i: (at(i, "experts.gate_up_proj"), at(i, "experts.down_proj"), at(i, "router.proj")) for i in bits}
    assert {b[2] for b in bits.values()} == {ROUTER_BITS} == {8}
    assert bits[2][1] > 4 and bits[4][1] > 4 and {b for g, d, _ in bits.values() for b in (g, d)} <= {4, 5, 6}
    assert q["model.layers.2.experts.switch_glu.down_proj"]["bits"] == bits[2][1]
    assert q["model.layers.2.experts.switch_glu.gate_proj"] == q["model.layers.2.experts.switch_glu.up_proj"]
    assert not any("gate_up_proj" in k for k in q)
    e = mlxgemma.load_model(checkpoints("E", "mlxgemma", True))
    assert e.model.embed_tokens_per_layer.bits == 4


@pytest.mark.parametrize("name", ["E", "moe"])
def test_stream_generate_on_quantized_checkpoint(checkpoints, name):
    """mlxgemma.stream_generate on a converted 4-bit checkpoint, prefilled in small steps and decoding across
    the window: the tokens mlx-lm generates from the same checkpoint."""
    import mlx_lm
    from mlx_lm.generate import stream_generate

    path = checkpoints(name, "mlxgemma", True)
    prompt = random_ids(1, 2 * WINDOW + 1, seed=5)[0].tolist()
    model, tokenizer = mlxgemma.load(path)
    ours = [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=2 * WINDOW,
                                                      prefill_step_size=4)]
    theirs = [r.token for r in stream_generate(*mlx_lm.load(str(path)), prompt, max_tokens=2 * WINDOW)]
    # a random model may draw its eos (then both stop there); else both decode 2 windows' worth
    assert ours == theirs and (len(ours) == 2 * WINDOW or ours[-1] in tokenizer.eos_token_ids), ours


def test_split_experts_quantized_differently(checkpoints, tmp_path):
    """mlxgemma runs gate and up fused: halves stored with different bits are one clear error."""
    path = tmp_path / "mixed"
    shutil.copytree(checkpoints("moe", "mlx-lm", True), path)
    weights = load_file(str(path / "model.safetensors"))
    float_up = mx.array(load_file(str(checkpoints("moe", "mlx-lm", False) / "model.safetensors"))[
        "model.layers.1.experts.switch_glu.up_proj.weight"])
    w, s, b = (np.array(a) for a in mx.quantize(float_up, 32, 8))
    prefix = "model.layers.1.experts.switch_glu.up_proj."
    weights.update({prefix + "weight": w, prefix + "scales": s, prefix + "biases": b})
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "mlx"})
    with pytest.raises(mlxgemma.MlxGemmaError, match="gate_proj.weight .* and up_proj.weight .* are stored "
                                                     "differently"):
        mlxgemma.load_model(path)

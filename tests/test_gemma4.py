"""Gemma 4 (text) against transformers: tiny float32 models with every weight randomised (layer_scalar
buffers too), one per variant: dense (partial/proportional and linear ropes, biases, an untied head), "E"
(per-layer inputs, both layer types KV-shared, each from the last earlier layer of its type), double-wide
MLPs, mixture of experts (top-3 of 5: prefill takes the sorted gather path, decoding the plain one),
keys as values on full layers. Every variant: prefill 2.5 windows long, chunked prefill, cached decoding
across the window, left-padded batches, the loss, greedy generation == transformers' generate. Then the
bidirectional variant, multimodal checkpoints, the config forms transformers reads, and bad inputs."""

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import mlxgemma
from decode_util import GreedyBatch
from reference import TOL, WINDOW, hf_logits, max_diff, random_ids, randomize, save_checkpoint

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=WINDOW,
            vocab_size_per_layer_input=96, hidden_size_per_layer_input=0, final_logit_softcapping=3.0,
            layer_types=[S, F, S, S, F], eos_token_id=1)
VARIANTS = {
    "dense": dict(attention_bias=True, tie_word_embeddings=False, rope_parameters={
        S: {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 4.0, "rope_theta": 1e4}}),
    # 7 layers, the last 3 shared: sliding 4, 5 read layer 2 (not 0), full 6 reads layer 3 (not 1).
    "E": dict(num_hidden_layers=7, layer_types=[S, F, S, F, S, S, F], num_kv_shared_layers=3,
              hidden_size_per_layer_input=8),
    "wide": dict(num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=4,
                 hidden_activation="silu"),
    "moe": dict(enable_moe_block=True, num_experts=5, top_k_experts=3, moe_intermediate_size=24),
    # As the 31B: full layers take values from k_proj and have their own KV heads. "default" ignores
    # partial_rotary_factor in transformers' Gemma 4, and so here.
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1, rope_parameters={
        S: {"rope_type": "default", "rope_theta": 1e4},
        F: {"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": 1e5}}),
}
ALL = list(VARIANTS)


def hf_gemma4(seed: int = 0, **overrides):
    config = transformers.Gemma4TextConfig(**dict(BASE, **overrides), attn_implementation="eager")
    model = randomize(transformers.Gemma4ForCausalLM(config), seed)
    return randomize_scalars(model, seed)


def randomize_scalars(model, seed: int = 0):
    """layer_scalar is a buffer, not a parameter: randomize() leaves it at 1."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """variant(name) -> (transformers model, mlxgemma model, tokenizer, checkpoint path), built once."""
    built = {}

    def get(name):
        if name not in built:
            hf = hf_gemma4(**VARIANTS[name])
            path = save_checkpoint(hf, tmp_path_factory.mktemp(name) / "ckpt")
            built[name] = (hf, *mlxgemma.load(path), path)
        return built[name]

    return get


def _logits(model, ids, attention_mask=None, cache=None):
    mask = None if attention_mask is None else mx.array(attention_mask)
    return np.array(model(mx.array(ids), attention_mask=mask, cache=cache))


@pytest.mark.parametrize("name", ALL)
def test_prefill_long_prompt(variant, name):
    hf, model, _, _ = variant(name)
    ids = random_ids(2, int(2.5 * WINDOW))
    assert max_diff(_logits(model, ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_chunked_prefill(variant, name):
    hf, model, _, _ = variant(name)
    ids = random_ids(1, 5 * WINDOW)
    cache, out, start = model.make_cache(), [], 0
    for size in (3, WINDOW + 2, 1, 2 * WINDOW, 1, 5 * WINDOW):
        out.append(_logits(model, ids[:, start : start + size], cache=cache))
        start += size
    assert max_diff(np.concatenate(out, axis=1), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_cached_decoding_across_window(variant, name):
    hf, model, _, _ = variant(name)
    ids = random_ids(1, WINDOW + 1 + 2 * WINDOW)
    cache = model.make_cache()
    out = [_logits(model, ids[:, : WINDOW + 1], cache=cache)]
    out += [_logits(model, ids[:, t : t + 1], cache=cache) for t in range(WINDOW + 1, ids.shape[1])]
    assert max_diff(np.concatenate(out, axis=1), hf_logits(hf, ids)) <= TOL


def _left_padded(lengths, total, seed=3):
    ids, mask = np.zeros((len(lengths), total), dtype=np.int64), np.zeros((len(lengths), total), dtype=np.int64)
    rows = [random_ids(1, n, seed=seed + b)[0] for b, n in enumerate(lengths)]
    for b, row in enumerate(rows):
        ids[b, total - len(row):], mask[b, total - len(row):] = row, 1
    return ids, mask, rows


@pytest.mark.parametrize("name", ALL)
def test_left_padded_batch(variant, name):
    """The padded forward equals transformers' and, at real positions, each row alone; then the batch decodes
    across the window, each row equal to itself alone."""
    hf, model, _, _ = variant(name)
    total = 2 * WINDOW + 3
    ids, mask, rows = _left_padded([total, 5, WINDOW + 2], total)
    ours, real = _logits(model, ids, attention_mask=mask), mask.astype(bool)
    assert np.isfinite(ours).all()
    assert max_diff(ours[real], hf_logits(hf, ids, mask)[real]) <= TOL
    cache, steps = model.make_cache(), random_ids(3, 2 * WINDOW, seed=9)
    out = [_logits(model, ids, attention_mask=mask, cache=cache)[:, -1:]]
    out += [_logits(model, steps[:, t : t + 1], cache=cache) for t in range(steps.shape[1])]
    out = np.concatenate(out, axis=1)
    for b, row in enumerate(rows):
        alone = _logits(model, np.concatenate([row, steps[b]])[None])[0, len(row) - 1 :]
        assert max_diff(out[b], alone) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_loss(variant, name):
    hf, model, _, _ = variant(name)
    ids = random_ids(2, 2 * WINDOW)
    labels = ids.copy()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    assert abs(model.loss(mx.array(ids), mx.array(labels)).item() - ref) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_greedy_generation_equals_transformers(variant, name):
    """stream_generate (mlx-lm's loop on model.make_cache()) in small prefill steps, decoding past two
    windows: transformers' greedy tokens."""
    hf, model, tokenizer, _ = variant(name)
    prompt = random_ids(1, 2 * WINDOW + 1, seed=5)[0].tolist()  # a prompt none of the variants ends early on
    ours = [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=2 * WINDOW,
                                                      prefill_step_size=4)]
    assert len(ours) == 2 * WINDOW
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=2 * WINDOW, do_sample=False, eos_token_id=1,
                          pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()


def test_bfloat16(variant):
    """bf16 weights (the released dtype) give transformers' own bf16 error, MoE included (MLX's CPU
    gather_mm is float32 only: the experts fall back to it there)."""
    hf, _, _, path = variant("moe")
    ids = random_ids(2, 15)
    ref = hf_logits(hf, ids)
    ours = np.array(mlxgemma.load_model(path, dtype="bfloat16")(mx.array(ids)).astype(mx.float32))
    theirs = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids)
    assert max_diff(ours, ref) <= 1.5 * max_diff(theirs, ref) + 0.01


def test_layout_of_shared_layers(variant):
    """Shared layers own no k/v projections and no cache; make_cache() covers the layers before them (cache[i]
    is layer i's), and the donors are the last earlier layer of each type."""
    hf, model, _, path = variant("E")
    config = model.config
    assert config.first_kv_shared_layer_idx == 4 and config.kv_donors == {S: 2, F: 3}
    assert len(model.make_cache()) == 4 and len(model.layers) == 7
    assert len(model.make_cache(max_kv_size=4)) == 4
    for i, layer in enumerate(model.layers):
        assert ("k_proj" in layer.self_attn) == (i < 4) == ("k_norm" in layer.self_attn)
    stored = load_file(str(path / "model.safetensors"))
    assert not any(".layers.5.self_attn.k_proj" in k for k in stored)
    wide = variant("wide")[1]
    assert [layer.mlp.gate_proj.weight.shape[0] for layer in wide.layers] == [48, 48, 48, 96, 96]


def test_batch_rows_equal_alone(variant):
    """The server's batch caches (per-row offsets) under the shared layers: rows of different lengths, some
    past the window, decode together as each does alone."""
    _, model, _, _ = variant("E")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (1, WINDOW + 1, 2 * WINDOW + 3)]
    batch, firsts = GreedyBatch(model), []
    for p in prompts:
        firsts.append(int(mx.argmax(batch.add(model.make_cache(), p, step=4))))
    steps = [batch.step()]
    for _ in range(WINDOW + 2):
        steps.append(batch.step())
    for b, p in enumerate(prompts):
        tokens = [firsts[b]] + [int(mx.argmax(s[b])) for s in steps[:-1]]
        alone = np.array(nn.log_softmax(model(mx.array([p + tokens]))[0, len(p):], axis=-1))
        assert max_diff(np.stack([np.array(s[b]) for s in steps]), alone) <= TOL


def test_bidirectional(tmp_path):
    """use_bidirectional_attention "all": no causal mask, and a sliding window of |i - j| <= W // 2 + 1
    (transformers' inclusive bound on its halved window); it takes no cache. "vision" is causal for text."""
    hf = hf_gemma4(use_bidirectional_attention="all", hidden_size_per_layer_input=8)
    path = save_checkpoint(hf, tmp_path / "all")
    model = mlxgemma.load_model(path)
    assert json.loads((path / "config.json").read_text())["sliding_window"] == WINDOW  # written back
    ids = random_ids(2, int(2.5 * WINDOW))
    ids, mask = ids.copy(), np.ones_like(ids)
    mask[1, :3] = 0
    assert max_diff(_logits(model, ids), hf_logits(hf, ids)) <= TOL
    real = mask.astype(bool)
    assert max_diff(_logits(model, ids, attention_mask=mask)[real], hf_logits(hf, ids, mask)[real]) <= TOL
    with pytest.raises(mlxgemma.MlxGemmaError, match="bidirectional"):
        model(mx.array(ids), cache=model.make_cache())
    hf = hf_gemma4(use_bidirectional_attention="vision")
    model = mlxgemma.load_model(save_checkpoint(hf, tmp_path / "vision"))
    assert max_diff(_logits(model, ids), hf_logits(hf, ids)) <= TOL


def _multimodal(tmp_path):
    text = dict(BASE, num_hidden_layers=3, layer_types=[S, F, F], num_kv_shared_layers=1,
                hidden_size_per_layer_input=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64)
    audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=16,
                 subsampling_conv_channels=[8, 4])
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                                       image_token_id=95, boi_token_id=93, eoi_token_id=94, audio_token_id=92,
                                       boa_token_id=91, eoa_token_index=90, video_token_id=89,
                                       attn_implementation="eager")
    hf = randomize_scalars(randomize(transformers.Gemma4ForConditionalGeneration(config)))
    return hf, save_checkpoint(hf, tmp_path / "mm")


def test_multimodal_checkpoint_text_part(tmp_path):
    """A model_type gemma4 checkpoint (vision and audio towers, their embedders, the language model) runs as
    its text model, from transformers' layout and from mlx-lm's (language_model.model.*)."""
    hf, path = _multimodal(tmp_path)
    ids = random_ids(2, 15, high=89)
    ref = hf_logits(hf, ids)
    assert max_diff(_logits(mlxgemma.load_model(path), ids), ref) <= TOL
    weights = load_file(str(path / "model.safetensors"))
    renamed = {k.replace("model.language_model.", "language_model.model."): v for k, v in weights.items()}
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert max_diff(_logits(mlxgemma.load_model(path), ids), ref) <= TOL


def test_released_config_forms(variant, tmp_path):
    """transformers 5 saves full layers' shapes as per_layer_config; the released configs say global_head_dim
    and num_global_key_value_heads. Both load the same model. A released checkpoint's k/v weights of shared
    layers (which transformers ignores) are dropped too."""
    hf, model, _, path = variant("k_eq_v")
    config = json.loads((path / "config.json").read_text())
    assert config["per_layer_config"] == {"1": {"head_dim": 32, "num_key_value_heads": 1},
                                          "4": {"head_dim": 32, "num_key_value_heads": 1}}
    released = tmp_path / "released"
    released.mkdir()
    (released / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    del config["per_layer_config"]
    (released / "config.json").write_text(json.dumps(dict(config, global_head_dim=32, num_global_key_value_heads=1)))
    ids = random_ids(1, 15)
    assert max_diff(_logits(mlxgemma.load_model(released), ids), hf_logits(hf, ids)) <= TOL

    hf, _, _, path = variant("E")
    weights = load_file(str(path / "model.safetensors"))
    weights["model.layers.5.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
    weights["model.layers.6.self_attn.k_norm.weight"] = np.zeros((32,), np.float32)
    save_file(weights, str(released / "model.safetensors"), metadata={"format": "pt"})
    (released / "config.json").write_text((path / "config.json").read_text())
    assert max_diff(_logits(mlxgemma.load_model(released), ids), hf_logits(hf, ids)) <= TOL


def test_base_model(tmp_path):
    """architectures ["Gemma4TextModel"]: the final hidden states (keys without the "model." prefix)."""
    config = transformers.Gemma4TextConfig(**dict(BASE, **VARIANTS["E"]), attn_implementation="eager")
    hf = randomize_scalars(randomize(transformers.Gemma4TextModel(config)))
    model = mlxgemma.load_model(save_checkpoint(hf, tmp_path / "base"))
    ids = random_ids(2, 15)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    assert type(model).__name__ == "Gemma4TextModel" and max_diff(_logits(model, ids), ref) <= TOL


def _config(**overrides) -> dict:
    return dict(BASE, model_type="gemma4_text", **overrides)


BAD_CONFIGS = [
    # layers 2..4 shared: the full ones (2, 4) have no full layer before them
    (dict(layer_types=[S, S, F, S, F], num_kv_shared_layers=3), "leaves the shared full_attention layers without"),
    (dict(num_kv_shared_layers=5), "num_kv_shared_layers is 5, expected 0..4"),
    (dict(num_kv_shared_layers=-1), "num_kv_shared_layers is -1"),
    (dict(rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4}, F: {"rope_theta": 1e6}}),
     r"rope_parameters.sliding_attention.rope_type 'yarn' is not supported \(supported: default, linear, "
     "proportional"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "has no 'full_attention' entry"),
    (dict(rope_parameters={S: {"rope_theta": 1e4}, F: {"rope_type": "proportional", "rope_theta": 1e6,
                                                       "factor": 0}}), "factor is 0"),
    (dict(rope_parameters={S: {"rope_theta": 1e4}, F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6,
                                                       "partial_rotary_factor": 0.5}}), "partial linear rope"),
    (dict(per_layer_config={"1": {"intermediate_size": 8}}), "overrides intermediate_size of layer 1"),
    (dict(per_layer_config={"1": {"head_dim": 32}}), "different head sizes"),
    (dict(per_layer_config={"9": {"head_dim": 32}}), "key '9' is not a layer index"),
    (dict(global_head_dim=None), "head_dim is None"),
    (dict(global_head_dim=15), "head_dim is 15, expected a positive even size"),
    (dict(attention_k_eq_v=True, num_global_key_value_heads=3), "have 3 KV heads, which must divide"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is True"),
    (dict(use_bidirectional_attention="text"), "use_bidirectional_attention is 'text'"),
    (dict(enable_moe_block=True, num_experts=4), "enable_moe_block needs top_k_experts, moe_intermediate_size"),
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=5, moe_intermediate_size=8), "top_k_experts 5 is more"),
    (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=50), "vocab_size_per_layer_input 50 is smaller"),
    (dict(hidden_size_per_layer_input=-1), "hidden_size_per_layer_input is -1"),
    (dict(num_experts=0), "num_experts is 0, expected a positive size"),
    (dict(hidden_activation="tanh"), "hidden_activation 'tanh' is not supported"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config(overrides, message):
    with pytest.raises(mlxgemma.MlxGemmaError, match=message):
        mlxgemma.build_model(_config(**overrides))


def test_config_defaults_follow_transformers():
    """No layer_types: five sliding to one full, the last forced full; default ropes, global_head_dim 512."""
    d = _config(num_hidden_layers=8)
    del d["layer_types"], d["global_head_dim"]
    config = mlxgemma.build_model(d).config
    ref = transformers.Gemma4TextConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert config.layer_types == ref.layer_types == [S] * 5 + [F, S, F]
    assert config.rope_parameters == ref.rope_parameters
    assert config.head_dims == {S: 16, F: 512}


def test_bad_inputs(variant, tmp_path):
    hf, model, _, path = variant("E")
    with pytest.raises(mlxgemma.MlxGemmaError, match="takes 4 layer caches .* got 7"):
        model(mx.array([[5, 6]]), cache=model.make_cache() + model.make_cache()[:3])
    with pytest.raises(mlxgemma.MlxGemmaError, match="outside the vocabulary"):
        model(mx.array([[5, 96]]))
    # A checkpoint without its per-layer weights: the loader names what is missing.
    weights = load_file(str(path / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in weights.items() if "per_layer" not in k}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(mlxgemma.MlxGemmaError, match="weights do not match config.json: missing: "
                       "model.embed_tokens_per_layer.weight, model.layers.0.per_layer_input_gate.weight"):
        mlxgemma.load_model(broken)

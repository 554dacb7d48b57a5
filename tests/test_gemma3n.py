"""Gemma 3n (text) against transformers: tiny float32 models with every weight randomised (AltUp's output scale,
router and coefficients, LAuReL, the per-layer inputs and every norm included; transformers' other buffers are
constants, never saved). Two variants: "E" (3 AltUp streams, activation sparsity on the first two layers, KV
sharing across both layer types, per-layer MLP widths, ids past the per-layer table) and "alt" (2 streams with
the second active, no output scale, coefficients far past altup_coef_clip, an untied head, biases, a linear
rope, SiLU). Each: prefill 2.5 windows long, chunked prefill, cached decoding across the window and the shared
layers, a left-padded batch, the loss, greedy generation == transformers' generate; then the decode core's
batch rows, quantized KV caches, a prompt-cache file, multimodal and base-model checkpoints, the released
config's tensors, the config forms transformers reads, and bad input."""

import copy
import json
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import mlxgemma
from decode_util import GreedyBatch
from mlxgemma.models import cache as cache_module
from reference import TOL, WINDOW, hf_logits, max_diff, random_ids, randomize, save_checkpoint

S, F = "sliding_attention", "full_attention"
GROUP = 32  # the KV quantization group: head_dim 32
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=2, head_dim=GROUP, sliding_window=WINDOW, layer_types=[S, F, S, F, S, S, F],
            vocab_size_per_layer_input=80, hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=3,
            activation_sparsity_pattern=[0.95, 0.6] + [0.0] * 5, final_logit_softcapping=5.0, eos_token_id=1)
VARIANTS = {
    # The last 3 layers shared: sliding 4 and 5 read layer 2 (not 0), full 6 reads layer 3 (not 1).
    "E": dict(num_kv_shared_layers=3, intermediate_size=[48, 64, 48, 48, 64, 48, 32]),
    # transformers clips AltUp's coefficients only in training: at 0.01 the clip would change every one.
    "alt": dict(num_kv_shared_layers=2, altup_num_inputs=2, altup_active_idx=1, altup_correct_scale=False,
                altup_coef_clip=0.01, tie_word_embeddings=False, attention_bias=True, hidden_activation="silu",
                rope_parameters={S: {"rope_type": "default", "rope_theta": 100.0},
                                 F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
}
ALL = list(VARIANTS)


def hf_gemma3n(seed: int = 0, head: str = "Gemma3nForCausalLM", **overrides):
    config = transformers.Gemma3nTextConfig(**dict(BASE, **overrides), attn_implementation="eager")
    return randomize(getattr(transformers, head)(config), seed)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """variant(name) -> (transformers model, mlxgemma model, tokenizer, checkpoint path), built once."""
    built = {}

    def get(name):
        if name not in built:
            hf = hf_gemma3n(**VARIANTS[name])
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
    assert (ids >= 80).any()  # ids past the per-layer table (row 0 there)
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
    """stream_generate in small prefill steps, decoding past two windows: transformers' greedy tokens."""
    hf, model, tokenizer, _ = variant(name)
    prompt = random_ids(1, 2 * WINDOW + 1, seed=5)[0].tolist()
    ours = [c.token for c in mlxgemma.stream_generate(model, tokenizer, prompt, max_tokens=2 * WINDOW,
                                                      prefill_step_size=4)]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=2 * WINDOW, do_sample=False, eos_token_id=1,
                          pad_token_id=0)
    assert len(ours) == 2 * WINDOW and ours == ref[0, len(prompt):].tolist()


def test_what_the_variants_exercise(variant):
    """The shared layers own no k/v projections and no cache, the donors are the last earlier layer of each
    type, the sparse MLPs are the first two; "alt"'s coefficients lie past its clip."""
    _, model, _, path = variant("E")
    config = model.config
    assert config.first_kv_shared_layer_idx == 4 and config.kv_donors == {S: 2, F: 3}
    assert len(model.make_cache()) == 4 and len(model.make_cache(max_kv_size=4)) == 4
    for i, layer in enumerate(model.layers):
        assert ("k_proj" in layer.self_attn) == (i < 4) == ("k_norm" in layer.self_attn)
    assert [layer.mlp.activation_sparsity for layer in model.layers[:3]] == [0.95, 0.6, 0.0]
    assert [layer.mlp.gate_proj.weight.shape[0] for layer in model.layers] == VARIANTS["E"]["intermediate_size"]
    stored = load_file(str(path / "model.safetensors"))
    assert not any(".layers.5.self_attn.k_proj" in k for k in stored)
    assert np.abs(stored["model.layers.0.altup.correct_output_scale"]).max() > 0
    alt = variant("alt")[0]
    assert alt.model.layers[0].altup.prediction_coefs.weight.abs().max() > 10 * VARIANTS["alt"]["altup_coef_clip"]


def test_std_multiplier_is_torchs():
    from mlxgemma.models.gemma3n import std_multiplier

    for p in (0.95, 0.6, 0.5, 0.1, 0.999):
        assert std_multiplier(p) == torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p)).item()


def test_bfloat16(variant):
    """bf16 weights (the released dtype) give about transformers' own bf16 error."""
    hf, _, _, path = variant("E")
    ids = random_ids(2, 15)
    ref = hf_logits(hf, ids)
    ours = np.array(mlxgemma.load_model(path, dtype="bfloat16")(mx.array(ids)).astype(mx.float32))
    theirs = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids)
    assert max_diff(ours, ref) <= 1.5 * max_diff(theirs, ref) + 0.01


def test_batch_rows_equal_alone(variant):
    """The server's batch caches (per-row offsets) under the shared layers: rows of different lengths, some
    past the window, decode together as each does alone."""
    _, model, _, _ = variant("E")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (1, WINDOW + 1, 2 * WINDOW + 3)]
    batch, firsts = GreedyBatch(model), []
    for p in prompts:
        firsts.append(int(mx.argmax(batch.add(model.make_cache(), p, step=4))))
    steps = [batch.step() for _ in range(WINDOW + 3)]
    for b, p in enumerate(prompts):
        tokens = [firsts[b]] + [int(mx.argmax(s[b])) for s in steps[:-1]]
        alone = np.array(nn.log_softmax(model(mx.array([p + tokens]))[0, len(p):], axis=-1))
        assert max_diff(np.stack([np.array(s[b]) for s in steps]), alone) <= TOL


def _run(model, tok, prompt, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=3 * WINDOW, **kw))
    return [c.token for c in chunks], np.array([c.logprob for c in chunks])


@pytest.mark.parametrize("name", ["E", "alt"])
def test_speculative_rollback(variant, name):
    """Speculation rolls every cache kind back past the window and across the KV-shared layers: prompt lookup
    (a repeated prompt) and a draft model (another random Gemma 3n: mostly wrong) give plain greedy's tokens and
    logprobs over 3 windows."""
    _, model, tok, _ = variant(name)
    other = variant("alt" if name == "E" else "E")[1]
    prompt = [2] + list(range(10, 20)) * 2
    plain = _run(model, tok, prompt)
    for kw in (dict(prompt_lookup_ngram=1, num_draft_tokens=4), dict(draft_model=other, num_draft_tokens=3)):
        spec = _run(model, tok, prompt, **kw)
        assert spec[0] == plain[0] and np.max(np.abs(spec[1] - plain[1])) <= 1e-4


def _fake_switch(cache, bits):
    """to_quantized's stand-in: the cache stays float, its held and future keys and values rounded through
    8-bit quantization and back (test_kv_quant.py's check, for a model whose shared layers read the donor's)."""
    def encode(self, x, key=False):
        return mx.dequantize(*mx.quantize(x, group_size=GROUP, bits=bits), group_size=GROUP, bits=bits)
    if cache.keys is not None:
        cache.keys, cache.values = encode(cache, cache.keys), encode(cache, cache.values)
    cache.encode = encode.__get__(cache)
    cache.to_quantized = lambda group_size, bits: cache
    return cache


def test_quantized_kv_cache(variant, monkeypatch):
    """kv_bits 8 past the window, quantized from the start or from past the first window: the shared layers
    attend over the donor's quantized keys and values, exactly as a float model over their dequantized values;
    and, while the greedy tokens are the float cache's, near its logprobs (measured: from the start they agree
    for 2 tokens, max |Δ logprob| 0.002; switched while decoding, all 18, 0.011; logprobs of magnitude up to 3.7)."""
    _, model, tok, _ = variant("E")
    prompt = [2] + list(range(10, 10 + WINDOW))  # (quantized_kv_start WINDOW + 3 then switches while decoding)
    plain = _run(model, tok, prompt)
    for start in (0, WINDOW + 3):
        quantized = _run(model, tok, prompt, kv_bits=8, kv_group_size=GROUP, quantized_kv_start=start)
        with monkeypatch.context() as m:
            for cls in (cache_module.KVCache, cache_module.RotatingKVCache):
                m.setattr(cls, "to_quantized", lambda self, group_size, bits: _fake_switch(self, bits))
            fake = _run(model, tok, prompt, kv_bits=8, kv_group_size=GROUP, quantized_kv_start=start)
        assert quantized[0] == fake[0] and np.max(np.abs(quantized[1] - fake[1])) <= 1e-4
        agree = next((i for i, (a, b) in enumerate(zip(quantized[0], plain[0])) if a != b), len(plain[0]))
        assert agree > 0 and np.max(np.abs(quantized[1][:agree] - plain[1][:agree])) <= 0.05


def test_prompt_cache_file(variant, tmp_path):
    from mlxgemma.cache_prompt import cache_prompt
    from mlxgemma.checkpoints import cache_file

    _, model, tok, _ = variant("E")
    prefix = " ".join(f"t{10 + i % 50}" for i in range(3 * WINDOW))
    assert cache_prompt(model, tok, prefix, tmp_path / "p.safetensors") > 2 * WINDOW
    cache, held = cache_file.load(tmp_path / "p.safetensors", model)
    more = list(tok.encode(" t70 t71 t72", add_special_tokens=False))
    resumed = _run(model, tok, more, prompt_cache=cache, history=held)
    whole = _run(model, tok, held + more)
    assert resumed[0] == whole[0] and np.max(np.abs(resumed[1] - whole[1])) <= 1e-4


def _multimodal(path, hf, layout: str, towers: bool = True):
    """hf's weights as a model_type gemma3n checkpoint stores its language model: transformers' layout
    (model.language_model.*) or mlx-vlm's (language_model.model.*), with the k/v weights of shared layers that
    the released checkpoints (and mlx-vlm's) hold, and no tower weights (mlx-lm's conversions drop them); the
    towers in config.json or not."""
    path.mkdir()
    prefix = {"hf": "model.language_model.", "mlx-vlm": "language_model.model."}[layout]
    weights = {prefix + k[len("model."):]: v.numpy() for k, v in hf.state_dict().items() if k.startswith("model.")}
    weights[prefix + "layers.5.self_attn.k_proj.weight"] = np.ones((64, 32), np.float32)
    weights[prefix + "layers.6.self_attn.v_norm.weight"] = np.ones((32,), np.float32)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"],
              "text_config": hf.config.to_dict(), "tie_word_embeddings": True}
    if towers:
        config.update(vision_config={"model_type": "gemma3n_vision"}, audio_config={"model_type": "gemma3n_audio"})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("layout,towers", [("hf", True), ("mlx-vlm", True), ("mlx-vlm", False)])
def test_multimodal_checkpoint_text_part(variant, tmp_path, layout, towers):
    """A model_type gemma3n checkpoint without tower weights runs as its language model, from transformers'
    layout or mlx-vlm's, with towers in config.json or without (with tower weights: test_gemma3n_multimodal)."""
    hf, _, _, _ = variant("E")
    model = mlxgemma.load_model(_multimodal(tmp_path / "mm", hf, layout, towers))
    ids = random_ids(2, 15)
    assert type(model).__name__ == "Gemma3nForCausalLM"
    assert max_diff(_logits(model, ids), hf_logits(hf, ids)) <= TOL


def test_base_model(tmp_path):
    """architectures ["Gemma3nTextModel"]: the final hidden states (keys without the "model." prefix)."""
    hf = hf_gemma3n(head="Gemma3nTextModel", **VARIANTS["E"])
    model = mlxgemma.load_model(save_checkpoint(hf, tmp_path / "base"))
    ids = random_ids(2, 15)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    assert type(model).__name__ == "Gemma3nTextModel" and max_diff(_logits(model, ids), ref) <= TOL


def test_edge_configs():
    """One AltUp stream (no projections), no KV sharing, every MLP sparse: still transformers' logits."""
    hf = hf_gemma3n(num_kv_shared_layers=0, altup_num_inputs=1, num_hidden_layers=3, layer_types=[S, F, S],
                    intermediate_size=48, activation_sparsity_pattern=[0.9, 0.3, 0.5], seed=2)
    model = mlxgemma.build_model(dict(hf.config.to_dict(), model_type="gemma3n_text"))
    model.load_weights([(k, mx.array(v.numpy())) for k, v in hf.state_dict().items() if k != "lm_head.weight"])
    ids = random_ids(2, 2 * WINDOW + 1)
    assert model.config.kv_donors == {} and len(model.make_cache()) == 3
    assert max_diff(_logits(model, ids), hf_logits(hf, ids)) <= TOL


def test_released_config_has_transformers_tensors():
    """transformers' default config (E4B: 35 layers, the last 15 KV-shared, 4 AltUp streams) builds, lazily,
    with exactly the tensors (names and shapes) of transformers' own model."""
    from mlx.utils import tree_flatten

    config = transformers.Gemma3nTextConfig()
    with torch.device("meta"):
        hf = transformers.Gemma3nForCausalLM(config)
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # (tied)
    model = mlxgemma.build_model(config.to_dict())
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert ours == theirs


def test_config_forms_follow_transformers():
    """Legacy rope keys, no layer_types (four sliding to one full), the default sparsity (10 layers at 0.95 when
    there are more than 10), one width for every layer: as transformers reads them."""
    d = dict(BASE, model_type="gemma3n_text", num_hidden_layers=12, rope_theta=5e5, rope_local_base_freq=50.0,
             rope_scaling={"rope_type": "linear", "factor": 4.0}, num_kv_shared_layers=4)
    for key in ("layer_types", "activation_sparsity_pattern"):
        del d[key]
    config = mlxgemma.build_model(d).config
    ref = transformers.Gemma3nTextConfig(**{k: v for k, v in d.items() if k != "model_type"})
    for field in ("layer_types", "activation_sparsity_pattern", "intermediate_size", "rope_parameters"):
        assert getattr(config, field) == getattr(ref, field), field
    flat = mlxgemma.build_model(dict(d, rope_parameters={"rope_type": "default", "rope_theta": 7.0})).config
    assert flat.rope_parameters == config.rope_parameters  # a flat dict is ignored, as transformers ignores it


def _config(**overrides) -> dict:
    return {**BASE, "model_type": "gemma3n_text", "num_kv_shared_layers": 3, **overrides}


BAD_CONFIGS = [
    (dict(layer_types=[S, S, F, S, F, S, F], num_kv_shared_layers=5), "leaves the shared full_attention layers"),
    (dict(num_kv_shared_layers=7), "num_kv_shared_layers is 7, expected 0..6"),
    (dict(activation_sparsity_pattern=[0.5] * 6), "activation_sparsity_pattern must give each of the 7 layers"),
    (dict(activation_sparsity_pattern=[1.0] + [0.0] * 6), r"a sparsity in \[0, 1\)"),
    (dict(intermediate_size=[48] * 6), "intermediate_size must be one size or one for each of the 7 layers"),
    (dict(intermediate_size=[48] * 6 + [0]), "intermediate_size is .*, expected a positive size"),
    (dict(intermediate_size=[48] * 6 + ["x"]), "intermediate_size is .*, expected a positive size"),
    (dict(altup_active_idx=3), "altup_active_idx is 3, expected one of the 3 AltUp streams"),
    (dict(altup_active_idx=-1), "altup_active_idx is -1, expected a stream index"),
    (dict(altup_num_inputs=0), "altup_num_inputs is 0, expected a positive size"),
    (dict(laurel_rank=0), "laurel_rank is 0"),
    (dict(hidden_size_per_layer_input=0), "hidden_size_per_layer_input is 0"),
    (dict(head_dim=None), "head_dim is None"),
    (dict(head_dim=15), "head_dim is 15, expected an even size"),
    (dict(hidden_size=30), "hidden_size 30 is not a multiple of num_attention_heads 4"),
    (dict(layer_types=[S, F]), "layer_types has 2 entries"),
    (dict(rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4}}), "rope_type 'yarn' is not supported"),
    (dict(rope_parameters={F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                               "partial_rotary_factor": 0.5}}), "partial linear rope"),
    (dict(hidden_activation="tanh"), "hidden_activation 'tanh' is not supported"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config(overrides, message):
    with pytest.raises(mlxgemma.MlxGemmaError, match=message) as e:
        mlxgemma.build_model(_config(**overrides))
    assert "\n" not in str(e.value)


def test_bad_inputs(variant, tmp_path):
    _, model, _, path = variant("E")
    with pytest.raises(mlxgemma.MlxGemmaError, match="takes 4 layer caches .* got 7"):
        model(mx.array([[5, 6]]), cache=model.make_cache() + model.make_cache()[:3])
    with pytest.raises(mlxgemma.MlxGemmaError, match="outside the vocabulary"):
        model(mx.array([[5, 96]]))
    with pytest.raises(mlxgemma.MlxGemmaError, match="text_config must be an object"):
        mlxgemma.build_model({"model_type": "gemma3n", "text_config": [1]})
    with pytest.raises(mlxgemma.MlxGemmaError, match="sparse MLPs .* run it on one machine"):
        model.shard(SimpleNamespace(size=lambda: 2))
    weights = load_file(str(path / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in weights.items() if ".altup." not in k}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(mlxgemma.MlxGemmaError, match="weights do not match config.json: missing: "
                       "model.layers.0.altup.correct_output_scale"):
        mlxgemma.load_model(broken)

"""Every computation switch of every family against transformers, and config.json as old checkpoints
write it (legacy rope keys, layer patterns) read the same way transformers reads it."""

import json

import mlx.core as mx
import numpy as np
import pytest
import transformers

from reference import TOL, WINDOW, hf_logits, hf_model, max_diff, random_ids, save_and_load

SWITCHES = [
    ("gemma", dict(num_key_value_heads=1)),  # MQA
    ("gemma", dict(num_key_value_heads=4)),  # MHA
    ("gemma", dict(head_dim=8)),  # heads * head_dim != hidden_size the other way
    ("gemma", dict(attention_bias=True)),
    ("gemma", dict(tie_word_embeddings=False)),
    ("gemma", dict(hidden_act="gelu")),  # legacy value, means the tanh approximation
    ("gemma", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})),
    ("gemma2", dict(attn_logit_softcapping=1.0, final_logit_softcapping=1.0)),
    ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=16)),
    ("gemma2", dict(layer_types=None)),  # transformers' default: sliding at even layers
    ("gemma2", dict(layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"])),
    ("gemma2", dict(num_key_value_heads=1, hidden_activation="gelu")),  # exact GELU when a config asks for it
    ("gemma3", dict(layer_types=None, num_hidden_layers=7)),  # pattern 6: layers 5 full
    ("gemma3", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    ("gemma3", dict(final_logit_softcapping=2.0, attn_logit_softcapping=1.0)),  # attn cap ignored
    ("gemma3", dict(tie_word_embeddings=False, attention_bias=True)),
    ("gemma3", dict(use_bidirectional_attention=True)),
    ("gemma3", dict(num_key_value_heads=1, query_pre_attn_scalar=16)),
    ("stablelm", dict(partial_rotary_factor=0.5)),
    ("stablelm", dict(use_qkv_bias=True)),
    ("stablelm", dict(qk_layernorm=True, num_key_value_heads=4)),
    ("stablelm", dict(use_parallel_residual=True)),
    ("stablelm", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    ("stablelm", dict(hidden_act="gelu_pytorch_tanh", rope_parameters={"rope_theta": 100.0,
                                                                         "partial_rotary_factor": 1.0})),
]


@pytest.mark.parametrize("family,overrides", SWITCHES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={v[k]}" for k in v)[:60])
def test_switch(family, overrides, tmp_path):
    hf = hf_model(family, **overrides)
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(2, int(2.5 * WINDOW))
    ids[1, :3] = 0  # some pads, unmasked: they are ordinary tokens here
    assert max_diff(np.array(model(mx.array(ids))), hf_logits(hf, ids)) <= TOL
    if not overrides.get("use_bidirectional_attention"):
        cache = model.make_cache()
        steps = [np.array(model(mx.array(ids[:, :4]), cache=cache))]
        steps += [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(4, ids.shape[1])]
        assert max_diff(np.concatenate(steps, 1), hf_logits(hf, ids)) <= TOL


def _rewrite_config(path, drop=(), **add):
    config = json.loads((path / "config.json").read_text())
    for k in drop:
        config.pop(k, None)
    config.update(add)
    (path / "config.json").write_text(json.dumps(config))


LEGACY = [
    ("gemma", dict(rope_theta=321.0)),
    ("gemma2", dict(rope_theta=77.0, rope_scaling={"type": "linear", "factor": 2.0})),
    ("gemma3", dict(rope_theta=5e5, rope_local_base_freq=333.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                    sliding_window_pattern=2)),
    ("stablelm", dict(rope_theta=99.0, partial_rotary_factor=0.5)),
]


@pytest.mark.parametrize("family,legacy", LEGACY, ids=[f for f, _ in LEGACY])
def test_legacy_config_keys(family, legacy, tmp_path):
    """A config.json with the pre-rope_parameters keys loads as transformers loads it."""
    hf = hf_model(family, layer_types=None) if family != "stablelm" else hf_model(family)
    path = tmp_path / "ckpt"
    hf.save_pretrained(path)
    _rewrite_config(path, drop=("rope_parameters", "layer_types"), **legacy)
    import mlxgemma

    model = mlxgemma.load_model(path)
    ref = type(hf).from_pretrained(path, attn_implementation="eager").eval()
    if family == "gemma3":  # the legacy pattern really was read: layer 1 and 3 are full
        assert model.model.config.layer_types == ref.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids = random_ids(2, int(2.5 * WINDOW))
    assert max_diff(np.array(model(mx.array(ids))), hf_logits(ref, ids)) <= TOL


def test_bidirectional_window_written_back(tmp_path):
    """EmbeddingGemma configs store the full window; it is halved once on read, never twice."""
    hf = hf_model("gemma3", use_bidirectional_attention=True, sliding_window=6)
    model, path = save_and_load(hf, tmp_path)
    assert json.loads((path / "config.json").read_text())["sliding_window"] == 6
    assert model.config.sliding_window == hf.config.sliding_window == 4


def test_gemma3_multimodal_checkpoint_text_part(tmp_path):
    """A model_type gemma3 checkpoint (vision tower + projector + language model) runs as its text model."""
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94,
                                       attn_implementation="eager")
    from reference import randomize

    hf = randomize(transformers.Gemma3ForConditionalGeneration(config))
    model, _ = save_and_load(hf, tmp_path)
    ids = random_ids(1, 10, high=90)
    assert max_diff(np.array(model(mx.array(ids))), hf_logits(hf, ids)) <= TOL

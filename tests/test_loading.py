"""The loader: sharded checkpoints, strictness, and one clear line for each kind of bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import mlxgemma
from mlxgemma import MlxGemmaError
from reference import TOL, hf_logits, hf_model, max_diff, random_ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = hf_model("gemma3")
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    hf.save_pretrained(path)
    return hf, path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (path / "config.json").write_text(json.dumps(config))


def _error(fn, match):
    with pytest.raises(MlxGemmaError, match=match) as e:
        fn()
    assert "\n" not in str(e.value), "errors are one line"
    return str(e.value)


def test_sharded_checkpoint(tmp_path):
    hf = hf_model("gemma2")
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ids = random_ids(1, 9)
    assert max_diff(np.array(mlxgemma.load_model(path)(mx.array(ids))), hf_logits(hf, ids)) <= TOL


def test_compute_dtype_by_backend(ckpt, tmp_path):
    """auto: float32 on MLX's CPU backend (a bf16 checkpoint is upcast, quantization scales included), the
    stored dtype on a GPU; None keeps what is stored; a name forces it."""
    from mlxgemma.checkpoints.loading import compute_dtype

    path = tmp_path / "bf16"
    mlxgemma.convert(ckpt[1], path, dtype="bfloat16")
    cpu = mx.default_device() == mx.cpu
    assert compute_dtype("auto") == ("float32" if cpu else None) and compute_dtype("bfloat16") == "bfloat16"
    auto = mlxgemma.load_model(path).model.embed_tokens.weight.dtype
    assert auto == (mx.float32 if cpu else mx.bfloat16)
    assert mlxgemma.load_model(path, dtype=None).model.embed_tokens.weight.dtype == mx.bfloat16
    quantized = tmp_path / "q"
    mlxgemma.convert(path, quantized, quantize=True, q_group_size=32)
    scales = mlxgemma.load_model(quantized).model.layers[0].self_attn.q_proj.scales.dtype
    assert scales == (mx.float32 if cpu else mx.bfloat16)


def test_dtype_cast(ckpt):
    model = mlxgemma.load_model(ckpt[1], dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    _error(lambda: mlxgemma.load_model(ckpt[1], dtype="int8"), "dtype 'int8' is not one of")


def test_missing_required_fields(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    _edit_config(path, hidden_size=None, num_hidden_layers=None)
    _error(lambda: mlxgemma.load_model(path), "missing required field\\(s\\) hidden_size, num_hidden_layers")


def test_unknown_model_type(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    _edit_config(path, model_type="llama")
    msg = _error(lambda: mlxgemma.load_model(path), "model_type 'llama'")
    assert "gemma2" in msg and "stablelm" in msg


def test_unknown_architecture(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    _edit_config(path, architectures=["Gemma3ForQuestionAnswering"])
    _error(lambda: mlxgemma.load_model(path), "architecture 'Gemma3ForQuestionAnswering'")


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                         "sliding_attention": {"rope_type": "default"}}, "rope_parameters.full_attention.rope_type 'yarn'"),
    ("hidden_activation", "swish", "hidden_activation 'swish' is not supported"),
    ("layer_types", ["sliding_attention"], "layer_types has 1 entries but num_hidden_layers is 4"),
    ("layer_types", ["chunked_attention"] * 4, "unsupported type"),
    ("hidden_size", "32", "field hidden_size is '32', expected an integer"),
])
def test_unsupported_config_values(ckpt, tmp_path, field, value, match):
    path = _copy(ckpt[1], tmp_path / "c")
    _edit_config(path, **{field: value})
    _error(lambda: mlxgemma.load_model(path), match)


def test_weights_that_disagree_with_config(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    _edit_config(path, intermediate_size=40)
    _error(lambda: mlxgemma.load_model(path), "wrong shape: model.layers.0.mlp.down_proj.weight \\(32, 48\\) "
                                              "\\(config says \\(32, 40\\)\\)")


def test_missing_and_unexpected_weights(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    weights = dict(mx.load(str(path / "model.safetensors")))
    del weights["model.layers.1.self_attn.q_norm.weight"]
    weights["model.layers.1.extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    _error(lambda: mlxgemma.load_model(path), "missing: model.layers.1.self_attn.q_norm.weight; "
                                              "unexpected: model.layers.1.extra.weight")


def test_truncated_safetensors(ckpt, tmp_path):
    path = _copy(ckpt[1], tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _error(lambda: mlxgemma.load_model(path), "model.safetensors: tensor .* the file is truncated or its header lies")


def test_index_names_absent_shard(tmp_path):
    path = tmp_path / "sharded"
    hf_model("gemma").save_pretrained(path, max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _error(lambda: mlxgemma.load_model(path), f"names shard\\(s\\) that are not in .*{shard.name}")


def test_pickle_weights_refused(ckpt, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((ckpt[1] / "config.json").read_text())
    torch.save({"x": torch.zeros(2)}, path / "pytorch_model.bin")
    _error(lambda: mlxgemma.load_model(path), "never unpickles")


def test_missing_path_and_config(tmp_path):
    missing = tmp_path / "nope"
    assert _error(lambda: mlxgemma.load_model(missing), "no such") == f"no such file or directory: {missing}"
    _error(lambda: mlxgemma.load_model("nope"), "'nope' is neither a local directory, a .gguf file nor a Hub repo id")
    _error(lambda: mlxgemma.load_model(tmp_path), "config.json not found")
    (tmp_path / "config.json").write_text("{not json")
    _error(lambda: mlxgemma.load_model(tmp_path), "is not valid JSON")


@pytest.mark.parametrize("source", ["./nothing-here", "./typo.gguf", "../nothing/here", "/no/such/model",
                                    "~/no-such-model", "typo.gguf", "model.safetensors", "no/such/model"])
def test_missing_local_path_is_one_line(source, tmp_path, monkeypatch):
    """A source that looks local (./, ../, /, ~, .gguf, .safetensors, more than org/name's one slash) and is
    not there: one line, not a Hub download of a repo id "./x" would pass for, ending in a traceback."""
    import huggingface_hub

    from mlxgemma.checkpoints.loading import looks_local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the Hub"))
    assert looks_local(source) and not looks_local("google/gemma-3-270m") and not looks_local("gemma")
    for load in (mlxgemma.load, mlxgemma.load_model):
        assert _error(lambda: load(source), "no such file") == f"no such file or directory: {source}"


def test_bad_token_ids(ckpt):
    model = mlxgemma.load_model(ckpt[1])
    _error(lambda: model(mx.array([[5, 96, 7]])), "token id 96 is outside the vocabulary \\(0..95\\)")
    _error(lambda: model([[-1]]), "token id -1 is outside")
    _error(lambda: model(mx.zeros((1, 0), dtype=mx.int32)), "input_ids is empty")
    _error(lambda: model(mx.array([[1.0, 2.0]])), "integer token ids")
    _error(lambda: model(mx.array([[1, 2]]), attention_mask=mx.ones((1, 1))), "attention_mask has shape")


def test_bfloat16_embedding_scale_and_norm():
    """sqrt(D) is rounded to bf16 before the multiply (D=40: 6.3125, not 6.3246), as transformers does;
    the Gemma RMSNorm runs in float32 and rounds once at the end."""
    from mlxgemma.models.common import RMSNorm, scaled_embedding
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    ref = Gemma3TextScaledWordEmbedding(50, 40, 0, embed_scale=40**0.5).to(torch.bfloat16)
    ours = nn.Embedding(50, 40)
    ours.weight = mx.array(ref.weight.detach().float().numpy()).astype(mx.bfloat16)
    ids = np.arange(50)[None]
    out = scaled_embedding(ours, mx.array(ids), 40)
    expected = ref(torch.tensor(ids)).detach().float().numpy()
    assert np.array_equal(np.array(out.astype(mx.float32)), expected)

    norm_ref = Gemma3RMSNorm(40).to(torch.bfloat16)
    with torch.no_grad():
        norm_ref.weight.copy_(torch.randn(40))
    norm = RMSNorm(40)
    norm.weight = mx.array(norm_ref.weight.detach().float().numpy()).astype(mx.bfloat16)
    x = torch.randn(3, 40).to(torch.bfloat16) * 4
    got = np.array(norm(mx.array(x.float().numpy()).astype(mx.bfloat16)).astype(mx.float32))
    want = norm_ref(x).detach().float().numpy()
    ulp = np.abs(want) * 2.0**-7  # one bf16 ulp at most: both compute in fp32 and round once
    assert np.all(np.abs(got - want) <= ulp)

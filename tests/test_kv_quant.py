"""KV-cache quantization (--kv-bits): attention on quantized keys and values equals attention on their
dequantized values; every family and cache kind past the window, at 4 and 8 bits, equals a float model whose
caches hold the same dequantized values (fake quantization), through generation; its error against the float
cache is measured; bytes as expected; T5Gemma 2's decoder (self and cross), speculative decoding and cache files
with it; bad options."""

import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.checkpoints import cache_file
from mlxgemma.errors import MlxGemmaError
from mlxgemma.models import cache as cache_module
from mlxgemma.models.common import attention
from mlxgemma.models.quantized_cache import quantize
from reference import WINDOW, hf_model, hf_t5gemma2, save_checkpoint, save_t5_checkpoint

GROUP = 32  # head_dim 32 below (the tiny models' 16 is under MLX's smallest group)
STEPS = 3 * WINDOW


def _fake(bits):
    from mlxgemma.models.quantized_cache import key_bits

    def encode(self, x, key=False):
        b = key_bits(bits) if key else bits  # at 4 bits the keys keep 8 (quantized_cache.KEY_BITS)
        return mx.dequantize(*mx.quantize(x, group_size=GROUP, bits=b), group_size=GROUP, bits=b)
    return encode


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", ["causal", "window", "padded", "softcap", "none"])
def test_attention_on_quantized_keys(bits, case):
    rng = np.random.default_rng(0)
    B, H, n_kv, L, S, d = 2, 4, 2, 3, 9, 32
    q = mx.array(rng.standard_normal((B, H, L, d)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((B, n_kv, S, d)).astype(np.float32)) for _ in range(2))
    from mlxgemma.models.quantized_cache import key_bits

    kb = key_bits(bits)  # at 4 bits the keys keep 8: keys and values of different widths
    qk, qv = quantize(k, GROUP, kb), quantize(v, GROUP, bits)
    dk, dv = mx.dequantize(*qk, group_size=GROUP, bits=kb), mx.dequantize(*qv, group_size=GROUP, bits=bits)
    mask = {"causal": "causal", "none": None, "softcap": "causal",
            "window": cache_module.causal_mask(S - L, L, 0, S, 4),
            "padded": cache_module.causal_mask(S - L, L, 0, S, None, mx.array(rng.random((B, S)) > 0.3))}[case]
    softcap = 5.0 if case == "softcap" else None
    ref = attention(q, dk, dv, 0.25, mask, softcap)
    assert np.max(np.abs(np.array(attention(q, qk, qv, 0.25, mask, softcap)) - np.array(ref))) <= 1e-5


FAMILIES = {"gemma": dict(head_dim=32), "gemma2": dict(head_dim=32), "gemma3": dict(head_dim=32),
            "stablelm": dict(hidden_size=128)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvq")
    return {f: save_checkpoint(hf_model(f, **kw), root / f) for f, kw in FAMILIES.items()}


def _run(model, tok, prompt, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, prompt, max_tokens=STEPS, **kw))
    return [c.token for c in chunks], np.array([c.logprob for c in chunks])


PROMPT = [2] + list(range(10, 10 + 2 * WINDOW))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [4, 8])
def test_every_family_past_the_window(ckpts, family, bits, monkeypatch):
    model, tok = mlxgemma.load(ckpts[family])
    float_run = _run(model, tok, PROMPT)
    for start in (0, WINDOW + 3):  # quantized from the start, or from a point past the first window
        quantized = _run(model, tok, PROMPT, kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=start)
        with monkeypatch.context() as m:  # the same values, dequantized, in float caches
            for cls in (cache_module.KVCache, cache_module.RotatingKVCache):
                m.setattr(cls, "to_quantized", lambda self, group_size, bits: _FakeSwitch(self, bits))
            fake = _run(model, tok, PROMPT, kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=start)
        assert quantized[0] == fake[0] and np.max(np.abs(quantized[1] - fake[1])) <= 1e-4
    assert len(float_run[0]) == len(quantized[0])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_error_against_the_float_cache(ckpts, family):
    """Teacher-forced over 3 windows: 8 bits stay close to the float cache, 4 bits further (measured on these
    random tiny models, max |Δ logit|: 8 bits 0.004-0.046, 4 bits (8-bit keys) 0.05-0.77; logits of magnitude 2-4)."""
    from mlxgemma.models.quantized_cache import quantize_cache

    model = mlxgemma.load_model(ckpts[family])
    ids = np.random.default_rng(0).integers(3, 96, (1, 4 * WINDOW))
    errors = {}
    for bits in (8, 4):
        ref, q = model.make_cache(), model.make_cache()
        model(mx.array(ids[:, :5]), cache=ref)
        model(mx.array(ids[:, :5]), cache=q)
        quantize_cache(q, 0, GROUP, bits)
        errors[bits] = max(np.max(np.abs(np.array(model(mx.array(ids[:, t:t + 1]), cache=ref))
                                         - np.array(model(mx.array(ids[:, t:t + 1]), cache=q))))
                           for t in range(5, ids.shape[1]))
    assert errors[8] <= 0.06 and errors[8] < errors[4] / 4 and errors[4] <= 2.0


def _FakeSwitch(cache, bits):
    """to_quantized's stand-in: the cache stays float, its held and future keys fake-quantized."""
    encode = _fake(bits)
    if cache.keys is not None:
        cache.keys, cache.values = encode(cache, cache.keys, True), encode(cache, cache.values)
    cache.encode = encode.__get__(cache)
    cache.to_quantized = lambda group_size, bits: cache
    return cache


def test_bytes(ckpts):
    model = mlxgemma.load_model(ckpts["gemma"])
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    from mlxgemma.models.quantized_cache import quantize_cache

    float_bytes = sum(c.keys[..., : c.offset, :].nbytes * 2 for c in cache)
    quantize_cache(cache, 0, GROUP, 4)
    # per key 8 bits, per value 4 (KEY_BITS), each plus a float32 scale and bias per group of 32
    expected = float_bytes / 2 * (8 / 32 + 2 / GROUP) + float_bytes / 2 * (4 / 32 + 2 / GROUP)
    assert sum(sum(p[..., : c.offset, :].nbytes for p in c.keys + c.values) for c in cache) == expected


def test_t5gemma2_decoder_self_and_cross(tmp_path, monkeypatch):
    from PIL import Image

    path = save_t5_checkpoint(hf_t5gemma2(text={"head_dim": 32}), tmp_path / "t5")
    model, processor = mlxgemma.load(path)
    image = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    quantized = _run(model, processor, " t5 t6", image=image, kv_bits=8, kv_group_size=GROUP, quantized_kv_start=0)
    plain = _run(model, processor, " t5 t6", image=image)
    assert np.max(np.abs(quantized[1] - plain[1])) <= 0.05
    from mlxgemma.models.encoder_decoder_cache import EncoderDecoderCache

    seen = []
    real = EncoderDecoderCache.quantized_cross
    monkeypatch.setattr(EncoderDecoderCache, "quantized_cross", lambda self: seen.append(real(self)) or seen[-1])
    _run(model, processor, " t5 t6", image=image, kv_bits=8, kv_group_size=GROUP, quantized_kv_start=0)
    assert isinstance(seen[-1][0][0], tuple)  # the cross keys are read quantized


def test_with_speculation_and_cache_files(ckpts, tmp_path):
    model, tok = mlxgemma.load(ckpts["gemma2"])
    options = dict(kv_bits=8, kv_group_size=GROUP, quantized_kv_start=0)
    plain = _run(model, tok, PROMPT, **options)
    spec = _run(model, tok, PROMPT, prompt_lookup_ngram=1, **options)
    assert spec[0] == plain[0] and np.max(np.abs(spec[1] - plain[1])) <= 1e-4
    from mlxgemma.decode.decoder import fill
    from mlxgemma.models.quantized_cache import quantize_cache

    cache = model.make_cache()
    fill(model, cache, PROMPT)
    quantize_cache(cache, 0, GROUP, 8)
    f = cache_file.save(tmp_path / "q.safetensors", model, cache, PROMPT)
    restored, held = cache_file.load(f, model)
    assert [type(c).__name__ for c in restored] == [type(c).__name__ for c in cache]
    more = [40, 41]
    resumed = _run(model, tok, more, prompt_cache=restored, history=held, **options)
    fresh = model.make_cache()
    fill(model, fresh, PROMPT)
    quantize_cache(fresh, 0, GROUP, 8)
    again = _run(model, tok, more, prompt_cache=fresh, history=held, **options)
    assert resumed[0] == again[0] and np.max(np.abs(resumed[1] - again[1])) == 0


def test_bad_options(ckpts, capsys):
    from mlxgemma.generate import main

    model, tok = mlxgemma.load(ckpts["gemma2"])
    with pytest.raises(MlxGemmaError, match="kv-bits must be 4 or 8"):
        _run(model, tok, PROMPT, kv_bits=3)
    with pytest.raises(MlxGemmaError, match="kv-group-size must be"):
        _run(model, tok, PROMPT, kv_bits=4, kv_group_size=48)
    tiny, tiny_tok = mlxgemma.load(save_checkpoint(hf_model("gemma3"), ckpts["gemma"].parent / "tiny"))
    with pytest.raises(MlxGemmaError, match="does not divide the head size 16"):
        _run(tiny, tiny_tok, PROMPT, kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    args = ["--model", str(ckpts["gemma2"]), "--prompt", "t10", "--ignore-chat-template", "-m", "3"]
    assert main(args + ["--quantized-kv-start", "-1", "--kv-bits", "8"]) == 2
    assert "quantized-kv-start" in capsys.readouterr().err
    assert main(args + ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"]) == 0

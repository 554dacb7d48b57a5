"""GGUF (llama.cpp) -> an MLX checkpoint in memory: HF config, MLX weights, tokenizer.

Several GGUF block formats are exactly MLX affine group quantization with groups of 32
(w = scale * code + bias): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 per 32-weight block, and Q4_K, Q5_K per 32-weight
sub-block (scale d * sc, bias -dmin * m). Those tensors are repacked code for code, not dequantized and
quantized a second time. Formats that do not map (Q6_K's 16-wide blocks, Q2_K, Q3_K, ...) are dequantized
with the gguf package and requantized at 8 bits, groups of 32, which loses less than they do.
Scales and biases are stored in float16, GGUF's own precision for d (the K-quant products d * sc round there).
Gemma 4's expert tensors (3-D, rows of blocks like any other) are repacked the same way, one MLX group row
per GGUF row, where mlxgemma's experts run quantized (gemma4_moe.QuantizedSwitchLinear); else dequantized.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from ..errors import MlxGemmaError
from ..models.config import FULL, MAX_LAYERS, SLIDING, of_type, pattern_layer_types

GROUP = 32
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
FLOATS = (T.F32, T.F16, T.BF16)
REQUANT_BITS = 8
ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}
_CLASS = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
          "gemma4": "Gemma4ForCausalLM"}
# llama.cpp block tensor name -> transformers name, per architecture (ffn_norm is Gemma v1's second norm).
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Gemma 4's own tensors, as llama.cpp's converter (conversion/gemma.py, Gemma4Model) names them: (name, suffix)
# -> the transformers name in full (layer_scalar, the router's scales and the experts have no ".weight").
_BLOCK4 = {
    ("pre_ffw_norm_2", "weight"): "pre_feedforward_layernorm_2.weight",
    ("post_ffw_norm_1", "weight"): "post_feedforward_layernorm_1.weight",
    ("post_ffw_norm_2", "weight"): "post_feedforward_layernorm_2.weight",
    ("inp_gate", "weight"): "per_layer_input_gate.weight", ("proj", "weight"): "per_layer_projection.weight",
    ("post_norm", "weight"): "post_per_layer_input_norm.weight", ("layer_output_scale", "weight"): "layer_scalar",
    ("ffn_gate_inp", "weight"): "router.proj.weight", ("ffn_gate_inp", "scale"): "router.scale",
    ("ffn_down_exps", "scale"): "router.per_expert_scale",
    ("ffn_gate_up_exps", "weight"): "experts.gate_up_proj", ("ffn_down_exps", "weight"): "experts.down_proj",
}
_TOP4 = {"per_layer_token_embd": "model.embed_tokens_per_layer",
         "per_layer_model_proj": "model.per_layer_model_projection",
         "per_layer_proj_norm": "model.per_layer_projection_norm"}
ROPE_FREQS = "rope_freqs.weight"  # Gemma 4: the full layers' proportional rope, read into the config


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the fifth bit of element j is bit j of a little-endian uint32."""
    return ((qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_groups(blocks, high):
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = gq.Q4_K.get_scale_min(blocks[:, 4:16])
    qs = blocks[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1, 8, 32)
    if high:  # Q5_K: 32 bytes of fifth bits, bit j of byte l for sub-block j
        qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        codes = codes | ((qh & 1) << 4)
    scale = d[:, None] * sc.astype(np.float32)
    bias = -(dmin[:, None] * m.astype(np.float32))
    return codes.reshape(-1, 32), scale.reshape(-1), bias.reshape(-1)


def exact_groups(qtype, blocks: np.ndarray):
    """(codes (n, 32) uint8, scale (n,), bias (n,)) with w = scale * code + bias, exactly GGUF's weights."""
    if qtype == T.Q4_0:
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 2:18]), d, -8 * d
    if qtype == T.Q4_1:
        return _nibbles(blocks[:, 4:20]), _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    if qtype == T.Q5_0:
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4), d, -16 * d
    if qtype == T.Q5_1:
        codes = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)
        return codes, _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    if qtype == T.Q8_0:
        d = _f16(blocks[:, 0:2])
        codes = (blocks[:, 2:34].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, d, -128 * d
    if qtype in (T.Q4_K, T.Q5_K):
        return _k_groups(blocks, high=qtype == T.Q5_K)
    raise AssertionError(qtype)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) into MLX's affine layout: a little-endian bit stream per row, as uint32."""
    out = []
    for start in range(0, codes.shape[0], 4096):  # bounded memory for the big embedding
        chunk = codes[start : start + 4096]
        stream = np.unpackbits(chunk[..., None], axis=-1, bitorder="little")[..., :bits]
        out.append(np.packbits(stream.reshape(chunk.shape[0], -1), axis=1, bitorder="little").view(np.uint32))
    return np.concatenate(out)


def _quantized_tensor(t, shape, dtype):
    """A 2-D GGUF tensor (or Gemma 4's 3-D experts, each row a run of blocks) -> (weight, scales, biases, bits)
    in MLX's layout."""
    *lead, cols = shape
    rows = int(np.prod(lead))
    if t.tensor_type in EXACT_BITS:
        bits = EXACT_BITS[t.tensor_type]
        blocks = np.asarray(t.data).reshape(-1, gq.GGML_QUANT_SIZES[t.tensor_type][1])
        codes, scale, bias = exact_groups(t.tensor_type, blocks)
        w = pack(codes.reshape(rows, cols), bits).reshape(*lead, -1)
        scales, biases = scale.reshape(*lead, cols // GROUP), bias.reshape(*lead, cols // GROUP)
        return mx.array(w), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype), bits
    dense = mx.array(_dequantized(t, shape))
    w, scales, biases = mx.quantize(dense, group_size=GROUP, bits=REQUANT_BITS)
    return w, scales.astype(dtype), biases.astype(dtype), REQUANT_BITS


def _quantized_experts() -> bool:
    """Whether mlxgemma's Gemma 4 experts can run quantized (gemma4_moe.QuantizedSwitchLinear, gather_qmm):
    then a GGUF's block-quantized experts are repacked as they are, else dequantized to float."""
    try:
        from ..models.gemma4_moe import QuantizedSwitchLinear  # noqa: F401
    except ImportError:
        return False
    return True


def _dequantized(t, shape) -> np.ndarray:
    """A tensor's values in float32 (floats as stored), by the gguf package's own dequantization."""
    try:
        return gq.dequantize(t.data, t.tensor_type).reshape(shape)
    except NotImplementedError:
        raise MlxGemmaError(f"GGUF tensor {t.name!r} has quant type {t.tensor_type.name}, which mlxgemma cannot "
                            "read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)") from None


def _hf_name(name: str, arch: str):
    """The transformers name of a GGUF tensor; None for one that is not a weight (Gemma 4's rope_freqs)."""
    parts = name.split(".")
    if arch == "gemma4":
        if name == ROPE_FREQS:
            return None
        if parts[0] == "blk" and len(parts) == 4 and (parts[2], parts[3]) in _BLOCK4:
            return f"model.layers.{parts[1]}.{_BLOCK4[parts[2], parts[3]]}"
        if len(parts) == 2 and parts[0] in _TOP4:
            return f"{_TOP4[parts[0]]}.{parts[1]}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK:
        target = _BLOCK[parts[2]]
        if arch == "gemma" and parts[2] == "ffn_norm":
            target = "post_attention_layernorm"
        return f"model.layers.{parts[1]}.{target}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    raise MlxGemmaError(f"GGUF tensor {name!r} has no place in a {arch} model")


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise MlxGemmaError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0]})") from None


def field(reader: GGUFReader, key: str, default=None, kind=None):
    """A metadata value; with kind (int, float, str, list) it must be of that type: one clear error if not."""
    f = reader.fields.get(key)
    try:
        value = default if f is None else f.contents()
    except Exception:  # the gguf package decodes lazily: a malformed value fails here
        raise MlxGemmaError(f"GGUF metadata {key} is malformed") from None
    if kind is not None and value is not None and not of_type(value, kind):
        raise MlxGemmaError(f"GGUF metadata {key} is {str(value)[:40]!r}, expected {kind.__name__}")
    return value


def required(reader: GGUFReader, key: str, kind=int):
    value = field(reader, key, kind=kind)
    if value is None:
        raise MlxGemmaError(f"GGUF metadata {key} is missing: the file does not describe a complete model")
    return value


def read_weights(reader: GGUFReader, arch: str, dtype=mx.float16, progress=None):
    """MLX weights and the per-layer quantization block for them."""
    weights, quantization = {}, {"group_size": GROUP, "bits": 4, "mode": "affine"}
    quantized_experts = arch == "gemma4" and _quantized_experts()
    for t in reader.tensors:
        name = _hf_name(t.name, arch)
        if name is None:
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        experts = arch == "gemma4" and len(shape) == 3  # named as the module: experts.gate_up_proj, down_proj
        if t.tensor_type not in FLOATS and (len(shape) == 2 or (experts and quantized_experts)):
            w, s, b, bits = _quantized_tensor(t, shape, dtype)
            prefix = name if experts else name.rsplit(".", 1)[0]
            weights.update({f"{prefix}.weight": w, f"{prefix}.scales": s, f"{prefix}.biases": b})
            quantization[prefix] = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        elif t.tensor_type in FLOATS or experts:
            value = _dequantized(t, shape)
            if t.name.endswith("norm.weight") and arch != "gemma4":  # llama.cpp stores Gemma 1-3 norms as 1 + w
                value = value - 1.0
            weights[name] = mx.array(value).astype(mx.float32 if value.ndim == 1 else dtype)
        else:
            raise MlxGemmaError(f"GGUF tensor {t.name!r} is quantized ({t.tensor_type.name}) but not 2-D")
        if progress is not None:
            progress.update(1)
    return weights, quantization


def read_config(reader: GGUFReader) -> dict:
    arch = field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise MlxGemmaError(f"GGUF architecture {str(arch)[:40]!r} is not supported (supported: "
                            f"{', '.join(ARCHITECTURES)})")
    if arch == "gemma4":
        return gemma4_config(reader)
    g = lambda key, default=None, kind=int: field(reader, f"{arch}.{key}", default, kind)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads, hidden, layers = (required(reader, f"{arch}.{k}") for k in
                             ("attention.head_count", "embedding_length", "block_count"))
    if heads <= 0 or hidden <= 0:
        raise MlxGemmaError(f"GGUF metadata: {arch}.attention.head_count and embedding_length must be positive")
    head_dim = g("attention.key_length", hidden // heads)
    # llama.cpp scales queries by hidden/heads for the 27B Gemma 2 (46 layers) and Gemma 3 (62), else head_dim.
    qpas = hidden // heads if (arch, layers) in (("gemma2", 46), ("gemma3", 62)) else head_dim
    config = {
        "model_type": ARCHITECTURES[arch], "architectures": [_CLASS[arch]],
        "vocab_size": len(required(reader, "tokenizer.ggml.tokens", list)), "hidden_size": hidden,
        "intermediate_size": required(reader, f"{arch}.feed_forward_length"), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": head_dim, "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": g("context_length", 8192), "rope_theta": g("rope.freq_base", 10000.0, float),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id", 0),
    }
    if arch in ("gemma2", "gemma3"):
        config.update(query_pre_attn_scalar=qpas, sliding_window=g("attention.sliding_window", 4096))
    if arch == "gemma2":
        config.update(attn_logit_softcapping=g("attn_logit_softcapping", 50.0, float),
                      final_logit_softcapping=g("final_logit_softcapping", 30.0, float))
    if arch == "gemma3":  # llama.cpp fixes these for Gemma 3: local theta 1e4, five sliding layers to one full
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
        if g("rope.scaling.type", kind=str) == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor", kind=float)}
    return config


def _per_type(value, layer_types: list, key: str) -> dict:
    """A metadata value given once or per layer (a list) -> one value per layer type."""
    if isinstance(value, list):
        if len(value) != len(layer_types) or not all(of_type(v, int) for v in value):
            raise MlxGemmaError(f"GGUF metadata {key} is {str(value)[:40]!r}, expected one integer per layer "
                                f"({len(layer_types)})")
        per_type = {t: sorted({v for v, u in zip(value, layer_types) if u == t}) for t in set(layer_types)}
        mixed = [t for t, vs in per_type.items() if len(vs) > 1]
        if mixed:
            raise MlxGemmaError(f"GGUF metadata {key} differs between {mixed[0]} layers; Gemma 4 takes one value "
                                "per layer type")
        return {t: vs[0] for t, vs in per_type.items()}
    if not of_type(value, int):
        raise MlxGemmaError(f"GGUF metadata {key} is {str(value)[:40]!r}, expected an integer or a list of them")
    return {t: value for t in set(layer_types)}


def _ffn_lengths(value, layers: int, first_shared: int, key: str):
    """feed_forward_length: one size, or per layer as llama.cpp writes use_double_wide_mlp (twice the size on
    the KV-shared layers) -> (intermediate_size, use_double_wide_mlp)."""
    if of_type(value, int):
        return value, False
    if isinstance(value, list) and len(value) == layers and value and all(of_type(v, int) for v in value):
        n = value[0]
        if value == [n] * layers:
            return n, False
        if value == [n] * first_shared + [2 * n] * (layers - first_shared):
            return n, True
    raise MlxGemmaError(f"GGUF metadata {key} is {str(value)[:60]!r}: Gemma 4 takes one MLP size, doubled on the "
                        "KV-shared layers only with use_double_wide_mlp")


def _rotated_fraction(reader: GGUFReader, head_dim: int) -> float:
    """Gemma 4's full layers rotate the first partial_rotary_factor of their frequency pairs ("proportional"):
    llama.cpp writes that as rope_freqs, a factor per pair, 1 for the rotated ones and 1e30 (no rotation) for
    the rest (Gemma4Model.generate_extra_tensors). No rope_freqs: every pair rotates."""
    t = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if t is None:
        return 1.0
    values = _dequantized(t, (-1,)).astype(np.float64)
    n = int(np.argmax(values != 1.0)) if np.any(values != 1.0) else len(values)
    if len(values) != head_dim // 2 or not np.all(values[n:] >= 1e20) or n == 0:
        raise MlxGemmaError(f"GGUF tensor {ROPE_FREQS} is not llama.cpp's proportional rope for {head_dim}-wide heads "
                            f"({head_dim // 2} factors: 1 for each rotated pair, then 1e30): mlxgemma cannot apply it")
    fraction = 2 * n / head_dim
    if int(fraction * head_dim // 2) != n:
        raise MlxGemmaError(f"GGUF tensor {ROPE_FREQS}: rotating {n} of {head_dim // 2} pairs is not a fraction "
                            "transformers' Gemma 4 rope reproduces")
    return fraction


def gemma4_config(reader: GGUFReader) -> dict:
    """Gemma 4 (text) as llama.cpp's converter describes it (conversion/gemma.py, Gemma4Model, on top of
    Gemma3Model and TextModel): head sizes per layer type (key_length for full layers, key_length_swa for
    sliding ones), a sliding_window_pattern of booleans, head_count_kv and feed_forward_length as a number or
    per layer, shared_kv_layers, embedding_length_per_layer_input, expert_* for the MoE, rope freq_base and
    freq_base_swa, rope_freqs for the proportional rope. What it leaves out is read off the tensors: keys as
    values (full layers without attn_v), attention biases, the vocabulary sizes."""
    a = "gemma4"
    g = lambda key, default=None, kind=int: field(reader, f"{a}.{key}", default, kind)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    tokens = required(reader, "tokenizer.ggml.tokens", list)
    heads, hidden, layers = (required(reader, f"{a}.{k}") for k in ("attention.head_count", "embedding_length",
                                                                      "block_count"))
    if heads <= 0 or hidden <= 0 or not 0 < layers <= MAX_LAYERS:
        raise MlxGemmaError(f"GGUF metadata: {a}.attention.head_count, embedding_length and block_count must be "
                            f"positive (and at most {MAX_LAYERS} layers)")
    full_dim = required(reader, f"{a}.attention.key_length")
    head_dim = g("attention.key_length_swa", full_dim)
    for key, expect in (("attention.value_length", full_dim), ("attention.value_length_swa", head_dim)):
        if g(key, expect) != expect:
            raise MlxGemmaError(f"GGUF metadata {a}.{key} differs from the key size: Gemma 4's values are as wide "
                                "as its keys")
    pattern = g("attention.sliding_window_pattern", kind=None)
    if isinstance(pattern, list) and len(pattern) == layers and all(isinstance(p, bool) for p in pattern):
        layer_types = [SLIDING if p else FULL for p in pattern]
    elif of_type(pattern, int) and pattern > 0:  # llama.cpp's int form: every pattern-th layer is full
        layer_types = pattern_layer_types(layers, pattern)
    else:
        raise MlxGemmaError(f"GGUF metadata {a}.attention.sliding_window_pattern is {str(pattern)[:40]!r}, expected "
                            f"one boolean per layer ({layers}; true for sliding-window layers)")
    kv = _per_type(g("attention.head_count_kv", heads, kind=None), layer_types, f"{a}.attention.head_count_kv")
    shared = g("attention.shared_kv_layers", 0)
    if not 0 <= shared < layers:
        raise MlxGemmaError(f"GGUF metadata {a}.attention.shared_kv_layers is {shared}, expected 0..{layers - 1}")
    first = layers - shared
    intermediate, wide = _ffn_lengths(required(reader, f"{a}.feed_forward_length", kind=None), layers, first,
                                      f"{a}.feed_forward_length")
    scaling = g("rope.scaling.type", kind=str)
    if scaling not in (None, "none"):
        raise MlxGemmaError(f"GGUF metadata {a}.rope.scaling.type is {scaling!r}: Gemma 4 imports with no rope scaling")
    for key, dim, what in (("rope.dimension_count", full_dim, "full"), ("rope.dimension_count_swa", head_dim,
                                                                        "sliding")):
        if g(key, dim) != dim:
            raise MlxGemmaError(f"GGUF metadata {a}.{key} is {g(key)}: the {what} layers rotate part of their "
                                f"{dim}-wide heads, which transformers' Gemma 4 rope does not do")
    # Keys as values (attention_k_eq_v): the full layers that compute keys have no attn_v.
    owners = [i for i in range(first) if layer_types[i] == FULL]
    no_v = {f"blk.{i}.attn_v.weight" not in tensors for i in owners}
    if len(no_v) > 1:
        raise MlxGemmaError("GGUF: some full-attention layers have attn_v and some do not (keys as values is all "
                            "full layers or none)")
    k_eq_v = no_v == {True}
    experts = g("expert_count", 0)
    moe = experts > 0 or any(n.endswith(".ffn_gate_up_exps.weight") for n in tensors)
    moe_keys = {k: g(k) for k in ("expert_count", "expert_used_count", "expert_feed_forward_length")}
    if moe and None in moe_keys.values():
        missing = ", ".join(f"{a}.{k}" for k, v in moe_keys.items() if v is None)
        raise MlxGemmaError(f"GGUF metadata {missing} missing: the file's mixture-of-experts is not described")
    embed = tensors.get("token_embd.weight")
    vocab = int(embed.shape[-1]) if embed is not None else len(tokens)
    per_layer = tensors.get("per_layer_token_embd.weight")
    rope_full = {"rope_type": "proportional", "partial_rotary_factor": _rotated_fraction(reader, full_dim),
                 "rope_theta": g("rope.freq_base", 1_000_000.0, float)}
    config = {
        "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv[SLIDING] if SLIDING in kv else kv[FULL],
        "head_dim": head_dim, "global_head_dim": full_dim, "layer_types": layer_types,
        "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": g("rope.freq_base_swa", 10_000.0, float)},
                            FULL: rope_full},
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": g("context_length", 131_072), "sliding_window": g("attention.sliding_window", 512),
        "final_logit_softcapping": g("final_logit_softcapping", kind=float),
        "hidden_activation": "gelu_pytorch_tanh",  # llama.cpp's Gemma 4 always runs GELU (tanh)
        "hidden_size_per_layer_input": g("embedding_length_per_layer_input", 0),
        "vocab_size_per_layer_input": int(per_layer.shape[-1]) if per_layer is not None else vocab,
        "num_kv_shared_layers": shared, "use_double_wide_mlp": wide, "attention_k_eq_v": k_eq_v,
        "attention_bias": "blk.0.attn_q.bias" in tensors, "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": eos_ids(reader, a), "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id", 0),
    }
    if moe:
        config.update(enable_moe_block=True, num_experts=moe_keys["expert_count"],
                      top_k_experts=moe_keys["expert_used_count"],
                      moe_intermediate_size=moe_keys["expert_feed_forward_length"])
    if field(reader, f"{a}.attention.causal", True, bool) is False:  # TextModel writes it from is_causal
        config["use_bidirectional_attention"] = "all"  # (sliding_window is config.json's: resolve halves it)
    if k_eq_v:
        config["num_global_key_value_heads"] = kv[FULL]
    elif FULL in kv and SLIDING in kv and kv[FULL] != kv[SLIDING]:  # own KV heads without k_eq_v: per layer
        config["per_layer_config"] = {str(i): {"head_dim": full_dim, "num_key_value_heads": kv[FULL]}
                                      for i, t in enumerate(layer_types) if t == FULL}
    return config


def build_tokenizer(reader: GGUFReader, arch: str):
    """transformers' GGUF tokenizer builder (Gemma's respelled spaces, merges rebuilt in file order, control
    tokens kept whole), fed from the gguf package's reader so that no torch is needed."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = required(reader, "tokenizer.ggml.tokens", list)
    ids = {k: field(reader, f"tokenizer.ggml.{k}", kind=int) for k in
           ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
    bad = [k for k, i in ids.items() if i is not None and not 0 <= i < len(tokens)]
    if bad:
        raise MlxGemmaError(f"GGUF metadata tokenizer.ggml.{bad[0]} is outside the token list")
    spec = {"tokenizer_type": required(reader, "tokenizer.ggml.model", str), "tokens": tokens,
            "scores": field(reader, "tokenizer.ggml.scores", kind=list),
            "token_type": field(reader, "tokenizer.ggml.token_type", kind=list),
            "add_prefix_space": field(reader, "tokenizer.ggml.add_space_prefix", False)}
    merges = field(reader, "tokenizer.ggml.merges", kind=list)
    if merges is not None:  # Gemma 4's files carry the merges of its tokenizer.json (Gemma 1-3's rebuild them)
        if not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges):
            raise MlxGemmaError("GGUF metadata tokenizer.ggml.merges holds entries that are not 'left right' pairs")
        spec["merges"] = merges
    try:
        backend, _ = convert_gguf_tokenizer(arch, spec)
    except Exception as e:  # transformers' builder on inconsistent metadata (scores, types, merges)
        raise MlxGemmaError(f"cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
    add_bos = field(reader, "tokenizer.ggml.add_bos_token", True)
    if arch == "gemma4":  # as transformers reads these files: Gemma 4's tokenizer adds no BOS (its chat template
        add_bos = False   # writes <bos>), though llama.cpp's converter sets the flag (ggml-org/llama.cpp#21500)
    bos = tokens[ids["bos_token_id"]] if ids["bos_token_id"] is not None else None
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos_token_id"])])
    named = {name: tokens[ids[key]] for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
             ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")) if ids[key] is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    # A file without a chat template gets none: it is (almost always) a pretrained model, which continues
    # text; wrapping its prompts in an invented Gemma chat format made the default model answer nonsense.
    template = field(reader, "tokenizer.chat_template", kind=str)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def eos_ids(reader: GGUFReader, arch: str = "") -> list:
    """End of text and end of turn (the file's eot id, else Gemma's <end_of_turn>), as Gemma chat ends turns.
    Gemma 4 ends turns with <turn|> and stops at <|tool_response>, as its generation_config says."""
    ids = [field(reader, "tokenizer.ggml.eos_token_id", kind=int), field(reader, "tokenizer.ggml.eot_token_id", kind=int)]
    tokens = reader.fields["tokenizer.ggml.tokens"]
    named = (b"<turn|>", b"<|tool_response>") if arch == "gemma4" else (b"<end_of_turn>",) if ids[1] is None else ()
    ids += [i for i, part in enumerate(tokens.data) if bytes(tokens.parts[part]) in named]
    return sorted({i for i in ids if i is not None})


def load_gguf(path: Path, dtype=mx.float16):
    """(config dict, MLX weights, tokenizer, eos ids) of a GGUF file, in memory."""
    reader = open_gguf(path)
    config = read_config(reader)
    arch = field(reader, "general.architecture")
    from tqdm import tqdm

    with tqdm(total=len(reader.tensors), desc=f"importing {Path(path).name}", unit="tensor", leave=False) as bar:
        weights, quantization = read_weights(reader, arch, dtype, bar)
    if len(quantization) > 3:
        config["quantization"] = config["quantization_config"] = quantization
    return config, weights, build_tokenizer(reader, arch), eos_ids(reader, arch)

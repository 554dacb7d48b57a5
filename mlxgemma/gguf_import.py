"""GGUF (llama.cpp) -> an MLX checkpoint in memory: HF config, MLX weights, tokenizer.

Several GGUF block formats are exactly MLX affine group quantization with groups of 32
(w = scale * code + bias): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 per 32-weight block, and Q4_K, Q5_K per 32-weight
sub-block (scale d * sc, bias -dmin * m). Those tensors are repacked code for code, not dequantized and
quantized a second time. Formats that do not map (Q6_K's 16-wide blocks, Q2_K, Q3_K, ...) are dequantized
with the gguf package and requantized at 8 bits, groups of 32, which loses less than they do.
Scales and biases are stored in float16, GGUF's own precision for d (the K-quant products d * sc round there).
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from .errors import MlxGemmaError
from .models.config import of_type

GROUP = 32
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
FLOATS = (T.F32, T.F16, T.BF16)
REQUANT_BITS = 8
ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_CLASS = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# llama.cpp block tensor name -> transformers name, per architecture (ffn_norm is Gemma v1's second norm).
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


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
    """A 2-D GGUF tensor -> (weight, scales, biases, bits) in MLX's layout."""
    rows, cols = shape
    if t.tensor_type in EXACT_BITS:
        bits = EXACT_BITS[t.tensor_type]
        blocks = np.asarray(t.data).reshape(-1, gq.GGML_QUANT_SIZES[t.tensor_type][1])
        codes, scale, bias = exact_groups(t.tensor_type, blocks)
        w = pack(codes.reshape(rows, cols), bits)
        scales, biases = scale.reshape(rows, cols // GROUP), bias.reshape(rows, cols // GROUP)
        return mx.array(w), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype), bits
    try:
        dense = mx.array(gq.dequantize(t.data, t.tensor_type).reshape(rows, cols))
    except NotImplementedError:
        raise MlxGemmaError(f"GGUF tensor {t.name!r} has quant type {t.tensor_type.name}, which mlxgemma cannot "
                            "read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)") from None
    w, scales, biases = mx.quantize(dense, group_size=GROUP, bits=REQUANT_BITS)
    return w, scales.astype(dtype), biases.astype(dtype), REQUANT_BITS


def _hf_name(name: str, arch: str) -> str:
    parts = name.split(".")
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
    for t in reader.tensors:
        name = _hf_name(t.name, arch)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if t.tensor_type not in FLOATS and len(shape) == 2:
            w, s, b, bits = _quantized_tensor(t, shape, dtype)
            prefix = name.rsplit(".", 1)[0]
            weights.update({name: w, f"{prefix}.scales": s, f"{prefix}.biases": b})
            quantization[prefix] = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        elif t.tensor_type in FLOATS:
            value = gq.dequantize(t.data, t.tensor_type).reshape(shape)
            if t.name.endswith("norm.weight"):  # llama.cpp stores Gemma norms as 1 + w
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
    try:
        backend, _ = convert_gguf_tokenizer(arch, spec)
    except Exception as e:  # transformers' builder on inconsistent metadata (scores, types, merges)
        raise MlxGemmaError(f"cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
    add_bos = field(reader, "tokenizer.ggml.add_bos_token", True)
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


def eos_ids(reader: GGUFReader) -> list:
    """End of text and end of turn (the file's eot id, else Gemma's <end_of_turn>), as Gemma chat ends turns."""
    ids = [field(reader, "tokenizer.ggml.eos_token_id", kind=int), field(reader, "tokenizer.ggml.eot_token_id", kind=int)]
    tokens = reader.fields["tokenizer.ggml.tokens"]
    if ids[1] is None:
        ids[1] = next((i for i, part in enumerate(tokens.data) if bytes(tokens.parts[part]) == b"<end_of_turn>"), None)
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
    return config, weights, build_tokenizer(reader, arch), eos_ids(reader)

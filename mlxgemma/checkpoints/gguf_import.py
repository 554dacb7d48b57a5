"""GGUF (llama.cpp) -> an MLX checkpoint in memory: HF config, MLX weights, tokenizer.

Several GGUF block formats are exactly MLX affine group quantization with groups of 32
(w = scale * code + bias): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 per 32-weight block, and Q4_K, Q5_K per 32-weight
sub-block (scale d * sc, bias -dmin * m). Those tensors are repacked code for code, not dequantized and
quantized a second time. Formats that do not map (Q6_K's 16-wide blocks, Q2_K, Q3_K, ...) are dequantized
with the gguf package and requantized at 8 bits, groups of 32, which loses less than they do.
Scales and biases are stored in float16, GGUF's own precision for d (the K-quant products d * sc round there).
Gemma 4's expert tensors (3-D, rows of blocks like any other) are repacked the same way, one MLX group row
per GGUF row, as mlxgemma's experts run quantized (gemma4_moe.QuantizedSwitchLinear).

What a family's files say is the family's own (its config class, registered by its llama.cpp architecture:
gguf_families): the config.json its metadata describes (from_gguf, reading through GGUFFile), its tensor names
(gguf_weight_name), how its norms are stored, its experts, its tokenizer's <bos> and stop tokens.
"""

import logging
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from ..errors import MlxGemmaError
from ..models import gguf_families
from ..models.config import of_type
from .gguf_layout import check_layout

GROUP = 32
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
FLOATS = (T.F32, T.F16, T.BF16)
REQUANT_BITS = 8


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


def _dequantized(t, shape) -> np.ndarray:
    """A tensor's values in float32 (floats as stored), by the gguf package's own dequantization."""
    try:
        return gq.dequantize(t.data, t.tensor_type).reshape(shape)
    except NotImplementedError:
        raise MlxGemmaError(f"GGUF tensor {t.name!r} has quant type {t.tensor_type.name}, which mlxgemma cannot "
                            "read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)") from None


def open_gguf(path: Path) -> GGUFReader:
    check_layout(path)  # counts the file cannot hold: one error, before the reader allocates for them
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


class GGUFFile:
    """What a family's from_gguf reads of a file: metadata values, each of the kind asked for or one clear
    error; the tensors by name, and their values; the ids that end generation."""

    def __init__(self, reader: GGUFReader, architecture: str):
        self.reader, self.architecture = reader, architecture
        self.tensors = {t.name: t for t in reader.tensors}

    def field(self, key: str, default=None, kind=None):
        return field(self.reader, key, default, kind)

    def required(self, key: str, kind=int):
        return required(self.reader, key, kind)

    def hparam(self, key: str, default=None, kind=int, required: bool = False):
        """The model's own metadata, {architecture}.{key} (llama.cpp's hyperparameters)."""
        key = f"{self.architecture}.{key}"
        return self.required(key, kind) if required else self.field(key, default, kind)

    def values(self, name: str) -> np.ndarray:
        return _dequantized(self.tensors[name], (-1,))

    def eos_ids(self) -> list:
        return eos_ids(self.reader)


def gguf_family(reader: GGUFReader):
    """(config class, model class) of the family that reads the file's architecture, or one clear error."""
    arch, families = field(reader, "general.architecture"), gguf_families()
    if not isinstance(arch, str) or arch not in families:
        raise MlxGemmaError(f"GGUF architecture {str(arch)[:40]!r} is not supported (supported: "
                            f"{', '.join(families)})")
    return families[arch]


def read_weights(reader: GGUFReader, family, dtype=mx.float16, progress=None):
    """MLX weights and the per-layer quantization block for them (family: the config class, gguf_family)."""
    weights, quantization = {}, {"group_size": GROUP, "bits": 4, "mode": "affine"}
    for t in reader.tensors:
        if t.name in family.gguf_config_tensors:
            continue
        name = family.gguf_weight_name(t.name)
        if name is None:
            raise MlxGemmaError(f"GGUF tensor {t.name!r} has no place in a {family.gguf_architecture} model")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        experts = family.gguf_experts and len(shape) == 3  # named as the module: experts.gate_up_proj, down_proj
        if t.tensor_type not in FLOATS and (len(shape) == 2 or experts):
            w, s, b, bits = _quantized_tensor(t, shape, dtype)
            prefix = name if experts else name.rsplit(".", 1)[0]
            weights.update({f"{prefix}.weight": w, f"{prefix}.scales": s, f"{prefix}.biases": b})
            quantization[prefix] = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        elif t.tensor_type in FLOATS:
            value = _dequantized(t, shape)
            if t.name.endswith("norm.weight") and family.gguf_norm_offset:
                value = value - family.gguf_norm_offset
            weights[name] = mx.array(value).astype(mx.float32 if value.ndim == 1 else dtype)
        else:
            raise MlxGemmaError(f"GGUF tensor {t.name!r} is quantized ({t.tensor_type.name}) but not 2-D")
        if progress is not None:
            progress.update(1)
    return weights, quantization


def read_config(reader: GGUFReader) -> dict:
    """The config.json the file's metadata describes, as its family reads it."""
    family, model_class = gguf_family(reader)
    config = family.from_gguf(GGUFFile(reader, family.gguf_architecture))
    return {"model_type": family.model_type, "architectures": [model_class.__name__], **config}


@contextmanager
def without_torch_notice():
    """Import transformers without the "PyTorch was not found" notice it logs on its first import: its
    tokenizers need no torch, and the notice landed inside the default model's first-run progress bar. (mlx-lm,
    where it imports transformers first, silences that notice too, by TRANSFORMERS_NO_ADVISORY_WARNINGS.) Only
    that message is dropped, and torch is never imported."""
    logger = logging.getLogger("transformers")

    def no_torch_notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")

    logger.addFilter(no_torch_notice)
    try:
        yield
    finally:
        logger.removeFilter(no_torch_notice)


def build_tokenizer(reader: GGUFReader):
    """transformers' GGUF tokenizer builder (Gemma's respelled spaces, merges rebuilt in file order, control
    tokens kept whole), fed from the gguf package's reader so that no torch is needed."""
    from tokenizers import processors

    with without_torch_notice():
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    family, _ = gguf_family(reader)
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
        backend, _ = convert_gguf_tokenizer(family.gguf_architecture, spec)
    except Exception as e:  # transformers' builder on inconsistent metadata (scores, types, merges)
        raise MlxGemmaError(f"cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
    add_bos = field(reader, "tokenizer.ggml.add_bos_token", True)
    if family.gguf_add_bos is not None:
        add_bos = family.gguf_add_bos
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
    """End of text and end of turn (the file's eot id), and the tokens its family also stops at (as its chat
    ends turns: gguf_stop_tokens)."""
    ids = [field(reader, "tokenizer.ggml.eos_token_id", kind=int), field(reader, "tokenizer.ggml.eot_token_id", kind=int)]
    tokens = reader.fields["tokenizer.ggml.tokens"]
    named = gguf_family(reader)[0].gguf_stop_tokens(has_eot=ids[1] is not None)
    ids += [i for i, part in enumerate(tokens.data) if bytes(tokens.parts[part]) in named]
    return sorted({i for i in ids if i is not None})


def load_gguf(path: Path, dtype=mx.float16):
    """(config dict, MLX weights, tokenizer, eos ids) of a GGUF file, in memory."""
    reader = open_gguf(path)
    config = read_config(reader)
    family, _ = gguf_family(reader)
    from tqdm import tqdm

    with tqdm(total=len(reader.tensors), desc=f"importing {Path(path).name}", unit="tensor", leave=False) as bar:
        weights, quantization = read_weights(reader, family, dtype, bar)
    if len(quantization) > 3:
        config["quantization"] = config["quantization_config"] = quantization
    return config, weights, build_tokenizer(reader), eos_ids(reader)

"""Sources -> an MLX model, strictly: every parameter the config implies must be in the weights with the
shape the config implies, and nothing else may be there.

A source is an HF-layout directory (transformers' safetensors), an MLX checkpoint (ours or mlx-lm's,
quantized or not), a Hub repo id (downloaded with huggingface_hub, which honours HF_HUB_OFFLINE and the HF
cache), or a .gguf file (imported in memory, see gguf_import)."""

import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxGemmaError
from ..files import MAX_JSON_BYTES, read_json, regular_file
from ..models import config_from_dict, model_class_for
from ..models.config import token_ids
from ..models.embedding import SentenceEmbedding
from .sentence_transformers import dense_weights, read_pipeline

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
def read_config(path: Union[str, Path]) -> dict:
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise MlxGemmaError(f"model path {str(path)!r} is not a directory")
    if not file.exists():
        raise MlxGemmaError(f"{file} not found: a model directory needs the config.json of its checkpoint")
    return read_json(file)


def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / n for n in shard_names(read_json(index), index)]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise MlxGemmaError(f"{index.name} names shard(s) that are not in {path}: {', '.join(absent)}")
        return files  # each is checked to be a regular file by check_safetensors, before it is read
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise MlxGemmaError(
                f"{path} holds only PyTorch pickle weights ({', '.join(pickled)}), which mlxgemma never "
                "unpickles: get or export the safetensors version of the checkpoint"
            )
        raise MlxGemmaError(f"no *.safetensors weights in {path}")
    return files


def shard_names(index: dict, file: Path) -> list:
    """The shard file names of a safetensors index: plain names inside the checkpoint folder only (a name
    with a directory part, '..' or an absolute path would read weights from elsewhere)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MlxGemmaError(f"{file} is not a valid safetensors index (no weight_map object)")
    bad = [n for n in weight_map.values() if not _plain_name(n)]
    if bad:
        raise MlxGemmaError(f"{file.name}: weight_map names {_listed([repr(b)[:80] for b in bad])}; a shard must be "
                            "a *.safetensors file in the checkpoint folder itself")
    return sorted(set(weight_map.values()))


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and PurePosixPath(name).name == name
            and "\\" not in name and "\0" not in name)


def _listed(items, n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(f: Path) -> None:
    """Validate a safetensors header against the file before any tensor is materialised: a header that
    claims more bytes than the file holds is an error, not an allocation."""
    regular_file(f)
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_JSON_BYTES):
            raise MlxGemmaError(f"{f.name} is truncated or not safetensors: its header claims {max(n, 0)} bytes, "
                                f"the file holds {size}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise MlxGemmaError(f"{f.name} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise MlxGemmaError(f"{f.name}: the safetensors header must be a JSON object, not {type(header).__name__}")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end, nbytes = _header_entry(f, name, info)
        if end - start != nbytes or not 0 <= start <= end <= data:
            raise MlxGemmaError(f"{f.name}: tensor {name[:80]!r} claims bytes {start}..{end} for {nbytes} bytes of data, "
                                f"but the file holds {data}: the file is truncated or its header lies")


def _header_entry(f: Path, name: str, info) -> tuple:
    """(start, end, bytes the dtype and shape need) of one header entry, whose every field is checked."""
    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _DTYPE_BYTES
          and isinstance(info.get("shape"), list)
          and all(_is_index(d) for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
          and len(info["data_offsets"]) == 2 and all(_is_index(o) for o in info["data_offsets"]))
    if not ok:
        raise MlxGemmaError(f"{f.name}: tensor {name[:80]!r} has a malformed header entry (dtype, shape, data_offsets)")
    start, end = info["data_offsets"]
    return start, end, _DTYPE_BYTES[info["dtype"]] * math.prod(info["shape"])


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def read_weights(path: Path) -> dict:
    weights = {}
    for f in weight_files(path):
        check_safetensors(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx reports a bad file as a RuntimeError/ValueError from C++
            raise MlxGemmaError(f"cannot read {f.name}: {str(e).splitlines()[0]} (truncated or not safetensors?)") from None
    return weights


def build_model(config_dict: dict, source: str = "config.json") -> nn.Module:
    config = config_from_dict(config_dict, source)
    return model_class_for(config_dict)(config)


def _quantize_like(model: nn.Module, config: dict, weights: dict) -> None:
    """Rebuild quantized layers from an mlx-lm style "quantization" block (per-layer overrides included). A
    quantized layer the block does not name by our module path (a checkpoint of another layout: mlx-lm's
    language_model.model.* or its split experts) takes the bits and group size its stored shapes imply, as
    mlx-lm's loader does."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return
    q = with_default_groups(q)
    check_quantization(q)

    def predicate(name, module):
        if f"{name}.scales" not in weights:
            return False
        override = q.get(name)
        if isinstance(override, dict):
            return override
        return _stored_quantization(name, module, weights, q)

    nn.quantize(model, group_size=q.get("group_size", 64), bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=predicate)


def _stored_quantization(name: str, module: nn.Module, weights: dict, q: dict):
    """The block's defaults if the stored shapes fit them, else the bits and group size they imply
    (in = the float layer's input width: scales hold in / group_size columns, the weight in * bits / 32)."""
    weight, scales = weights.get(f"{name}.weight"), weights[f"{name}.scales"]
    in_dims = getattr(module, "weight", None)
    if weight is None or in_dims is None or in_dims.ndim < 2 or scales.ndim < 1 or not scales.shape[-1]:
        return True  # the strict check reports what is missing or misshapen
    in_dims = in_dims.shape[-1]
    group_size, bits = in_dims // scales.shape[-1], weight.shape[-1] * 32 // in_dims
    mode = q.get("mode", "affine")
    if (group_size, bits) == (q.get("group_size", 64), q["bits"]):
        return True
    block = {"group_size": group_size, "bits": bits, "mode": mode}
    try:
        check_quantization(block)
    except MlxGemmaError:
        raise MlxGemmaError(f"{name} is stored quantized with {bits} bits in groups of {group_size} ({mode}), "
                            "which config.json's quantization block does not say and MLX cannot run") from None
    return block


# What MLX's quantized kernels take (mx.quantize refuses the rest; a group size of 0 kills the process).
QUANT_MODES = {"affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)), "mxfp4": ((4,), (32,)), "mxfp8": ((8,), (32,)),
               "nvfp4": ((4,), (16,))}


# mx.quantize's group size per mode when none is given.
DEFAULT_GROUPS = {"affine": 64, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}


def with_default_groups(q: dict) -> dict:
    """The block with each null group size (mlx-lm 0.32's mixed recipes write "group_size": null per layer
    when none was asked for, and its loader hands that to mx.quantize) as the mode's default."""
    def fill(block, mode):
        mode = block.get("mode", mode)
        group = DEFAULT_GROUPS.get(mode) if isinstance(mode, str) else None
        return dict(block, group_size=group) if block.get("group_size", 0) is None else block

    top = fill(q, "affine")
    return {k: fill(v, top.get("mode", "affine")) if isinstance(v, dict) else v for k, v in top.items()}


def check_quantization(q: dict) -> None:
    """config.json's quantization block (and its per-layer overrides) against what MLX can run."""
    for where, block in [("quantization", q)] + [(f"quantization.{k}", v) for k, v in q.items() if isinstance(v, dict)]:
        mode = block.get("mode", q.get("mode", "affine"))
        bits, group = block.get("bits", q.get("bits")), block.get("group_size", q.get("group_size", 64))
        if not isinstance(mode, str) or mode not in QUANT_MODES:
            raise MlxGemmaError(f"config.json: {where}.mode is {mode!r}; supported: {', '.join(QUANT_MODES)}")
        allowed_bits, allowed_groups = QUANT_MODES[mode]
        if isinstance(bits, bool) or bits not in allowed_bits:
            raise MlxGemmaError(f"config.json: {where}.bits is {bits!r}; {mode} takes {allowed_bits}")
        if isinstance(group, bool) or group not in allowed_groups:
            raise MlxGemmaError(f"config.json: {where}.group_size is {group!r}; {mode} takes {allowed_groups}")


def check_weights(model: nn.Module, weights: dict) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (config says {tuple(expected[k].shape)})"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{label}: {_listed(items, 6)}")
    if problems:
        raise MlxGemmaError("weights do not match config.json: " + "; ".join(problems))


def compute_dtype(dtype: Optional[str] = None) -> Optional[str]:
    """The dtype to run in. "auto" (or None) is float32 on MLX's CPU backend, whose bf16 and fp16 kernels
    are several times slower than its float32 ones (README, Performance), and on a GPU (Metal) the
    checkpoint's own dtype (None: as stored; bf16 for the released checkpoints). A name forces that dtype."""
    if dtype in (None, "auto"):
        return "float32" if mx.default_device() == mx.cpu else None
    if dtype not in DTYPES:
        raise MlxGemmaError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def load_model(path: Union[str, Path], dtype: Optional[str] = "auto", group=None,
               pipeline: bool = False) -> nn.Module:
    """Build the model class config.json names and load its weights strictly (any source, see resolve).
    dtype ("float32", "float16", "bfloat16") casts the floating-point weights (quantization scales and
    biases included); "auto" chooses by backend (compute_dtype); None keeps them as stored. group (an
    mx.distributed group of several ranks): shard the model across them (distributed.py) before any weight
    is read, so that each rank holds its part only: by heads and widths (tensor parallelism), or with
    pipeline=True by runs of layers."""
    path = resolve(path)
    dtype = compute_dtype(dtype) if dtype is not None else None
    if path.suffix == ".gguf":
        return _from_gguf(path, dtype, group, pipeline)[0]
    model = model_from_weights(read_config(path), read_weights(path), dtype, str(path / "config.json"), group,
                               pipeline)
    return embedder(model, path, dtype)


def embedder(model: nn.Module, path: Path, dtype: Optional[str] = None) -> nn.Module:
    """A sentence-transformers folder's encoder inside its pipeline (mean pooling, Dense modules, Normalize:
    models/embedding.py); an embedding model's bare checkpoint (EmbeddingGemma 2) in the default one (mean,
    normalised); any other model as it is."""
    pipeline = read_pipeline(path)
    if pipeline is None and not getattr(model, "is_embedder", False):
        return model
    pipeline = pipeline or {"dense": [], "normalize": True}
    out = SentenceEmbedding(model, [(n_in, n_out) for _, n_in, n_out in pipeline["dense"]], pipeline["normalize"],
                            pipeline.get("prompts"), pipeline.get("default_prompt_name"), pipeline.get("max_seq_length"))
    for layer, w in zip(out.dense, dense_weights(path, pipeline)):
        layer.weight = w.astype(DTYPES[dtype]) if dtype is not None else w
    mx.eval(out.parameters())
    return out


def _from_gguf(path: Path, dtype: Optional[str], group=None, pipeline: bool = False):
    """(model, tokenizer, eos ids) of a .gguf file, imported in memory (in bfloat16 unless dtype says)."""
    from .gguf_import import load_gguf

    config, weights, tokenizer, eos = load_gguf(path, DTYPES[dtype or "bfloat16"])
    return model_from_weights(config, weights, dtype, str(path), group, pipeline), tokenizer, eos


def model_from_weights(config: dict, weights: dict, dtype: Optional[str] = None, source: str = "config.json",
                       group=None, pipeline: bool = False):
    model = build_model(config, source)
    model, weights = model.part_for(model.sanitize(weights))  # (a Gemma 3 checkpoint without its tower: the text)
    _quantize_like(model, config, weights)
    check_weights(model, weights)
    if dtype is not None:
        if dtype not in DTYPES:
            raise MlxGemmaError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
        if group is not None and group.size() > 1:  # while the weights are still lazy: each rank reads its part
            if pipeline:
                model.pipeline(group)
            else:
                model.shard(group)
        mx.eval(model.parameters())
    except (RuntimeError, ValueError) as e:  # e.g. a tensor of the right size whose bytes cannot be read
        raise MlxGemmaError(f"cannot load the weights of {source}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.tiktoken", "*.txt"]


def resolve(source: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory or .gguf file as is; a Hub repo id downloaded (only the files a model needs)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_local(source):  # (a typo, not a Hub repo id: "./x" even matches org/name's pattern)
        raise MlxGemmaError(f"no such file or directory: {source}")
    if not _REPO_ID.match(str(source)):
        raise MlxGemmaError(f"{str(source)!r} is neither a local directory, a .gguf file nor a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise MlxGemmaError(f"{source} is not in the HF cache and the Hub cannot be reached (HF_HUB_OFFLINE, or no "
                            "network): download it once online, or pass a local path") from None
    except (HfHubHTTPError, OSError) as e:
        raise MlxGemmaError(f"cannot download {source} from the Hub: {str(e).splitlines()[0]}") from None


def looks_local(source: Union[str, Path]) -> bool:
    """Whether a source names a file or folder here rather than a Hub repo id (org/name): a Path, or text that
    starts with ./, ../, / or ~, ends with .gguf or .safetensors, or holds a path separator a repo id has not."""
    text = str(source)
    if isinstance(source, Path) or text.startswith(("./", "../", "/", "~")) or text.endswith((".gguf", ".safetensors")):
        return True
    return any(sep in text for sep in (os.sep, os.altsep) if sep) and not _REPO_ID.match(text)


def load(source: Union[str, Path], dtype: Optional[str] = "auto", revision: Optional[str] = None, group=None,
         pipeline: bool = False):
    """(model, tokenizer) from any source; the tokenizer is mlx-lm's TokenizerWrapper (streaming detokenizer,
    chat template, every eos id of config.json and generation_config.json). For image+text models
    (T5Gemma 2, Gemma 3 with its tower): (model, processor), the processor holding that tokenizer. dtype and
    group and pipeline as for load_model."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    path = resolve(source, revision)
    if path.suffix == ".gguf":
        model, tokenizer, eos = _from_gguf(path, compute_dtype(dtype) if dtype is not None else None, group,
                                           pipeline)
        return model, TokenizerWrapper(tokenizer, eos_token_ids=eos)
    model = load_model(path, dtype, group, pipeline)
    if getattr(model, "is_drafter", False):
        raise MlxGemmaError(f"{source} is a {type(model).__name__}: it drafts for a Gemma 4 and runs on none of its "
                            "own (pass it as --draft-model, or load it with load_model as draft_model=)")
    return model, model.load_processor(path, load_tokenizer(path))


# The small JSON files a tokenizer reads, checked first so that a broken one is named in the error.
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json")


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper of a checkpoint folder, or one clear error for a missing or broken file."""
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer

    for name in TOKENIZER_JSON:
        if (path / name).exists():
            read_json(path / name)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise MlxGemmaError(f"{path} holds no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).exists():
            regular_file(path / name)
    eos = eos_token_ids(path)
    try:
        return mlx_lm_load_tokenizer(path, eos_token_ids=eos)
    except Exception as e:  # tokenizers, sentencepiece and transformers each raise their own kinds
        raise MlxGemmaError(f"cannot load the tokenizer in {path}: {type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}") from None


def eos_token_ids(path: Path) -> Optional[list]:
    ids = []
    for name in ("config.json", "generation_config.json"):
        f = path / name
        if f.exists():
            ids += token_ids(read_json(f).get("eos_token_id"), "eos_token_id", str(f))
    return sorted(set(ids)) or None

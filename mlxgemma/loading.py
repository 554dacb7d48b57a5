"""Sources -> an MLX model, strictly: every parameter the config implies must be in the weights with the
shape the config implies, and nothing else may be there.

A source is an HF-layout directory (transformers' safetensors), an MLX checkpoint (ours or mlx-lm's,
quantized or not), a Hub repo id (downloaded with huggingface_hub, which honours HF_HUB_OFFLINE and the HF
cache), or a .gguf file (imported in memory, see gguf_import)."""

import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MlxGemmaError
from .models import config_from_dict, is_encoder_decoder, model_class_for

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def read_config(path: Union[str, Path]) -> dict:
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise MlxGemmaError(f"model path {str(path)!r} is not a directory")
    if not file.is_file():
        raise MlxGemmaError(f"{file} not found: a model directory needs the config.json of its checkpoint")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxGemmaError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise MlxGemmaError(f"{file} must hold a JSON object")
    return d


def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise MlxGemmaError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = [path / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MlxGemmaError(f"{index.name} names shard(s) that are not in {path}: {', '.join(absent)}")
        return files
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


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(f: Path) -> None:
    """Validate a safetensors header against the file before any tensor is materialised: a header that
    claims more bytes than the file holds is an error, not an allocation."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise MlxGemmaError(f"{f.name} is truncated or not safetensors: its header claims {max(n, 0)} bytes, "
                                f"the file holds {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MlxGemmaError(f"{f.name} has an unreadable safetensors header") from None
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            nbytes = _DTYPE_BYTES[info["dtype"]] * math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise MlxGemmaError(f"{f.name}: tensor {name} has a malformed header entry") from None
        if end - start != nbytes or not 0 <= start <= end <= data:
            raise MlxGemmaError(f"{f.name}: tensor {name} claims bytes {start}..{end} for {nbytes} bytes of data, "
                                f"but the file holds {data}: the file is truncated or its header lies")


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
    """Rebuild quantized layers from an mlx-lm style "quantization" block (per-layer overrides included)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        return

    def predicate(name, module):
        if f"{name}.scales" not in weights:
            return False
        override = q.get(name)
        return override if isinstance(override, dict) else True

    nn.quantize(model, group_size=q.get("group_size", 64), bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=predicate)


def check_weights(model: nn.Module, weights: dict) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (config says {tuple(expected[k].shape)})"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items) - 6} more)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise MlxGemmaError("weights do not match config.json: " + "; ".join(problems))


def load_model(path: Union[str, Path], dtype: Optional[str] = None) -> nn.Module:
    """Build the model class config.json names and load its weights strictly (any source, see resolve).
    dtype ("float32", "float16", "bfloat16") casts the floating-point weights; default: as stored."""
    path = resolve(path)
    if path.suffix == ".gguf":
        return _from_gguf(path, dtype)[0]
    return model_from_weights(read_config(path), read_weights(path), dtype, str(path / "config.json"))


def _from_gguf(path: Path, dtype: Optional[str]):
    """(model, tokenizer, eos ids) of a .gguf file, imported in memory (float32 unless dtype says)."""
    from .gguf_import import load_gguf

    config, weights, tokenizer, eos = load_gguf(path, DTYPES.get(dtype, mx.float32))
    return model_from_weights(config, weights, dtype, str(path)), tokenizer, eos


def model_from_weights(config: dict, weights: dict, dtype: Optional[str] = None, source: str = "config.json"):
    model = build_model(config, source)
    weights = model.sanitize(weights)
    _quantize_like(model, config, weights)
    check_weights(model, weights)
    if dtype is not None:
        if dtype not in DTYPES:
            raise MlxGemmaError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.tiktoken", "*.txt"]


def resolve(source: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory or .gguf file as is; a Hub repo id downloaded (only the files a model needs)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
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


def load(source: Union[str, Path], dtype: Optional[str] = None, revision: Optional[str] = None):
    """(model, tokenizer) from any source; the tokenizer is mlx-lm's TokenizerWrapper (streaming detokenizer,
    chat template, every eos id of config.json and generation_config.json). For image+text models
    (T5Gemma 2): (model, processor), the processor holding that tokenizer."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper, load as load_tokenizer

    path = resolve(source, revision)
    if path.suffix == ".gguf":
        model, tokenizer, eos = _from_gguf(path, dtype)
        return model, TokenizerWrapper(tokenizer, eos_token_ids=eos)
    model = load_model(path, dtype)
    tokenizer = load_tokenizer(path, eos_token_ids=eos_token_ids(path))
    if is_encoder_decoder(model):
        from .processor import T5Gemma2Processor

        return model, T5Gemma2Processor.from_pretrained(path, tokenizer, model.config)
    return model, tokenizer


def eos_token_ids(path: Path) -> Optional[list]:
    ids = []
    for name in ("config.json", "generation_config.json"):
        f = path / name
        if f.is_file():
            value = json.loads(f.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
    return sorted(set(ids)) or None

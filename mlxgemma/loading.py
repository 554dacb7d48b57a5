"""config.json + safetensors -> an MLX model, strictly: every parameter the config implies must be in the
weights with the shape the config implies, and nothing else may be there."""

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MlxGemmaError
from .models import config_from_dict, model_class_for

_FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


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


def read_weights(path: Path) -> dict:
    weights = {}
    for f in weight_files(path):
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
    """Build the model class config.json names and load its safetensors weights strictly.
    dtype ("float32", "float16", "bfloat16") casts the floating-point weights; default: as stored."""
    path = Path(path)
    config = read_config(path)
    model = build_model(config, str(path / "config.json"))
    weights = model.sanitize(read_weights(path))
    _quantize_like(model, config, weights)
    check_weights(model, weights)
    if dtype is not None:
        if dtype not in _FLOAT_DTYPES:
            raise MlxGemmaError(f"dtype {dtype!r} is not one of {', '.join(_FLOAT_DTYPES)}")
        target = _FLOAT_DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model

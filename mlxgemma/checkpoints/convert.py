"""Convert a source (HF directory, Hub repo id, MLX checkpoint or .gguf) into an MLX checkpoint that mlx-lm
also reads, optionally quantized. The output is built in a temporary directory beside the destination and
renamed into place only when complete, so an error or Ctrl-C never leaves a half-written checkpoint.
The command line is mlxgemma/convert.py (python -m mlxgemma.convert).
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxGemmaError
from ..models import config_class_for, model_class_for
from .loading import DTYPES, model_from_weights, read_config, read_weights, resolve
from .quantize import RECIPES, VISION_BITS, quantize as quantize_weights
from .sentence_transformers import copy_pipeline

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json"]


def convert(hf_path, mlx_path, *, dtype: Optional[str] = None, quantize: bool = False, q_bits: int = 4,
            q_group_size: int = 64, quant_predicate: Optional[str] = None, dequantize: bool = False,
            overwrite: bool = False, revision: Optional[str] = None, q_vision_bits: Optional[int] = VISION_BITS,
            q_audio_bits: Optional[int] = VISION_BITS, calibrate: bool = False, calibration_data: Optional[str] = None,
            calibration_samples: Optional[int] = None, calibration_seq_len: int = 256,
            target_bpw: Optional[float] = None, q_search: bool = True, awq: bool = True) -> Path:
    """Write the MLX checkpoint of hf_path to mlx_path and return mlx_path. quantize=True quantizes with MLX
    affine groups: q_bits of 2/3/4/5/6/8, q_group_size of 32/64/128, and a recipe (quant_predicate:
    "uniform", "budget" or mlx-lm's mixed ones; at 4 bits the default is budget, chosen by measurement, whose
    bits per weight target_bpw sets: 4.75 by default). A vision tower
    (T5Gemma 2, Gemma 3, Gemma 4) gets q_vision_bits (8 by default, chosen by measurement; None keeps it in
    float), an audio tower (Gemma 4 E2B/E4B) q_audio_bits (8 by default, as for the vision tower). A .gguf
    source keeps its own quantized weights (exact repacking) unless dequantize=True or quantize=True is asked for.
    calibrate=True (with quantize) rounds with GPTQ on activations of calibration_data (a UTF-8 file, or the
    built-in text), calibration_samples rows (default: all the text gives) of calibration_seq_len tokens,
    after AWQ's input scaling where the family says which norm feeds which linears (awq.py; awq=False: none).
    q_search=False rounds as mlx-lm does (each group's grid from its min and max) instead of searching each
    group's grids for the least error (grids.best_grid: measured better, docs/convert-and-quantize.md)."""
    dst = Path(mlx_path).expanduser()
    _check_options(dst, dtype, quantize, q_bits, q_group_size, quant_predicate, dequantize, overwrite)
    calibration = _calibration(quantize, calibrate, calibration_data, calibration_samples, calibration_seq_len, awq)
    _check_target(quantize, quant_predicate, target_bpw)
    for name, value in (("--q-vision-bits", q_vision_bits), ("--q-audio-bits", q_audio_bits)):
        if value not in (None, 4, 8):
            raise MlxGemmaError(f"{name} {value} is not supported (4, 8, or float)")
    src = resolve(hf_path, revision)
    _check_not_overlapping(src, dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as e:
        raise MlxGemmaError(f"cannot write to {dst.parent}: {e.strerror or e}") from None
    try:
        config, model, tokenizer_writer = _source_model(src, dtype)
        tokenizer_writer(tmp)
        if calibration is not None:
            from .loading import load_tokenizer

            model.check_calibration()
            calibration["tokenizer"] = load_tokenizer(tmp)
        if quantize or dequantize:
            model, config = _requantize(model, config, dequantize, q_bits, q_group_size, quant_predicate,
                                        (q_vision_bits, q_audio_bits), calibration, q_search, target_bpw)
        _write(tmp, model, config)
        _write_readme(tmp, hf_path, config, dtype)
        _replace(tmp, dst)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing is left behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise MlxGemmaError(f"cannot write {dst}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _check_not_overlapping(src: Path, dst: Path) -> None:
    """The output may not be the source, lie inside it, or hold it: --overwrite would delete the source."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise MlxGemmaError(f"--mlx-path {dst} overlaps the source {src}: write the output somewhere else")


def _check_options(dst, dtype, quantize, q_bits, q_group_size, recipe, dequantize, overwrite):
    if dst.exists() and not overwrite:
        raise MlxGemmaError(f"{dst} already exists: choose another --mlx-path or pass --overwrite")
    if dtype is not None and dtype not in DTYPES:
        raise MlxGemmaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if q_bits not in (2, 3, 4, 5, 6, 8):
        raise MlxGemmaError(f"--q-bits {q_bits} is not supported (2, 3, 4, 5, 6 or 8)")
    if q_group_size not in (32, 64, 128):
        raise MlxGemmaError(f"--q-group-size {q_group_size} is not supported (32, 64 or 128)")
    if recipe is not None and recipe not in RECIPES:
        raise MlxGemmaError(f"--quant-predicate {recipe!r} is not a recipe ({', '.join(RECIPES)})")
    if quantize and dequantize:
        raise MlxGemmaError("-q and --dequantize contradict each other: pick one")


def _source_model(src: Path, dtype):
    """(config dict, model with weights, function writing the tokenizer files into a directory)."""
    if src.suffix == ".gguf":
        from .gguf_import import load_gguf

        config, weights, tokenizer, eos = load_gguf(src, DTYPES[dtype or "bfloat16"])
        model = model_from_weights(config, weights)

        def write_tokenizer(out):
            tokenizer.save_pretrained(out)
            (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                                    "eos_token_id": eos}, indent=2))
        return config, model, write_tokenizer
    config = read_config(src)
    model = model_from_weights(config, read_weights(src), dtype, str(src / "config.json"))

    def copy_tokenizer(out):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        copy_pipeline(src, out)  # (a sentence-transformers folder: its pooling and Dense modules, as they are)
    return config, model, copy_tokenizer


def _check_target(quantize, recipe, target_bpw) -> None:
    if target_bpw is None:
        return
    if not quantize:
        raise MlxGemmaError("--target-bpw sets the bits per weight of -q: add -q")
    if recipe not in (None, "budget"):
        raise MlxGemmaError(f"--target-bpw sets the budget recipe's bits per weight; --quant-predicate {recipe} "
                            f"has its own")


def _calibration(quantize, calibrate, data, samples, seq_len, awq=True) -> Optional[dict]:
    """The calibration options, checked before anything is loaded (None without --calibrate)."""
    if not calibrate:
        if data is not None or not awq:
            raise MlxGemmaError(f"{'--calibration-data' if data is not None else '--no-awq'} needs --calibrate")
        return None
    if not quantize:
        raise MlxGemmaError("--calibrate calibrates quantization: add -q")
    if (samples is not None and samples <= 0) or seq_len <= 1:
        raise MlxGemmaError(f"--calibration-samples must be > 0 and --calibration-seq-len > 1 "
                            f"(got {samples} and {seq_len})")
    if data not in (None, "builtin") and not Path(data).expanduser().is_file():
        raise MlxGemmaError(f"--calibration-data {data}: no such file")
    return dict(data=data, samples=samples, seq_len=seq_len, awq=awq)


def _requantize(model, config, dequantize, bits, group_size, recipe, tower_bits=(VISION_BITS, VISION_BITS),
                calibration=None, search=True, target_bpw=None):
    """tower_bits: (vision, audio) bits, None for float."""
    vision_bits, audio_bits = tower_bits
    if config.get("quantization"):  # a quantized source: back to float first (a second rounding, said so)
        if not dequantize:
            print("[mlxgemma] note: the source is already quantized; requantizing rounds its weights a "
                  "second time", file=sys.stderr)
        model = model.dequantize()
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if dequantize:
        return model, config
    if calibration is not None:
        from .calibrate import calibrate, summary

        options = {k: v for k, v in calibration.items() if k != "tokenizer"}
        model, config, report = calibrate(model, config, calibration["tokenizer"], bits, group_size, recipe,
                                          vision_bits, search=search, audio_bits=audio_bits, target_bpw=target_bpw,
                                          **options)
        print("\n".join(summary(report)), file=sys.stderr)
        return model, config
    return quantize_weights(model, config, bits, group_size, recipe, vision_bits, search=search, audio_bits=audio_bits,
                            target_bpw=target_bpw)


def legacy_rope_keys(config: dict) -> dict:
    """The pre-transformers-5 top-level rope keys, beside rope_parameters, for readers that only know those
    (mlx-lm's StableLM needs rope_theta and partial_rotary_factor, its Gemma 3 rope_local_base_freq)."""
    from ..models import config_from_dict
    from ..models.config import FULL, SLIDING, pattern_layer_types

    parsed = config_from_dict(config)
    rope = parsed.rope_parameters
    out = dict(config)
    full = rope.get(FULL, rope)
    out.setdefault("rope_theta", full["rope_theta"])
    if full.get("rope_type") == "linear":
        out.setdefault("rope_scaling", {"type": "linear", "rope_type": "linear", "factor": full["factor"]})
    if "partial_rotary_factor" in full:
        out.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
    if SLIDING in rope:
        out.setdefault("rope_local_base_freq", rope[SLIDING]["rope_theta"])
        for k in range(1, parsed.num_hidden_layers + 1):
            if parsed.layer_types == pattern_layer_types(parsed.num_hidden_layers, k):
                out.setdefault("sliding_window_pattern", k)
                break
    return out


def _write(out: Path, model: nn.Module, config: dict) -> None:
    from mlx_lm.utils import save_config, save_model

    if config_class_for(config).writes_legacy_rope_keys:
        config = legacy_rope_keys(config)
    weights = dict(tree_flatten(model.parameters()))
    dtypes = {str(v.dtype).split(".")[-1] for k, v in weights.items()
              if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(("scales", "biases"))}
    if hasattr(model, "checkpoint"):  # a family whose on-disk names or config differ from its modules' (Gemma 4)
        weights, config = model.checkpoint(weights, config)
        _save_weights(out, weights, model)
    else:
        save_model(out, model)
    if len(dtypes) == 1:
        config = dict(config, torch_dtype=dtypes.pop())
    save_config(config, out / "config.json", keep_vision_config=True)  # (mlx-lm drops it by default)


def _save_weights(out: Path, weights: dict, model: nn.Module) -> None:
    """mlx-lm's save_model for a dict of weights: the same shards, names and index."""
    from mlx_lm.utils import get_total_parameters, make_shards

    out.mkdir(parents=True, exist_ok=True)
    shards = make_shards(weights)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        name = pattern.format(i + 1, len(shards))
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                          "total_parameters": get_total_parameters(model)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _write_readme(out: Path, source, config: dict, dtype) -> None:
    q = config.get("quantization")
    how = (f"quantized (affine, {q.get('bits')}-bit default, groups of {q.get('group_size')}; per-layer "
           "overrides in config.json)" if q else f"in {dtype or 'the source dtype'}")
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    (out / "README.md").write_text(
        f"# {Path(str(source)).name} for MLX\n\nConverted by mlxgemma from `{source}`, {how}.\n"
        f"Weights: {size / 2**20:.1f} MiB. Files: {', '.join(files)}.\n\n"
        + model_class_for(config).readme_usage)


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished output into place; an existing destination (--overwrite) goes only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

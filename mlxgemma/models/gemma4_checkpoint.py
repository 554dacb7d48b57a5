"""Gemma 4's checkpoint layouts: how expert weights are named on disk (transformers' tensors, mlx-lm's split
and quantized layers) and what mlxgemma.convert writes for a Gemma 4 model (names and a config.json that
mlx-lm's gemma4_text reads as transformers does)."""

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxGemmaError
from .config import FULL, SLIDING, text_config_of, token_ids


# In memory each expert block holds experts.gate_up_proj and experts.down_proj, SwitchLinears (gemma4_moe.py).
# On disk: float experts as transformers stores them (one tensor each, `experts.gate_up_proj`), which is also
# what mlx-lm's sanitize splits; quantized experts as mlx-lm stores its QuantizedSwitchLinears
# (`experts.switch_glu.{gate,up,down}_proj.{weight,scales,biases}`), the only quantized layout mlx-lm reads
# (transformers has none). gate_up_proj is gate's rows then up's, quantized in groups along the input, so
# splitting it in two and concatenating the halves back are exact.
_SWITCH, _PARTS = ".experts.switch_glu.", ("weight", "scales", "biases")


def experts_from_checkpoint(weights: dict) -> dict:
    """transformers' experts.{gate_up,down}_proj tensors, mlx-lm's experts.switch_glu.{gate,up,down}_proj.*
    (float or quantized) and a fused experts.switch_glu.gate_up_proj.* -> experts.{gate_up,down}_proj.*."""
    out, halves = {}, {}
    for k, v in weights.items():
        if k.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[k + ".weight"] = v
            continue
        if _SWITCH in k:
            base, rest = k.split(_SWITCH, 1)
            proj, _, part = rest.partition(".")
            if part in _PARTS and proj in ("gate_proj", "up_proj"):
                halves.setdefault((base, part), {})[proj] = (k, v)
                continue
            if part in _PARTS and proj in ("gate_up_proj", "down_proj"):
                out[f"{base}.experts.{proj}.{part}"] = v
                continue
        out[k] = v
    for (base, part), pair in halves.items():
        if len(pair) < 2:  # a half alone keeps its name: the strict check reports it and what is missing
            out.update(pair.values())
            continue
        (_, gate), (_, up) = pair["gate_proj"], pair["up_proj"]
        if gate.shape[:-2] + gate.shape[-1:] != up.shape[:-2] + up.shape[-1:] or gate.dtype != up.dtype:
            raise MlxGemmaError(f"{base}{_SWITCH}gate_proj.{part} {tuple(gate.shape)} and up_proj.{part} "
                                f"{tuple(up.shape)} are stored differently (quantized with other bits or groups?): "
                                "mlxgemma runs them fused, as gate_up_proj, and needs them alike")
        out[f"{base}.experts.gate_up_proj.{part}"] = mx.concatenate([gate, up], axis=-2)
    return out


def experts_to_checkpoint(weights: dict) -> dict:
    """The inverse of experts_from_checkpoint: float experts as transformers' tensors, quantized ones split
    as mlx-lm's switch_glu layers."""
    out = {}
    for k, v in weights.items():
        base, proj, part = _expert_param(k)
        if base is None:
            out[k] = v
        elif f"{base}.experts.{proj}.scales" not in weights:
            out[f"{base}.experts.{proj}"] = v
        elif proj == "down_proj":
            out[f"{base}{_SWITCH}down_proj.{part}"] = v
        else:
            gate, up = mx.split(v, 2, axis=-2)
            out[f"{base}{_SWITCH}gate_proj.{part}"], out[f"{base}{_SWITCH}up_proj.{part}"] = gate, up
    return out


def _expert_param(key: str) -> tuple:
    """("model.layers.3", "gate_up_proj", "scales") for model.layers.3.experts.gate_up_proj.scales, else Nones."""
    for proj in ("gate_up_proj", "down_proj"):
        head = f".experts.{proj}."
        if head in key:
            base, part = key.split(head, 1)
            if part in _PARTS:
                return base, proj, part
    return None, None, None


def _module_checkpoint_names(name: str) -> list:
    """The on-disk module path(s) of a quantized module (the experts' gate_up_proj is two of mlx-lm's)."""
    base, proj, _ = _expert_param(name + ".weight")
    if base is None:
        return [name]
    return [f"{base}{_SWITCH}{p}" for p in (("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",))]


# mlx-lm's gemma4_text reads these with defaults of its own (a 4:1 layer pattern, 20 shared layers, softcap 30,
# double-wide MLPs, 1 KV head...), and the full layers' head size only from global_head_dim: they are written
# out as mlxgemma (and transformers) resolve them.
_RESOLVED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "rms_norm_eps", "vocab_size_per_layer_input", "hidden_size_per_layer_input",
                    "num_kv_shared_layers", "final_logit_softcapping", "use_double_wide_mlp", "attention_k_eq_v",
                    "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
                    "tie_word_embeddings", "max_position_embeddings")


def checkpoint_of(model: nn.Module, weights: dict, config: dict) -> tuple:
    """What mlxgemma.convert writes for a Gemma 4 model: the weights in their on-disk names (see above), and
    a text config (model_type gemma4_text: only the language model is written) that transformers, mlxgemma and
    mlx-lm read as the same model. Beside what the source says (per_layer_config included, which transformers
    and mlxgemma read first), it states global_head_dim / num_global_key_value_heads (all mlx-lm reads of the
    full layers' shapes), the resolved layer_types and the fields whose mlx-lm defaults differ from
    transformers'. A quantization block names every quantized module by its on-disk path, with its bits."""
    parsed = model.config
    text = dict(config)
    if config.get("model_type") == "gemma4":
        text = text_config_of(config, "gemma4_text")
        text["model_type"] = "gemma4_text"
        eos = token_ids(config.get("eos_token_id"), "eos_token_id", "config.json")
        eos += token_ids(text.get("eos_token_id"), "eos_token_id", "config.json (text_config)")
        if eos:
            text["eos_token_id"] = sorted(set(eos)) if len(set(eos)) > 1 else eos[0]
        for key in ("tie_word_embeddings", "pad_token_id", "bos_token_id"):
            if key not in text and key in config:
                text[key] = config[key]
        if config.get("quantization_config") is not None:
            text.setdefault("quantization", config["quantization_config"])
    names = text.get("architectures") or []
    if not names or names[0] == "Gemma4ForConditionalGeneration":
        text["architectures"] = [type(model).__name__]
    text.pop("quantization_config", None)  # (written again from "quantization" by mlx-lm's save_config)
    for key in _RESOLVED_FIELDS:
        if text.get(key) is None:  # (an unset softcap is written as null: mlx-lm's default is 30)
            text[key] = getattr(parsed, key)
    text["layer_types"] = list(parsed.layer_types)
    if SLIDING in parsed.head_dims:
        text["head_dim"], text["num_key_value_heads"] = parsed.head_dims[SLIDING], parsed.kv_heads[SLIDING]
    else:
        text.setdefault("num_key_value_heads", parsed.num_key_value_heads)
    text["global_head_dim"] = parsed.head_dims[FULL]
    if parsed.attention_k_eq_v:
        text["num_global_key_value_heads"] = parsed.kv_heads[FULL]
    if text.get("quantization"):
        q = {k: v for k, v in text["quantization"].items() if not isinstance(v, dict)}
        for name, m in model.named_modules():
            if hasattr(m, "scales") and hasattr(m, "bits"):
                for path in _module_checkpoint_names(name):
                    q[path] = {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        text["quantization"] = q
    return experts_to_checkpoint(weights), text

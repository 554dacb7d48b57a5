"""Gemma 4's checkpoint layouts: how expert weights are named on disk (transformers' tensors, mlx-lm's split
and quantized layers), what mlxgemma.convert writes for a Gemma 4 model (names and a config.json that
mlx-lm's gemma4_text reads as transformers does), and what llama.cpp's Gemma 4 files (GGUF) say: their tensor
names and the config.json their metadata describes (read by gguf_import.py through Gemma4TextConfig)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from . import gemma
from .config import FULL, MAX_LAYERS, SLIDING, of_type, pattern_layer_types, text_config_of, token_ids


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
    a text config (model_type gemma4_text, gemma4_unified_text for the 12B: only the language model is written)
    that transformers, mlxgemma and mlx-lm read as the same model. Beside what the source says (per_layer_config
    included, which transformers and mlxgemma read first), it states global_head_dim / num_global_key_value_heads
    (all mlx-lm reads of the full layers' shapes), the resolved layer_types and the fields whose mlx-lm defaults
    differ from transformers'. A quantization block names every quantized module by its on-disk path, with its bits."""
    parsed = model.config
    text = dict(config)
    if config.get("model_type") in ("gemma4", "gemma4_unified"):
        text = text_config_of(config, parsed.model_type)
        text["model_type"] = parsed.model_type
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
ROPE_FREQS = "rope_freqs.weight"  # the full layers' proportional rope, read into the config


def weight_name_from_gguf(name: str):
    """The transformers name of a tensor of a llama.cpp Gemma 4 file (None: none of Gemma 4's)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and (parts[2], parts[3]) in _BLOCK4:
        return f"model.layers.{parts[1]}.{_BLOCK4[parts[2], parts[3]]}"
    if len(parts) == 2 and parts[0] in _TOP4:
        return f"{_TOP4[parts[0]]}.{parts[1]}"
    return gemma.gguf_weight_name(name)  # what every Gemma names alike


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


def _rotated_fraction(gguf, head_dim: int) -> float:
    """Gemma 4's full layers rotate the first partial_rotary_factor of their frequency pairs ("proportional"):
    llama.cpp writes that as rope_freqs, a factor per pair, 1 for the rotated ones and 1e30 (no rotation) for
    the rest (Gemma4Model.generate_extra_tensors). No rope_freqs: every pair rotates."""
    if ROPE_FREQS not in gguf.tensors:
        return 1.0
    values = gguf.values(ROPE_FREQS).astype(np.float64)
    n = int(np.argmax(values != 1.0)) if np.any(values != 1.0) else len(values)
    if len(values) != head_dim // 2 or not np.all(values[n:] >= 1e20) or n == 0:
        raise MlxGemmaError(f"GGUF tensor {ROPE_FREQS} is not llama.cpp's proportional rope for {head_dim}-wide heads "
                            f"({head_dim // 2} factors: 1 for each rotated pair, then 1e30): mlxgemma cannot apply it")
    fraction = 2 * n / head_dim
    if int(fraction * head_dim // 2) != n:
        raise MlxGemmaError(f"GGUF tensor {ROPE_FREQS}: rotating {n} of {head_dim // 2} pairs is not a fraction "
                            "transformers' Gemma 4 rope reproduces")
    return fraction


def config_from_gguf(gguf) -> dict:
    """Gemma 4 (text) as llama.cpp's converter describes it (conversion/gemma.py, Gemma4Model, on top of
    Gemma3Model and TextModel): head sizes per layer type (key_length for full layers, key_length_swa for
    sliding ones), a sliding_window_pattern of booleans, head_count_kv and feed_forward_length as a number or
    per layer, shared_kv_layers, embedding_length_per_layer_input, expert_* for the MoE, rope freq_base and
    freq_base_swa, rope_freqs for the proportional rope. What it leaves out is read off the tensors: keys as
    values (full layers without attn_v), attention biases, the vocabulary sizes."""
    a, g, tensors = "gemma4", gguf.hparam, gguf.tensors
    tokens = gguf.required("tokenizer.ggml.tokens", list)
    heads, hidden, layers = (g(k, required=True) for k in ("attention.head_count", "embedding_length", "block_count"))
    if heads <= 0 or hidden <= 0 or not 0 < layers <= MAX_LAYERS:
        raise MlxGemmaError(f"GGUF metadata: {a}.attention.head_count, embedding_length and block_count must be "
                            f"positive (and at most {MAX_LAYERS} layers)")
    full_dim = g("attention.key_length", required=True)
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
    intermediate, wide = _ffn_lengths(g("feed_forward_length", kind=None, required=True), layers, first,
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
    rope_full = {"rope_type": "proportional", "partial_rotary_factor": _rotated_fraction(gguf, full_dim),
                 "rope_theta": g("rope.freq_base", 1_000_000.0, float)}
    config = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
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
        "bos_token_id": gguf.field("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": gguf.eos_ids(), "pad_token_id": gguf.field("tokenizer.ggml.padding_token_id", 0),
    }
    if moe:
        config.update(enable_moe_block=True, num_experts=moe_keys["expert_count"],
                      top_k_experts=moe_keys["expert_used_count"],
                      moe_intermediate_size=moe_keys["expert_feed_forward_length"])
    if g("attention.causal", True, bool) is False:  # TextModel writes it from is_causal
        config["use_bidirectional_attention"] = "all"  # (sliding_window is config.json's: resolve halves it)
    if k_eq_v:
        config["num_global_key_value_heads"] = kv[FULL]
    elif FULL in kv and SLIDING in kv and kv[FULL] != kv[SLIDING]:  # own KV heads without k_eq_v: per layer
        config["per_layer_config"] = {str(i): {"head_dim": full_dim, "num_key_value_heads": kv[FULL]}
                                      for i, t in enumerate(layer_types) if t == FULL}
    return config

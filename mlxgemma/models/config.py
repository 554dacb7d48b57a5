"""Reading config.json as transformers writes it, old checkpoints included.

Each family declares a dataclass of its fields with transformers' defaults; this base turns a config.json
dict into it: legacy rope keys (rope_theta, rope_scaling, rope_local_base_freq, partial_rotary_factor),
layer_types from legacy patterns, num_labels from id2label, and clear errors for what cannot work.
"""

import math
import typing
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Optional

from ..errors import MlxGemmaError

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear")
# Fields that fix the shapes of the weights: a config.json without them cannot describe a checkpoint.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Range checks, made before any arithmetic or MLX call sees a value. Sizes are MLX int32 dimensions; the
# layer bound is far above any checkpoint (Gemma 3 27B has 62) and keeps a hostile config from building
# for minutes.
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "num_channels",
            "image_size", "patch_size", "mm_tokens_per_image", "num_labels", "query_pre_attn_scalar",
            "rms_norm_eps", "layer_norm_eps", "final_logit_softcapping", "attn_logit_softcapping",
            "global_head_dim", "num_global_key_value_heads", "vocab_size_per_layer_input", "num_experts",
            "top_k_experts", "moe_intermediate_size")
MAX_SIZE, MAX_LAYERS = 2**31 - 1, 1024


@dataclass
class BaseConfig:
    model_type: str = ""
    architectures: Optional[list] = None
    # Classification heads (transformers' PreTrainedConfig fields).
    num_labels: int = 2
    id2label: Optional[dict] = None
    problem_type: Optional[str] = None
    classifier_dropout: Optional[float] = None
    # An MLX checkpoint's quantization block, as mlx-lm writes it.
    quantization: Optional[dict] = None
    # config.json keys that are not fields (legacy rope keys, sliding_window_pattern, ...), as read.
    extra: dict = field(default_factory=dict, repr=False)

    # What the checkpoint readers and writers ask of a family's config class (class attributes, not fields).
    # The converter writes the pre-transformers-5 top-level rope keys beside rope_parameters, for readers that
    # know only those (mlx-lm's StableLM, its Gemma 3); a nested config keeps its rope keys nested.
    writes_legacy_rope_keys = True
    # GGUF import (gguf_import.py). A family whose llama.cpp files mlxgemma reads names their
    # general.architecture and defines from_gguf(gguf) -> its config.json and gguf_weight_name(name) -> the
    # transformers name of a tensor (None: none in this family).
    gguf_architecture = None
    gguf_norm_offset = 0.0  # what llama.cpp adds to the RMSNorm weights it stores
    gguf_config_tensors = ()  # tensors that from_gguf reads into the config: not weights
    gguf_experts = False  # its 3-D tensors are experts (rows of blocks), kept quantized as stored
    gguf_add_bos = None  # whether its tokenizer adds <bos> (None: as the file's add_bos_token says)

    @classmethod
    def gguf_stop_tokens(cls, has_eot: bool) -> tuple:
        """The tokens (bytes) that also end generation, beside the file's eos and eot ids."""
        return ()

    def __post_init__(self):
        self.resolve(self.extra)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json", require: bool = True) -> "BaseConfig":
        """require=False takes transformers' defaults for the shape fields too (nested text configs
        of multimodal checkpoints leave them out)."""
        if not isinstance(d, dict):
            raise MlxGemmaError(f"{source} must be a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if d.get(k) is None]
        if missing and require:
            raise MlxGemmaError(
                f"{source} is missing required field(s) {', '.join(missing)}: "
                "pass the config.json that came with the weights"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k != "extra"}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        _check_types(cls, kwargs, source)
        if d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        _check_ranges(kwargs, source)
        check_legacy(kwargs["extra"], source)
        config = cls(**kwargs)
        heads = getattr(config, "num_attention_heads", None)
        if heads and max(heads, getattr(config, "num_key_value_heads", 0) or 0) * config.head_dim_ > MAX_SIZE:
            raise MlxGemmaError(f"{source}: num_attention_heads x head_dim is more than an MLX dimension holds")
        return config

    def resolve(self, legacy: dict) -> None:
        """Fill derived fields (rope per layer type, layer_types) from the legacy keys; families extend it."""

    @property
    def head_dim_(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def check_divisible_heads(self, where: str = "config.json") -> None:
        """Families that split hidden_size into heads (no head_dim field) need it to divide evenly."""
        if self.hidden_size % self.num_attention_heads:
            raise MlxGemmaError(f"{where}: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                f"{self.num_attention_heads}")


@lru_cache(maxsize=None)
def _field_types(cls) -> dict:
    """Each field's expected JSON type(s): int, float (an int is fine), bool, str, list or dict; None for Any."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]  # Optional[X] -> X
        base = typing.get_origin(args[0] if args else hint) or (args[0] if args else hint)
        out[name] = base if base in (int, float, bool, str, list, dict) else None
    return out


def of_type(value, kind) -> bool:
    """A JSON value of kind: bool only as bool (never as a number), float also from an int, and finite."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object"}


def _check_types(cls, kwargs: dict, source: str) -> None:
    """Every field of the right JSON type, so no arithmetic or lookup later fails on a wrong type."""
    types = _field_types(cls)
    for name, value in kwargs.items():
        kind = types.get(name)
        if value is None or kind is None or of_type(value, kind):
            continue
        raise MlxGemmaError(f"{source}: field {name} is {_short(value)}, expected {_NAMES[kind]}")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_ids(kwargs.get(name), name, source)
    for name in ("architectures", "layer_types"):
        if kwargs.get(name) is not None and not all(isinstance(v, str) for v in kwargs[name]):
            raise MlxGemmaError(f"{source}: field {name} must be a list of strings")


def token_ids(value, name: str, source: str) -> list:
    """A token id field (an id or a list of ids, or absent) as a list, or one clear error."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(of_type(i, int) and 0 <= i < MAX_SIZE for i in ids):
        raise MlxGemmaError(f"{source}: field {name} is {_short(value)}, expected a token id or a list of ids")
    return ids


def _check_ranges(kwargs: dict, source: str) -> None:
    for name in POSITIVE:
        value = kwargs.get(name)
        # (a list: one size per layer, as Gemma 3n's intermediate_size may be; its type is checked here)
        sizes = value if isinstance(value, list) else [value]
        if value is not None and not all(of_type(v, float) and 0 < v <= MAX_SIZE for v in sizes):
            raise MlxGemmaError(f"{source}: field {name} is {_short(value)}, expected a positive size "
                                f"(at most {MAX_SIZE})")
    if kwargs.get("num_hidden_layers", 0) > MAX_LAYERS:
        raise MlxGemmaError(f"{source}: num_hidden_layers {kwargs['num_hidden_layers']} is more than mlxgemma "
                            f"builds ({MAX_LAYERS})")
    heads, kv = kwargs.get("num_attention_heads"), kwargs.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise MlxGemmaError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def check_legacy(legacy: dict, source: str) -> None:
    """The pre-transformers-5 keys that are read (they are not fields, so not type-checked above)."""
    for name, kind in (("rope_scaling", dict), ("rope_theta", float), ("rope_local_base_freq", float),
                       ("partial_rotary_factor", float), ("sliding_window_pattern", int)):
        value = legacy.get(name)
        if value is not None and not of_type(value, kind):
            raise MlxGemmaError(f"{source}: field {name} is {_short(value)}, expected {_NAMES[kind]}")
    pattern = legacy.get("sliding_window_pattern")
    if pattern is not None and not 0 < pattern <= MAX_LAYERS:
        raise MlxGemmaError(f"{source}: sliding_window_pattern is {pattern}, expected a positive layer count")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def single_rope(rope_parameters: Optional[dict], legacy: dict, default_theta: float,
                partial_rotary_factor: Optional[float] = None) -> dict:
    """One rope for every layer (Gemma, Gemma 2, StableLM), as PreTrainedConfig standardises it:
    a legacy rope_scaling replaces rope_parameters, and rope_theta / partial_rotary_factor fill the gaps."""
    params = dict(legacy.get("rope_scaling") or rope_parameters or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", legacy.get("rope_theta", default_theta))
    partial = legacy.get("partial_rotary_factor", partial_rotary_factor)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    check_rope(params, "rope_parameters")
    return params


def check_rope(params: dict, where: str, supported: tuple = SUPPORTED_ROPE_TYPES) -> None:
    rope_type = params.get("rope_type", "default")
    if not isinstance(rope_type, str) or rope_type not in supported:
        raise MlxGemmaError(
            f"{where}.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(supported)})"
        )
    if rope_type == "linear" and not (of_type(params.get("factor"), float) and params["factor"] > 0):
        raise MlxGemmaError(f"{where}: a linear rope needs a positive numeric 'factor'")
    factor = params.get("factor", 1.0)
    if rope_type == "proportional" and not (of_type(factor, float) and factor > 0):
        raise MlxGemmaError(f"{where}.factor is {_short(factor)}, expected a positive number")
    theta = params.get("rope_theta")
    if not (of_type(theta, float) and theta > 0):
        raise MlxGemmaError(f"{where}.rope_theta is {_short(theta)}, expected a positive number")
    partial = params.get("partial_rotary_factor", 1.0)
    if not (of_type(partial, float) and 0 < partial <= 1):
        raise MlxGemmaError(f"{where}.partial_rotary_factor is {_short(partial)}, expected a number in (0, 1]")


def kv_sharing(config) -> None:
    """KV sharing (Gemma 3n, Gemma 4): the last num_kv_shared_layers layers own no keys and values; each reads
    those of the LAST earlier layer of its own type (transformers' "store" layer), which must therefore exist.
    Sets config.first_kv_shared_layer_idx, kv_stores ({type: the last layer of it that computes keys and
    values}) and kv_donors (kv_stores where some layer shares, else empty)."""
    shared, n = config.num_kv_shared_layers, config.num_hidden_layers
    if not (of_type(shared, int) and 0 <= shared < n):
        raise MlxGemmaError(f"config.json: num_kv_shared_layers is {shared!r}, expected "
                            f"0..{n - 1} (at least one layer must compute keys and values)")
    config.first_kv_shared_layer_idx = first = n - shared
    types = config.layer_types
    config.kv_stores = {t: max(i for i in range(first) if types[i] == t) for t in set(types[:first])}
    config.kv_donors = dict(config.kv_stores) if shared else {}
    orphans = sorted(set(types[first:]) - set(config.kv_donors))
    if orphans:
        raise MlxGemmaError(f"config.json: num_kv_shared_layers {shared} leaves the shared {orphans[0]} layers "
                            f"without a layer of that type before them (layers 0..{first - 1}) to take keys and "
                            "values from")


def pattern_layer_types(n_layers: int, pattern: int) -> list:
    """Legacy sliding_window_pattern: layer i is full iff (i + 1) % pattern == 0."""
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def check_layer_types(layer_types: list, n_layers: int) -> None:
    if len(layer_types) != n_layers:
        raise MlxGemmaError(
            f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}"
        )
    bad = sorted(set(layer_types) - {SLIDING, FULL})
    if bad:
        raise MlxGemmaError(
            f"config.json: layer_types holds unsupported type(s) {', '.join(map(repr, bad))} "
            f"(supported: {SLIDING!r}, {FULL!r})"
        )


def text_config_of(d: dict, text_model_type: str = "gemma3_text") -> dict:
    """The text part of a multimodal config (model_type gemma3 or gemma4), with its text model's defaults."""
    text = d.get("text_config") or {}
    if not isinstance(text, dict):
        raise MlxGemmaError(f"config.json: text_config must be an object, got {type(text).__name__}")
    text = dict(text)
    text.setdefault("model_type", text_model_type)
    for key in ("architectures", "quantization"):
        if key in d:
            text.setdefault(key, d[key])
    return text


def as_dict(config: Any) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}

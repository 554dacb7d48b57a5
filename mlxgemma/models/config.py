"""Reading config.json as transformers writes it, old checkpoints included.

Each family declares a dataclass of its fields with transformers' defaults; this base turns a config.json
dict into it: legacy rope keys (rope_theta, rope_scaling, rope_local_base_freq, partial_rotary_factor),
layer_types from legacy patterns, num_labels from id2label, and clear errors for what cannot work.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ..errors import MlxGemmaError

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear")
# Fields that fix the shapes of the weights: a config.json without them cannot describe a checkpoint.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


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

    def __post_init__(self):
        self.resolve(self.extra)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json", require: bool = True) -> "BaseConfig":
        """require=False takes transformers' defaults for the shape fields too (nested text configs
        of multimodal checkpoints leave them out)."""
        missing = [k for k in REQUIRED if d.get(k) is None]
        if missing and require:
            raise MlxGemmaError(
                f"{source} is missing required field(s) {', '.join(missing)}: "
                "pass the config.json that came with the weights"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k != "extra"}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        if d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        _check_types(cls, kwargs, source)
        return cls(**kwargs)

    def resolve(self, legacy: dict) -> None:
        """Fill derived fields (rope per layer type, layer_types) from the legacy keys; families extend it."""

    @property
    def head_dim_(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads


def _check_types(cls, kwargs: dict, source: str) -> None:
    for f in fields(cls):
        if f.name not in kwargs or kwargs[f.name] is None:
            continue
        value, default = kwargs[f.name], f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            raise MlxGemmaError(
                f"{source}: field {f.name} is {value!r}, expected a {type(default).__name__}"
            )


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


def check_rope(params: dict, where: str) -> None:
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MlxGemmaError(
            f"{where}.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "linear" and not isinstance(params.get("factor"), (int, float)):
        raise MlxGemmaError(f"{where}: a linear rope needs a numeric 'factor'")


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


def text_config_of(d: dict) -> dict:
    """The text part of a multimodal Gemma 3 config (model_type gemma3), with gemma3_text defaults."""
    text = dict(d.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    for key in ("architectures", "quantization"):
        if key in d:
            text.setdefault(key, d[key])
    return text


def as_dict(config: Any) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}

"""Gemma 4's text configuration (transformers' Gemma4TextConfig): its fields with transformers' defaults, resolved
to one rope, head size and KV head count per layer type and to the layers that share keys and values; and
what its llama.cpp files (GGUF) say, read in gemma4_checkpoint.py."""

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import MlxGemmaError
from .config import (FULL, MAX_SIZE, SLIDING, BaseConfig, check_layer_types, check_rope, kv_sharing,
                     pattern_layer_types)
from .gemma4_checkpoint import ROPE_FREQS, config_from_gguf, weight_name_from_gguf

ROPE_TYPES = ("default", "linear", "proportional")
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}

@dataclass
class Gemma4TextConfig(BaseConfig):
    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int = 512
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = None  # "all" (bidirectional) or "vision" (images only)
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    # Read by transformers' __post_init__ but not kept: it turns them into per_layer_config overrides of the
    # full layers (which is what save_pretrained then writes, instead of these two).
    global_head_dim: Optional[int] = 512
    num_global_key_value_heads: Optional[int] = None
    per_layer_config: Optional[dict] = None

    writes_legacy_rope_keys = False  # Gemma 4's readers, mlx-lm's too, read only rope_parameters
    gguf_architecture = "gemma4"
    gguf_config_tensors = (ROPE_FREQS,)  # the full layers' proportional rope, read into rope_parameters
    gguf_experts = True
    # As transformers reads these files: Gemma 4's tokenizer adds no BOS (its chat template writes <bos>),
    # though llama.cpp's converter sets the flag (ggml-org/llama.cpp#21500).
    gguf_add_bos = False

    @classmethod
    def from_gguf(cls, gguf) -> dict:
        return config_from_gguf(gguf)

    @classmethod
    def gguf_weight_name(cls, name: str) -> Optional[str]:
        return weight_name_from_gguf(name)

    @classmethod
    def gguf_stop_tokens(cls, has_eot: bool) -> tuple:
        """Gemma 4 ends turns with <turn|> and stops at <|tool_response>, as its generation_config says."""
        return (b"<turn|>", b"<|tool_response>")

    def resolve(self, legacy: dict) -> None:
        if self.use_bidirectional_attention not in (None, "all", "vision"):
            raise MlxGemmaError(f"config.json: use_bidirectional_attention is {self.use_bidirectional_attention!r}, "
                                "expected \"all\", \"vision\" or null")
        if self.bidirectional:
            self.sliding_window = self.sliding_window // 2 + 1  # transformers' conversion, undone on save
        layer_types = list(self.layer_types or pattern_layer_types(self.num_hidden_layers, 6))
        check_layer_types(layer_types, self.num_hidden_layers)
        layer_types[-1] = FULL  # transformers forces the last layer to full attention (with a warning)
        self.layer_types = layer_types
        self.rope_parameters = rope_per_type(self.rope_parameters, self.layer_types, DEFAULT_ROPE)
        self._attention_shapes()
        self._kv_sharing()
        self._check_sizes()

    @property
    def bidirectional(self) -> bool:
        """"vision" only changes the masks of image tokens, which a text model never sees: causal here."""
        return self.use_bidirectional_attention == "all"

    def _attention_shapes(self) -> None:
        """head_dims and kv_heads per layer type. The released configs give global_head_dim (default 512) and
        num_global_key_value_heads (read only with attention_k_eq_v); configs saved by transformers 5 give
        per_layer_config overrides instead, and then those two are ignored, as transformers ignores them."""
        if self.per_layer_config is None:
            full = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                full["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: full for i, t in enumerate(self.layer_types) if t == FULL}
        else:
            overrides = per_layer_overrides(self.per_layer_config, self.num_hidden_layers)
        self.head_dims, self.kv_heads = attention_shapes(self, overrides)

    def _kv_sharing(self) -> None:
        """The last num_kv_shared_layers layers read the keys and values of the last earlier layer of their type
        (config.kv_sharing). The store layers (kv_stores) are read by Gemma 4's assistant drafter
        (gemma4_assistant.py) too, sharing or not."""
        kv_sharing(self)

    def _check_sizes(self) -> None:
        per_layer = self.hidden_size_per_layer_input
        if not (isinstance(per_layer, int) and 0 <= per_layer and per_layer * self.num_hidden_layers <= MAX_SIZE):
            raise MlxGemmaError(f"config.json: hidden_size_per_layer_input is {per_layer!r}, expected 0 (none) or a "
                                "size that fits num_hidden_layers times in an MLX dimension")
        if per_layer and self.vocab_size_per_layer_input < self.vocab_size:
            raise MlxGemmaError(f"config.json: vocab_size_per_layer_input {self.vocab_size_per_layer_input} is "
                                f"smaller than vocab_size {self.vocab_size}: ids past it have no per-layer input")
        if self.enable_moe_block:
            missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if getattr(self, k) is None]
            if missing:
                raise MlxGemmaError(f"config.json: enable_moe_block needs {', '.join(missing)}")
            if self.top_k_experts > self.num_experts:
                raise MlxGemmaError(f"config.json: top_k_experts {self.top_k_experts} is more than num_experts "
                                    f"{self.num_experts}")


def rope_per_type(rope_parameters: Optional[dict], layer_types: list, default: dict) -> dict:
    """One rope per layer type, nested by type (transformers reads no flat or legacy form for Gemma 4 and the
    families built on it); `default` when the config gives none."""
    given = default if rope_parameters is None else rope_parameters
    params = {}
    for t in sorted(set(layer_types)):
        p = given.get(t)
        if not isinstance(p, dict):
            raise MlxGemmaError(f"config.json: rope_parameters has no {t!r} entry (Gemma 4 nests its rope "
                                "parameters by layer type)")
        p = dict(p)
        p.setdefault("rope_type", p.get("type", "default"))
        check_rope(p, f"rope_parameters.{t}", ROPE_TYPES)
        if p["rope_type"] == "linear" and p.get("partial_rotary_factor", 1.0) != 1.0:
            raise MlxGemmaError(f"config.json: rope_parameters.{t} is a partial linear rope, which transformers' "
                                "Gemma 4 cannot apply either (its cos/sin would not cover the head)")
        params[t] = p
    return params


def per_layer_overrides(per_layer_config: dict, num_hidden_layers: int) -> dict:
    """per_layer_config as transformers 5 saves it ({"03": {"head_dim": 512, ...}}) -> {3: {...}}, checked."""
    out = {}
    for key, value in per_layer_config.items():
        index = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= index < num_hidden_layers or not isinstance(value, dict):
            raise MlxGemmaError(f"config.json: per_layer_config key {key!r} is not a layer index with an object")
        unknown = sorted(set(value) - {"head_dim", "num_key_value_heads"})
        if unknown:
            raise MlxGemmaError(f"config.json: per_layer_config overrides {', '.join(unknown)} of layer {index}; "
                                "mlxgemma reads only head_dim and num_key_value_heads there")
        out[index] = value
    return out


def attention_shapes(config, overrides: dict) -> tuple:
    """({layer type: head size}, {layer type: KV heads}) of a config (head_dim, num_key_value_heads,
    num_attention_heads, layer_types) with per-layer overrides, each type of one shape, checked."""
    base = {"head_dim": config.head_dim, "num_key_value_heads": config.num_key_value_heads}
    shapes = {}
    for i, t in enumerate(config.layer_types):
        layer = dict(base, **overrides.get(i, {}))
        if shapes.setdefault(t, layer) != layer:
            raise MlxGemmaError(f"config.json: per_layer_config gives {t} layers different head sizes or KV heads; "
                                "Gemma 4 takes one shape per layer type (as transformers' rope does)")
    heads = config.num_attention_heads
    for t, s in shapes.items():
        d, kv = s["head_dim"], s["num_key_value_heads"]
        if not (isinstance(d, int) and 0 < d <= MAX_SIZE and d % 2 == 0):
            raise MlxGemmaError(f"config.json: the {t} layers' head_dim is {d!r}, expected a positive even size")
        if not (isinstance(kv, int) and 0 < kv and heads % kv == 0):
            raise MlxGemmaError(f"config.json: the {t} layers have {kv!r} KV heads, which must divide "
                                f"num_attention_heads {heads}")
        if heads * d > MAX_SIZE:
            raise MlxGemmaError("config.json: num_attention_heads x head_dim is more than an MLX dimension holds")
    return {t: s["head_dim"] for t, s in shapes.items()}, {t: s["num_key_value_heads"] for t, s in shapes.items()}

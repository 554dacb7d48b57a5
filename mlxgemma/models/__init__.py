"""The registry: config.json's model_type and architectures -> config class and model class."""

from ..errors import MlxGemmaError
from . import (embedding_gemma2, gemma, gemma2, gemma3, gemma3_vision, gemma3n, gemma3n_multimodal, gemma4,
               gemma4_assistant, gemma4_multimodal, gemma4_unified, stablelm, t5gemma2)
from .config import text_config_of

# model_type -> (config class, family module, the class used when config.json names no architecture)
FAMILIES = {
    "gemma": (gemma.GemmaConfig, gemma.GemmaForCausalLM),
    "gemma2": (gemma2.Gemma2Config, gemma2.Gemma2ForCausalLM),
    "gemma3_text": (gemma3.Gemma3TextConfig, gemma3.Gemma3ForCausalLM),
    "gemma3": (gemma3_vision.Gemma3Config, gemma3_vision.Gemma3ForConditionalGeneration),
    "gemma3n_text": (gemma3n.Gemma3nTextConfig, gemma3n.Gemma3nForCausalLM),
    "gemma3n": (gemma3n_multimodal.Gemma3nConfig, gemma3n_multimodal.Gemma3nForConditionalGeneration),
    "gemma4_text": (gemma4.Gemma4TextConfig, gemma4.Gemma4ForCausalLM),
    "gemma4": (gemma4_multimodal.Gemma4Config, gemma4_multimodal.Gemma4ForConditionalGeneration),
    "gemma4_unified": (gemma4_unified.Gemma4UnifiedConfig, gemma4_unified.Gemma4UnifiedForConditionalGeneration),
    "gemma4_assistant": (gemma4_assistant.Gemma4AssistantConfig, gemma4_assistant.Gemma4AssistantForCausalLM),
    "gemma4_unified_assistant": (gemma4_assistant.Gemma4UnifiedAssistantConfig,
                                 gemma4_assistant.Gemma4UnifiedAssistantForCausalLM),
    "stablelm": (stablelm.StableLmConfig, stablelm.StableLmForCausalLM),
    "t5gemma2": (t5gemma2.T5Gemma2Config, t5gemma2.T5Gemma2ForConditionalGeneration),
    "embedding_gemma2": (embedding_gemma2.EmbeddingGemma2Config, embedding_gemma2.EmbeddingGemma2Model),
    "embedding_gemma2_text": (embedding_gemma2.EmbeddingGemma2TextConfig, embedding_gemma2.EmbeddingGemma2TextModel),
}

CLASSES = {
    cls.__name__: cls
    for cls in (
        gemma.GemmaModel, gemma.GemmaForCausalLM, gemma.GemmaForSequenceClassification,
        gemma.GemmaForTokenClassification,
        gemma2.Gemma2Model, gemma2.Gemma2ForCausalLM, gemma2.Gemma2ForSequenceClassification,
        gemma2.Gemma2ForTokenClassification,
        gemma3.Gemma3TextModel, gemma3.Gemma3ForCausalLM, gemma3.Gemma3TextForSequenceClassification,
        gemma3_vision.Gemma3ForConditionalGeneration, gemma3_vision.Gemma3ForSequenceClassification,
        gemma3n.Gemma3nTextModel, gemma3n.Gemma3nForCausalLM, gemma3n_multimodal.Gemma3nForConditionalGeneration,
        gemma4.Gemma4TextModel, gemma4.Gemma4ForCausalLM, gemma4_multimodal.Gemma4ForConditionalGeneration,
        gemma4_unified.Gemma4UnifiedForConditionalGeneration, gemma4_assistant.Gemma4AssistantForCausalLM,
        gemma4_assistant.Gemma4UnifiedAssistantForCausalLM,
        stablelm.StableLmModel, stablelm.StableLmForCausalLM, stablelm.StableLmForSequenceClassification,
        stablelm.StableLmForTokenClassification,
        t5gemma2.T5Gemma2Model, t5gemma2.T5Gemma2ForConditionalGeneration,
        t5gemma2.T5Gemma2ForSequenceClassification, t5gemma2.T5Gemma2ForTokenClassification,
        embedding_gemma2.EmbeddingGemma2TextModel, embedding_gemma2.EmbeddingGemma2Model,
    )
}


# The text model of each multimodal model_type that loads as its text part alone.
TEXT_PARTS = {"gemma3": gemma3.Gemma3ForCausalLM, "gemma4": gemma4.Gemma4ForCausalLM,
              "gemma3n": gemma3n.Gemma3nForCausalLM}


def _text_only(d: dict) -> bool:
    """A multimodal model_type whose config.json has no tower (mlx-lm's conversions): its text part. (A config
    that names towers whose weights the checkpoint lacks loads as the text part too: the model's part_for.)"""
    return d.get("model_type") in ("gemma3", "gemma4", "gemma3n") and d.get("vision_config") is None \
        and d.get("audio_config") is None


def has_vision(model) -> bool:
    """A decoder-only model that takes images (Gemma 3 with its tower): loads with a processor."""
    return bool(getattr(model, "has_vision", False))


def is_drafter(model) -> bool:
    """Gemma 4's assistant: drafts for a Gemma 4 from its states (--draft-model); runs on no model of its own."""
    return bool(getattr(model, "is_drafter", False))


def is_embedder(model) -> bool:
    """EmbeddingGemma 2: encodes inputs into last_hidden_state (B, L, embedding_dim) to pool; no head, no cache,
    nothing to generate."""
    return bool(getattr(model, "is_embedder", False))


def is_encoder_decoder(model) -> bool:
    """T5Gemma 2: loads with a processor, generates per request (encoder once), has no chat cache."""
    return bool(getattr(model, "is_encoder_decoder", False))


def config_class_for(d: dict):
    """The config class of config.json's model_type (checked by config_from_dict)."""
    return FAMILIES[d.get("model_type")][0]


def gguf_families() -> dict:
    """llama.cpp's general.architecture -> (config class, model class) of each family whose GGUF files load."""
    return {config.gguf_architecture: (config, FAMILIES[config.model_type][1])
            for config, _ in FAMILIES.values() if config.gguf_architecture}


# model_types of configs that were replaced on the Hub: what to do instead.
SUPERSEDED = {"stablelm_epoch": "the remote-code StableLM config of 2023; the checkpoint's current revision on the "
                                "Hub (model_type stablelm) loads"}


def config_from_dict(d: dict, source: str = "config.json"):
    if not isinstance(d, dict):
        raise MlxGemmaError(f"{source} must be a JSON object")
    model_type = d.get("model_type")
    if not isinstance(model_type, str) and model_type is not None:
        raise MlxGemmaError(f"{source}: model_type must be a string, got {type(model_type).__name__}")
    if model_type in SUPERSEDED:
        raise MlxGemmaError(f"{source} has model_type {model_type!r}: {SUPERSEDED[model_type]}")
    if model_type not in FAMILIES:
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise MlxGemmaError(f"{source} has {what}; supported: {', '.join(FAMILIES)}")
    config_class, _ = FAMILIES[model_type]
    if model_type == "gemma3" and _text_only(d):  # an mlx-lm conversion: the text part only
        return gemma3.Gemma3TextConfig.from_dict(text_config_of(d), source=f"{source} (text_config)", require=False)
    if model_type == "gemma4" and _text_only(d):
        text = text_config_of(d, model_type + "_text")
        return gemma4.Gemma4TextConfig.from_dict(text, source=f"{source} (text_config)", require=False)
    if model_type == "gemma3n" and _text_only(d):  # (the head tied as the top-level config says, as transformers)
        text = dict(text_config_of(d, "gemma3n_text"), tie_word_embeddings=d.get("tie_word_embeddings", True))
        return gemma3n.Gemma3nTextConfig.from_dict(text, source=f"{source} (text_config)", require=False)
    if model_type in ("gemma3", "gemma3n", "gemma4", "gemma4_unified", "gemma4_assistant",
                      "gemma4_unified_assistant", "t5gemma2", "embedding_gemma2"):  # shapes in sub-configs, defaulted
        return config_class.from_dict(d, source=source, require=False)
    return config_class.from_dict(d, source=source)


def model_class_for(d: dict):
    """The class named by config.json's architectures, checked against its model_type."""
    model_type = d.get("model_type")
    default = FAMILIES[model_type][1]
    if _text_only(d):
        return TEXT_PARTS[model_type]
    names = d.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MlxGemmaError("config.json: architectures must be a list of class names")
    if not names:
        return default
    cls = CLASSES.get(names[0])
    if cls is None or cls.__module__ != default.__module__:
        raise MlxGemmaError(
            f"config.json names architecture {names[0]!r}, which mlxgemma does not offer for model_type "
            f"{model_type!r}; offered: {', '.join(n for n, c in CLASSES.items() if c.__module__ == default.__module__)}"
        )
    return cls

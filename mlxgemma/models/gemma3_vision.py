"""Gemma 3 with images (model_type gemma3: gemma-3-4b/12b/27b and their QAT releases). A SigLIP tower encodes
each image; the projector average-pools its patch grid to mm_tokens_per_image tokens, applies the soft-embedding
RMSNorm and projects them to the text width; those features replace the scaled embeddings at the image tokens.
The text model is Gemma 3's, with transformers' mask for images: causal, plus attention among the tokens of one
image (future ones included) on every layer, the sliding window still bounding the sliding layers. The block
mask applies only where token_type_ids are given (the processor gives them; transformers' generate passes
them for the prefill only).

Modules are named as mlx-vlm and mlx-lm name them (language_model.model.*, vision_tower.vision_model.*,
multi_modal_projector.*), which is also the older transformers layout; the current one (model.language_model.*)
loads too. So our converted checkpoints load in mlx-vlm, mlx-lm (text part) and transformers alike.
Reference: transformers/models/gemma3 (Gemma3Model, Gemma3ForConditionalGeneration)."""

import copy
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import PreTrainedModel, RMSNorm, WithLanguageModel, as_input_ids, image_blocks, scaled_embedding
from .config import FULL, SLIDING, BaseConfig, pattern_layer_types
from .gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextForSequenceClassification
from .heads import causal_lm_loss, sequence_classification_loss
from .siglip import SiglipVisionConfig, SiglipVisionModel


def check_mm_tokens(mm_tokens_per_image: int, vision: SiglipVisionConfig) -> None:
    side = int(mm_tokens_per_image**0.5)
    if side * side != mm_tokens_per_image or vision.patches_per_side < side:
        raise MlxGemmaError(f"config.json: mm_tokens_per_image {mm_tokens_per_image} must be a square of at most "
                            f"{vision.patches_per_side ** 2} (the vision tower's patch grid)")


@dataclass
class Gemma3Config(BaseConfig):
    model_type: str = "gemma3"
    text_config: Any = None
    vision_config: Any = None
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    writes_legacy_rope_keys = False  # its rope parameters are nested in text_config

    def resolve(self, legacy: dict) -> None:
        text = dict(self.text_config or {}) if isinstance(self.text_config, dict) else self.text_config
        if not isinstance(text, dict):
            raise MlxGemmaError("config.json: text_config must be an object")
        # The top-level flag ties the LM head (transformers' _tied_weights_keys read the outer config), and
        # the heads' fields live at the top level too.
        text.update(model_type="gemma3_text", tie_word_embeddings=self.tie_word_embeddings,
                    num_labels=self.num_labels, problem_type=self.problem_type)
        text.pop("id2label", None)
        self.text_config = Gemma3TextConfig.from_dict(text, "config.json text_config", require=False)
        self.vision_config = SiglipVisionConfig.from_dict(self.vision_config or {}, "config.json vision_config",
                                                          require=False)
        check_mm_tokens(self.mm_tokens_per_image, self.vision_config)

    def __getattr__(self, name: str):
        """What generation reads of a decoder's config (vocab_size, eos_token_id, layer_types, ...) is the text
        model's, as transformers' get_text_config()."""
        if name.startswith("__") or "text_config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.text_config, name)


class Gemma3MultiModalProjector(nn.Module):
    """SigLIP patches -> k x k average pools (row-major) -> soft-embedding RMSNorm -> x @ W (vision_dim, hidden).
    Also T5Gemma 2's (a config with vision_config, text_config and mm_tokens_per_image)."""

    def __init__(self, config):
        super().__init__()
        vision = config.vision_config
        self.mm_input_projection_weight = mx.zeros((vision.hidden_size, config.text_config.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.patches_per_side = vision.patches_per_side
        self.kernel = self.patches_per_side // int(config.mm_tokens_per_image**0.5)

    def __call__(self, vision_outputs: mx.array) -> mx.array:
        N, _, Dv = vision_outputs.shape
        P, k = self.patches_per_side, self.kernel
        t = P // k  # AvgPool2d(k, stride=k) drops a remainder
        x = vision_outputs.reshape(N, P, P, Dv)[:, : t * k, : t * k]
        x = x.reshape(N, t, k, t, k, Dv).mean(axis=(2, 4)).reshape(N, t * t, Dv)
        return (self.mm_soft_emb_norm(x) @ self.mm_input_projection_weight).astype(vision_outputs.dtype)


def merge_image_features(input_ids: mx.array, h: mx.array, features: mx.array, image_token: int) -> mx.array:
    """Features fill the image-token slots in (batch, sequence) order, as transformers' masked_scatter."""
    slots = (input_ids == image_token).reshape(-1)
    D = features.shape[-1]
    n_slots, given = slots.sum().item(), features.size // D
    if n_slots != given:
        raise MlxGemmaError(f"input_ids hold {n_slots} image tokens but the image(s) give {given} features: "
                            "prepare text and images together with the model's processor")
    index = mx.maximum(mx.cumsum(slots.astype(mx.int32)) - 1, 0)
    merged = mx.where(slots[:, None], features.reshape(-1, D).astype(h.dtype)[index], h.reshape(-1, D))
    return merged.reshape(h.shape)


class Gemma3VisionTower(nn.Module):
    """transformers' SiglipVisionModel: the transformer one level down, as `vision_model`."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(config)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.vision_model(pixel_values)


_LAYOUT = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."),
           ("score.", "language_model.score."))


class _Gemma3WithImages(WithLanguageModel, PreTrainedModel):
    """Tower, projector and a Gemma 3 text head (`text_head_class`) whose inputs get the image features."""

    text_head_class = None
    has_vision = True
    vision_tower_name = "vision_tower"
    readme_usage = ("```python\nimport mlxgemma\nmodel, processor = mlxgemma.load(\"path/to/this/folder\")\n"
                    "print(mlxgemma.generate(model, processor, \"Describe this photo.\", image=\"photo.jpg\"))\n```\n"
                    "It also loads with `mlx_vlm.load` (and its text part with `mlx_lm.load`).\n")

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.vision_tower = Gemma3VisionTower(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.language_model = self.text_head_class(config.text_config)

    def part_for(self, weights: dict):
        """A checkpoint without its tower (mlx-lm's converter drops it) fills the text model alone."""
        if any(k.startswith("vision_tower.") for k in weights):
            return self, weights
        return self.language_model, {k.removeprefix("language_model."): v for k, v in weights.items()}

    def load_processor(self, path, tokenizer):
        from ..media.processor import Gemma3Processor

        return Gemma3Processor.from_pretrained(path, tokenizer, self.config)

    def get_image_features(self, pixel_values) -> mx.array:
        """(N, 3, S, S) -> (N, mm_tokens_per_image, hidden)."""
        return self.multi_modal_projector(self.vision_tower(mx.array(pixel_values)))

    def encode_media(self, items: list) -> list:
        """Processed images ({"pixel_values": (1, 3, S, S)} each) -> one (tokens, hidden) array each."""
        return list(self.get_image_features(np.concatenate([i["pixel_values"] for i in items])))

    def media_inputs(self, features, token_types) -> dict:
        """The keywords that give a forward already-encoded image features, (slots, D), and token types."""
        return {"image_features": features, "token_type_ids": token_types}

    def text_inputs(self, input_ids, pixel_values=None, image_features=None, token_type_ids=None):
        """(ids, the text head's extra inputs): embeddings with the image features spliced in, and the
        image blocks when token_type_ids are given. image_features (get_image_features) stand in for
        pixel_values, e.g. for an image already encoded."""
        config = self.config
        ids = as_input_ids(_image_ids_in_vocab(input_ids, config), config.vocab_size)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        raw = input_ids if isinstance(input_ids, mx.array) else mx.array(input_ids)
        raw = raw if raw.ndim == 2 else raw[None]
        inputs = {}
        if image_features is not None:
            table = self.language_model.model.embed_tokens
            h = scaled_embedding(table, ids, config.text_config.hidden_size)
            inputs["inputs_embeds"] = merge_image_features(raw, h, image_features, config.image_token_index)
        elif raw.shape[1] > 1 and bool((raw == config.image_token_index).any()):  # (no sync per decode step)
            raise MlxGemmaError("input_ids hold image tokens but no image was given (pixel_values or image_features)")
        if token_type_ids is not None:
            inputs["blocks"] = image_blocks(token_type_ids)
        return ids, inputs

    def checkpoint(self, weights: dict, config: dict):
        """What the converter writes: our names (mlx-vlm's), and in text_config the keys mlx-vlm's Gemma 3
        reads there (mm_tokens_per_image, sliding_window_pattern, rope_global/local_base_freq, rope_scaling;
        transformers reads the top-level mm_tokens_per_image, layer_types and rope_parameters instead)."""
        text_config = self.config.text_config
        rope = text_config.rope_parameters
        text = dict(config.get("text_config") or {}, mm_tokens_per_image=self.config.mm_tokens_per_image,
                    rope_global_base_freq=rope[FULL]["rope_theta"], rope_local_base_freq=rope[SLIDING]["rope_theta"])
        if rope[FULL].get("rope_type") == "linear":  # mlx-vlm reads the full layers' scaling only from here
            text.setdefault("rope_scaling", {"rope_type": "linear", "factor": rope[FULL]["factor"]})
        n = text_config.num_hidden_layers
        pattern = next((k for k in range(1, n + 1) if pattern_layer_types(n, k) == text_config.layer_types), None)
        if pattern:
            text["sliding_window_pattern"] = pattern
        return weights, dict(config, text_config=text)

    def sanitize(self, weights: dict) -> dict:
        """Either transformers layout, or mlx-vlm's (ours): the tower's convolution to MLX's layout."""
        out, tower = {}, {}
        for k, v in weights.items():
            for old, new in _LAYOUT:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            if k.startswith("vision_tower."):
                tower[k.removeprefix("vision_tower.")] = v
            else:
                out[k] = v
        out = {f"language_model.{k}": v for k, v in self.language_model.sanitize(
            {k.removeprefix("language_model."): v for k, v in out.items() if k.startswith("language_model.")}).items()
        } | {k: v for k, v in out.items() if not k.startswith("language_model.")}
        out.update({f"vision_tower.vision_model.{k}": v
                    for k, v in self.vision_tower.vision_model.sanitize(tower).items()})
        return out


def _image_ids_in_vocab(input_ids, config: Gemma3Config):
    """transformers gives an image token outside the vocabulary id 0 before the embedding lookup."""
    if config.image_token_index < config.vocab_size:
        return input_ids
    ids = input_ids if isinstance(input_ids, mx.array) else mx.array(input_ids)
    return mx.where(ids == config.image_token_index, 0, ids)


class Gemma3ForConditionalGeneration(_Gemma3WithImages):
    """model(input_ids, pixel_values=..., token_type_ids=...) -> logits (B, L, vocab). Without images it is
    Gemma 3's text model (mlx-lm's interface: __call__(inputs, cache=None), layers, make_cache)."""

    text_head_class = Gemma3ForCausalLM

    def __init__(self, config: Gemma3Config):
        super().__init__(config)
        # As transformers' Gemma3ForConditionalGeneration (5.23): no final logit softcap, whatever text_config
        # says (only its text-only Gemma3ForCausalLM applies one). attn_logit_softcapping is applied by no Gemma 3
        # attention, there or here. The text head reads its own copy of the text config, without the cap.
        text = copy.copy(config.text_config)
        text.final_logit_softcapping = None
        self.language_model.config = text

    def __call__(self, input_ids, attention_mask=None, cache=None, pixel_values=None, image_features=None,
                 token_type_ids=None) -> mx.array:
        ids, inputs = self.text_inputs(input_ids, pixel_values, image_features, token_type_ids)
        return self.language_model(ids, attention_mask=attention_mask, cache=cache, **inputs)

    def loss(self, input_ids, labels, attention_mask=None, pixel_values=None, token_type_ids=None,
             num_items_in_batch: Optional[int] = None) -> mx.array:
        logits = self(input_ids, attention_mask, pixel_values=pixel_values, token_type_ids=token_type_ids)
        return causal_lm_loss(logits, labels, num_items_in_batch)


class Gemma3ForSequenceClassification(_Gemma3WithImages):
    """Pooled at each row's rightmost non-pad token -> (B, num_labels)."""

    text_head_class = Gemma3TextForSequenceClassification

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_features=None,
                 token_type_ids=None) -> mx.array:
        ids, inputs = self.text_inputs(input_ids, pixel_values, image_features, token_type_ids)
        return self.language_model(ids, attention_mask=attention_mask, **inputs)

    def loss(self, input_ids, labels, attention_mask=None, pixel_values=None, token_type_ids=None) -> mx.array:
        pooled = self(input_ids, attention_mask, pixel_values=pixel_values, token_type_ids=token_type_ids)
        return sequence_classification_loss(pooled, labels, self.config.text_config)

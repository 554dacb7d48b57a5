"""Gemma 3n with images and audio (model_type gemma3n, transformers' Gemma3nForConditionalGeneration): Gemma 3n's
text model (gemma3n.py), the audio tower (gemma3n_audio.py: a Conformer over log-mel frames) and the vision tower
(timm's MobileNet-v5, restated in gemma3n_vision.py), each through its multimodal embedder.

What transformers' Gemma3nModel.forward does, and so this:
- Every token is embedded by the text table; ids in the vision range [embed_vision.vocab_offset,
  embed_audio.vocab_offset) and the audio range (>= embed_audio.vocab_offset) are replaced by their "hard"
  embeddings through embed_vision / embed_audio (the end-of-image and end-of-audio tokens are such ids, and so are
  the placeholders until the towers' features replace them). Decode steps embed so too.
- The per-layer inputs take the raw ids (ids past the per-layer table read its row 0) and a projection of the
  merged embeddings, media features included (Gemma3nTextModel with inputs_embeds does that).
- A clip gives audio_soft_tokens_per_image (188) soft tokens whatever its length: the tower's padded frames, and
  the tokens past its output, are the hard embedding of the last text-vocabulary id (transformers' padding).
- An image gives vision_soft_tokens_per_image (256): the tower's output, times sqrt(hidden_size), soft-embedded.
The mask is the text model's (causal, sliding): Gemma 3n attends causally inside media blocks.

Modules are named as mlx-vlm names them (language_model.model.*, audio_tower.*, vision_tower.timm_model.*,
embed_audio.*, embed_vision.*); transformers' layout (model.language_model.*, ...) loads too. A checkpoint
without tower weights (mlx-lm's conversions keep the towers in config.json) loads as its text model.
Reference: transformers/models/gemma3n/modeling_gemma3n.py (Gemma3nModel, Gemma3nForConditionalGeneration)."""

from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
import numpy as np

from ..errors import MlxGemmaError
from .common import WithLanguageModel, as_input_ids, scaled_embedding
from .config import BaseConfig
from .gemma3n import Gemma3nForCausalLM, Gemma3nPreTrainedModel, Gemma3nTextConfig
from .gemma3n_audio import Gemma3nAudioConfig, Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder
from .gemma4_multimodal import scatter

IMAGE, AUDIO = 1, 3  # transformers' mm_token_type_ids


def vision_tower(vision_config: dict):
    """The vision tower built from config.json's vision_config (timm's MobileNet-V5 in MLX: gemma3n_vision.py).
    It takes pixel values (N, 3, H, W) in soft_tokens(), returning (N, vision_soft_tokens_per_image,
    hidden_size) already scaled by sqrt(hidden_size), and fixes its weights' layout in sanitize()."""
    from .gemma3n_vision import Gemma3nVisionConfig, Gemma3nVisionModel

    return Gemma3nVisionModel(Gemma3nVisionConfig.from_dict(vision_config, "config.json vision_config", require=False))


@dataclass
class Gemma3nVisionEmbedding(BaseConfig):
    """What embed_vision reads of transformers' Gemma3nVisionConfig (the tower reads the whole dict)."""

    model_type: str = "gemma3n_vision"
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6


@dataclass
class Gemma3nConfig(BaseConfig):
    model_type: str = "gemma3n"
    text_config: Any = None
    vision_config: Any = None
    audio_config: Any = None
    audio_soft_tokens_per_image: int = 188
    vision_soft_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def resolve(self, legacy: dict) -> None:
        for name in ("text_config", "vision_config", "audio_config"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise MlxGemmaError(f"config.json: {name} must be an object")
        # The head is tied as the top-level config says, as transformers ties it.
        text = dict(self.text_config or {}, model_type="gemma3n_text", tie_word_embeddings=self.tie_word_embeddings)
        self.text_config = Gemma3nTextConfig.from_dict(text, "config.json text_config", require=False)
        self.vision_source = self.vision_config  # (the tower's own config, read whole by the tower)
        if self.vision_config is not None:
            self.vision_config = Gemma3nVisionEmbedding.from_dict(self.vision_config, "config.json vision_config",
                                                                  require=False)
        if self.audio_config is not None:
            self.audio_config = Gemma3nAudioConfig.from_dict(self.audio_config, "config.json audio_config",
                                                             require=False)
        # (The token ids are checked where they are used: a checkpoint without tower weights runs as its text
        # model, whose config may leave them at the released values, past a small vocabulary.)
        for name in ("audio_soft_tokens_per_image", "vision_soft_tokens_per_image"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise MlxGemmaError(f"config.json: {name} is {getattr(self, name)!r}, expected a positive count")

    def __getattr__(self, name: str):
        """What generation reads of a decoder's config is the text model's, as transformers' get_text_config()."""
        if name.startswith("__") or "text_config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.text_config, name)


def hard_embedding(embedder: Gemma3nMultimodalEmbedder, ids: mx.array) -> mx.array:
    """embedder(input_ids=ids) for ids known to be in its range, without the range check's sync (a decode step
    embeds so too)."""
    h = embedder.hard_embedding_norm(embedder.embedding(ids - embedder.vocab_offset))
    return embedder.embedding_post_projection_norm(embedder.embedding_projection(h))


def _array(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


class Gemma3nForConditionalGeneration(WithLanguageModel, Gemma3nPreTrainedModel):
    """model(input_ids, pixel_values=..., input_features=..., input_features_mask=..., attention_mask=...,
    cache=...) -> logits (B, L, vocab), with transformers' keyword names (input_features_mask: True = a real
    frame, the processor's). media_features (n, D): every placeholder's features already encoded, in prompt
    order (encode_media's output, concatenated), stand in for the media."""

    has_vision = True
    vision_tower_name = "vision_tower"
    checkpoint_name = "Gemma 3n"
    media_weights = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
    readme_usage = ("```python\nimport mlxgemma\nmodel, processor = mlxgemma.load(\"path/to/this/folder\")\n"
                    "print(mlxgemma.generate(model, processor, \"Transcribe this.\", audio=\"memo.wav\"))\n```\n")

    def __init__(self, config: Gemma3nConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = Gemma3nForCausalLM(text)
        if config.vision_config is not None:
            self.vision_tower = vision_tower(config.vision_source)
            self.embed_vision = Gemma3nMultimodalEmbedder(config.vision_config, text)
        if config.audio_config is not None:
            self.audio_tower = Gemma3nAudioEncoder(config.audio_config)
            self.embed_audio = Gemma3nMultimodalEmbedder(config.audio_config, text)

    @property
    def media_token_ids(self) -> dict:
        """Placeholder id -> its mm_token_type (what the towers fill)."""
        return {self.config.image_token_id: IMAGE, self.config.audio_token_id: AUDIO}

    def in_vision_tower(self, path: str) -> bool:
        """Both towers and their embedders stay whole on every rank and keep their own bits."""
        return any(f".{n}." in f".{path}." for n in ("vision_tower", "embed_vision")) or self.in_audio_tower(path)

    def in_audio_tower(self, path: str) -> bool:
        return any(f".{n}." in f".{path}." for n in ("audio_tower", "embed_audio"))

    def load_processor(self, path, tokenizer):
        from ..media.gemma3n_processor import Gemma3nProcessor

        return Gemma3nProcessor.from_pretrained(path, tokenizer, self.config)

    def media_inputs(self, features: Optional[mx.array], token_types) -> dict:
        """The keywords that give a forward already-encoded media features (token types: Gemma 3n's mask needs
        none)."""
        return {"media_features": features}

    # The towers: one (soft tokens, D) array per item, after the embedder.

    def get_image_features(self, pixel_values) -> List[mx.array]:
        """Images (N, 3, H, W) -> one (vision_soft_tokens_per_image, D) array per image."""
        if "embed_vision" not in self:
            raise MlxGemmaError("this Gemma 3n checkpoint has no vision_config: it takes no images")
        features = self.embed_vision(inputs_embeds=self.vision_tower.soft_tokens(_array(pixel_values)))
        return list(features)

    def get_audio_features(self, input_features, input_features_mask) -> List[mx.array]:
        """Log-mel features (N, T, mels) and their mask (True = a real frame) -> one (audio_soft_tokens_per_image,
        D) array per clip: the tower's padded frames and the tokens past its output are the padding embedding."""
        if "audio_tower" not in self:
            raise MlxGemmaError("this Gemma 3n checkpoint has no audio tower: it takes no audio")
        hidden, padded = self.audio_tower(_array(input_features), ~_array(input_features_mask, mx.bool_))
        features = self.embed_audio(inputs_embeds=hidden)
        # transformers pads with embed_audio's embedding of the last text-vocabulary id (the last audio id)
        pad = self.embed_audio(input_ids=mx.array([self.config.text_config.vocab_size - 1]))
        features = mx.where(padded[..., None], pad.astype(features.dtype), features)
        N, n, D = features.shape
        total = self.config.audio_soft_tokens_per_image
        if n > total:
            raise MlxGemmaError(f"a clip gives {n} audio soft tokens, more than the {total} the model takes "
                                "(audio_soft_tokens_per_image): give at most 30 s")
        features = mx.concatenate([features, mx.broadcast_to(pad.astype(features.dtype), (N, total - n, D))], 1)
        return list(features)

    def encode_media(self, items: List[dict]) -> List[mx.array]:
        """Processed items (the processor's `prepare`) -> one (tokens, D) array each."""
        out = []
        for item in items:
            if "pixel_values" in item:
                out.append(self.get_image_features(item["pixel_values"])[0])
            elif "input_features" in item:
                out.append(self.get_audio_features(item["input_features"], item["input_features_mask"])[0])
            else:
                raise MlxGemmaError(f"a media item holds {sorted(item)}: expected an image or a clip")
        return out

    def embed(self, ids: mx.array) -> mx.array:
        """Text embeddings, with the ids of the vision and audio ranges embedded by their embedders (transformers
        computes both embedders over every id, dummies outside their ranges, and picks by range)."""
        text = self.config.text_config
        h = scaled_embedding(self.language_model.model.embed_tokens, ids, text.hidden_size)
        audio_start = self.embed_audio.vocab_offset if "embed_audio" in self else None
        if "embed_vision" in self:
            v = self.embed_vision
            end = audio_start if audio_start is not None else v.vocab_offset + v.vocab_size
            in_range = (ids >= v.vocab_offset) & (ids < end)
            hard = hard_embedding(v, mx.where(in_range, ids, v.vocab_offset + v.vocab_size - 1))
            h = mx.where(in_range[..., None], hard.astype(h.dtype), h)
        if audio_start is not None:
            a = self.embed_audio
            in_range = ids >= audio_start
            hard = hard_embedding(a, mx.where(in_range, ids, audio_start + a.vocab_size - 1))
            h = mx.where(in_range[..., None], hard.astype(h.dtype), h)
        return h

    def text_inputs(self, input_ids, pixel_values=None, input_features=None, input_features_mask=None,
                    media_features=None):
        """(ids, the text model's extra inputs: the merged embeddings). The ids stay as given: the per-layer
        inputs read them (the placeholders' own rows: row 0, past the per-layer table in released checkpoints)."""
        ids = as_input_ids(input_ids, self.config.text_config.vocab_size)
        h = self.embed(ids)
        given = [x for x in (pixel_values, input_features) if x is not None]
        if media_features is not None and given:
            raise MlxGemmaError("give media_features or the media themselves, not both")
        image_slots, audio_slots = ids == self.config.image_token_id, ids == self.config.audio_token_id
        if media_features is not None:
            return ids, {"inputs_embeds": scatter(h, image_slots | audio_slots, _array(media_features), "media")}
        if pixel_values is not None:
            h = scatter(h, image_slots, mx.concatenate(self.get_image_features(pixel_values)), "image")
        if input_features is not None:
            if input_features_mask is None:
                raise MlxGemmaError("input_features need their input_features_mask (the processor gives it)")
            h = scatter(h, audio_slots, mx.concatenate(self.get_audio_features(input_features, input_features_mask)),
                        "audio")
        return ids, {"inputs_embeds": h}

    def __call__(self, input_ids, attention_mask=None, cache=None, pixel_values=None, input_features=None,
                 input_features_mask=None, token_type_ids=None, media_features=None, return_hidden=False):
        """token_type_ids (the processor's) are taken and unused, as in transformers."""
        ids, inputs = self.text_inputs(input_ids, pixel_values, input_features, input_features_mask, media_features)
        return self.language_model(ids, attention_mask=attention_mask, cache=cache, return_hidden=return_hidden,
                                   **inputs)

    def calibration_forward(self, input_ids: mx.array) -> mx.array:
        return self(input_ids)

    def sanitize(self, weights: dict) -> dict:
        """Either layout (transformers' model.*, or mlx-vlm's); each tower's own key fixes (its sanitize); the
        weights of a tower the config leaves out dropped."""
        out = self.with_language_model_weights(weights)
        for name in ("vision_tower", "audio_tower"):
            part = {k.removeprefix(name + "."): v for k, v in out.items() if k.startswith(name + ".")}
            out = {k: v for k, v in out.items() if not k.startswith(name + ".")}
            if part and name in self:
                out.update({f"{name}.{k}": v for k, v in getattr(self, name).sanitize(part).items()})
        for embedder in ("embed_vision", "embed_audio"):
            if embedder not in self:
                out = {k: v for k, v in out.items() if not k.startswith(embedder + ".")}
        return out

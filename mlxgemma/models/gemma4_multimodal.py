"""Gemma 4 with images, audio and video (model_type gemma4: every Gemma 4 checkpoint sees, E2B/E4B also hear).
A vision tower (gemma4_vision.py) encodes each image, or each frame of a video, into a number of soft tokens
that follows its size; an audio tower (gemma4_audio.py) encodes a clip into about one token per 40 ms. Each
tower's output goes through its multimodal embedder (an RMSNorm without weight, then a linear map to the text
width) and replaces the embeddings at the placeholder tokens, which are otherwise embedded as the pad token
(transformers does so, so that a placeholder's own per-layer input is the pad token's). The per-layer inputs
of E2B/E4B project the merged embeddings.

Masks, as transformers' create_masks_for_vision_model: when the text config says use_bidirectional_attention
"vision" and the token types are given (the processor gives them; generation passes them for the prefill),
the tokens of one image or one video frame see each other, future ones included, on the sliding layers only
(still within the window); full layers stay causal. Audio tokens are causal.

Modules are named as mlx-vlm names them (language_model.model.*, vision_tower.*, audio_tower.*, embed_vision.*,
embed_audio.*); transformers' layout (model.language_model.*, ...) loads too.
Reference: transformers/models/gemma4 (Gemma4Model, Gemma4ForConditionalGeneration, Gemma4MultimodalEmbedder)."""

from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .common import WithLanguageModel, as_input_ids, image_blocks, scaled_embedding
from .config import BaseConfig
from .gemma4 import Gemma4ForCausalLM, Gemma4PreTrainedModel, Gemma4RMSNorm
from .gemma4_audio import Gemma4AudioConfig, Gemma4AudioModel
from .gemma4_checkpoint import checkpoint_of
from .gemma4_config import Gemma4TextConfig
from .gemma4_vision import Gemma4VisionConfig, Gemma4VisionModel

IMAGE, VIDEO, AUDIO = 1, 2, 3  # transformers' mm_token_type_ids


@dataclass
class Gemma4Config(BaseConfig):
    model_type: str = "gemma4"
    text_config: Any = None
    vision_config: Any = None
    audio_config: Any = None
    boi_token_id: Optional[int] = 255_999
    eoi_token_id: Optional[int] = 258_882
    image_token_id: Optional[int] = 258_880
    video_token_id: Optional[int] = 258_884
    boa_token_id: Optional[int] = 256_000
    eoa_token_index: Optional[int] = 258_883
    eoa_token_id: Optional[int] = None  # (mlx-vlm writes this name)
    audio_token_id: Optional[int] = 258_881
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    writes_legacy_rope_keys = False
    # The sub-configs' classes (Gemma 4 unified has its own: gemma4_unified.py).
    text_config_class, vision_config_class, audio_config_class = Gemma4TextConfig, Gemma4VisionConfig, \
        Gemma4AudioConfig

    def resolve(self, legacy: dict) -> None:
        text = self.text_config if self.text_config is not None else {}
        if not isinstance(text, dict):
            raise MlxGemmaError("config.json: text_config must be an object")
        text = dict(text, model_type=self.text_config_class.model_type, tie_word_embeddings=self.tie_word_embeddings)
        self.text_config = self.text_config_class.from_dict(text, "config.json text_config", require=False)
        if self.vision_config is not None:
            self.vision_config = self.vision_config_class.from_dict(self.vision_config, "config.json vision_config",
                                                                    require=False)
        if self.audio_config is not None:
            self.audio_config = self.audio_config_class.from_dict(self.audio_config, "config.json audio_config",
                                                                  require=False)
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id", "audio_token_id"):
            token = getattr(self, name)
            if token is not None and not (isinstance(token, int) and 0 <= token < vocab):
                raise MlxGemmaError(f"config.json: {name} is {token!r}, expected a token id below vocab_size {vocab}")

    def __getattr__(self, name: str):
        """What generation reads of a decoder's config (vocab_size, eos_token_id, layer_types, ...) is the text
        model's, as transformers' get_text_config()."""
        if name.startswith("__") or "text_config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.text_config, name)


class Gemma4MultimodalEmbedder(nn.Module):
    """A tower's output -> the text width: RMSNorm without a weight, then a linear map without bias."""

    def __init__(self, dims: int, text_dims: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = Gemma4RMSNorm(dims, eps, with_scale=False)
        self.embedding_projection = nn.Linear(dims, text_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def scatter(h: mx.array, slots: mx.array, features: mx.array, what: str) -> mx.array:
    """features (n, D) fill the n slots of h (B, L, D) in (batch, sequence) order, as masked_scatter."""
    slots = slots.reshape(-1)
    n, D = int(slots.sum().item()), h.shape[-1]
    if n != features.shape[0]:
        raise MlxGemmaError(f"input_ids hold {n} {what} tokens but the {what} give {features.shape[0]} soft tokens: "
                            "prepare text and media together with the model's processor")
    index = mx.maximum(mx.cumsum(slots.astype(mx.int32)) - 1, 0)
    return mx.where(slots[:, None], features.astype(h.dtype)[index], h.reshape(-1, D)).reshape(h.shape)


def _array(x, dtype=None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    return x if dtype is None else x.astype(dtype)


class Gemma4MediaTowers:
    """Gemma 4's towers and what a model does with them (transformers' Gemma4Model and EmbeddingGemma2Model
    share it, so do Gemma4ForConditionalGeneration and embedding_gemma2.EmbeddingGemma2Model here): the towers
    and their embedders, each medium's features, and their merge into the text embeddings at the placeholder
    tokens. A model sets self.config (the token ids, vision_config, audio_config) and calls add_towers."""

    checkpoint_name = "Gemma 4"  # (what the errors call a checkpoint without a tower)
    # The modules of each medium: the towers and their embedders (Gemma 4 unified has its own).
    vision_modules, audio_modules = ("vision_tower", "embed_vision"), ("audio_tower", "embed_audio")
    media_weights = ("vision_tower.", "audio_tower.")  # (sanitized names) what only a checkpoint with media has

    def add_towers(self, config, text_hidden_size: int) -> None:
        """The towers the config names, each with its embedder to the text width."""
        if config.vision_config is not None:
            self.vision_tower = Gemma4VisionModel(config.vision_config)
            self.embed_vision = Gemma4MultimodalEmbedder(config.vision_config.hidden_size, text_hidden_size,
                                                         config.vision_config.rms_norm_eps)
        if config.audio_config is not None:
            self.audio_tower = Gemma4AudioModel(config.audio_config)
            self.embed_audio = Gemma4MultimodalEmbedder(config.audio_config.output_proj_dims, text_hidden_size,
                                                        config.audio_config.rms_norm_eps)

    @property
    def media_token_ids(self) -> dict:
        """Placeholder id -> its mm_token_type (what the towers fill)."""
        c = self.config
        return {t: kind for t, kind in ((c.image_token_id, IMAGE), (c.video_token_id, VIDEO),
                                        (c.audio_token_id, AUDIO)) if t is not None}

    def in_vision_tower(self, path: str) -> bool:
        """Both towers and their embedders stay whole on every rank and keep their own bits (in_audio_tower
        tells them apart)."""
        return any(f".{name}." in f".{path}." for name in self.vision_modules) or self.in_audio_tower(path)

    def in_audio_tower(self, path: str) -> bool:
        return any(f".{name}." in f".{path}." for name in self.audio_modules)

    # The towers. Each returns the features of its inputs after the embedder, one (n, D) array per item.

    def get_image_features(self, pixel_values, image_position_ids) -> List[mx.array]:
        """Images (N, max_patches, 3 * patch^2) and their patch positions -> one (tokens, D) array per image."""
        tower = self._tower("vision_tower", "images")
        positions = _array(image_position_ids, mx.int32)
        features = self.embed_vision(tower(_array(pixel_values), positions))
        return _split(features, tower.soft_tokens_per_image(np.asarray(positions)))

    def get_video_features(self, pixel_values_videos, video_position_ids, num_frames_per_video) -> List[mx.array]:
        """Every video's frames, concatenated -> one (tokens of all its frames, D) array per video."""
        if num_frames_per_video is None:
            raise MlxGemmaError("num_frames_per_video is needed with pixel_values_videos (the processor gives it)")
        frames = self.get_image_features(pixel_values_videos, video_position_ids)
        out, start = [], 0
        for n in np.asarray(num_frames_per_video).reshape(-1).tolist():
            out.append(mx.concatenate(frames[start:start + n]))
            start += n
        return out

    def get_audio_features(self, input_features, input_features_mask) -> List[mx.array]:
        """Log-mel features (N, T, mels) and their mask -> one (tokens, D) array per clip (padding dropped)."""
        tower = self._tower("audio_tower", "audio")
        hidden, mask = tower(_array(input_features), _array(input_features_mask, mx.bool_))
        hidden = self.embed_audio(hidden)
        valid = np.asarray(mask)
        return [hidden[i][mx.array(np.flatnonzero(valid[i]))] for i in range(hidden.shape[0])]

    def _tower(self, name: str, what: str):
        if name not in self:
            raise MlxGemmaError(f"this {self.checkpoint_name} checkpoint has no {name.replace('_', ' ')}: it takes "
                                f"no {what}")
        return getattr(self, name)

    def encode_media(self, items: List[dict]) -> List[mx.array]:
        """Processed items (images, videos, clips: the processor's `prepare`) -> one (tokens, D) array each.
        Images of one padded size go through the tower together."""
        out = [None] * len(items)
        groups = {}
        for i, item in enumerate(items):
            if "pixel_values" in item:
                groups.setdefault(np.shape(item["pixel_values"]), []).append(i)
            elif "pixel_values_videos" in item:
                out[i] = self.get_video_features(item["pixel_values_videos"], item["video_position_ids"],
                                                 [len(item["video_position_ids"])])[0]
            elif "input_features" in item:
                out[i] = self.get_audio_features(item["input_features"], item["input_features_mask"])[0]
            else:
                raise MlxGemmaError(f"a media item holds {sorted(item)}: expected an image, a video or a clip")
        for members in groups.values():
            features = self.get_image_features(np.concatenate([items[i]["pixel_values"] for i in members]),
                                               np.concatenate([items[i]["image_position_ids"] for i in members]))
            for i, f in zip(members, features):
                out[i] = f
        return out

    def embed_with_media(self, raw: mx.array, embed, pad_token_id, pixel_values=None, image_position_ids=None,
                         input_features=None, input_features_mask=None, pixel_values_videos=None,
                         video_position_ids=None, num_frames_per_video=None, media_features=None) -> tuple:
        """(ids with the placeholders as the pad token, their embeddings `embed(ids)` with the media features at
        the placeholders: transformers embeds placeholders as the pad token, then masked_scatters each medium's
        features in; media_features, every placeholder's already encoded in prompt order, stand in for the
        media)."""
        slots = {kind: raw == t for t, kind in self.media_token_ids.items()}
        any_slot = mx.zeros(raw.shape, dtype=mx.bool_)
        for s in slots.values():
            any_slot = any_slot | s
        ids = mx.where(any_slot, pad_token_id if pad_token_id is not None else 0, raw)
        h = embed(ids)
        given = [f for f in (pixel_values, input_features, pixel_values_videos) if f is not None]
        if media_features is not None and given:
            raise MlxGemmaError("give media_features or the media themselves, not both")
        if media_features is not None:
            return ids, scatter(h, any_slot, _array(media_features), "media")
        if pixel_values is not None:
            h = scatter(h, slots[IMAGE], mx.concatenate(self.get_image_features(pixel_values, image_position_ids)),
                        "image")
        if pixel_values_videos is not None:
            h = scatter(h, slots[VIDEO], mx.concatenate(self.get_video_features(
                pixel_values_videos, video_position_ids, num_frames_per_video)), "video")
        if input_features is not None:
            if input_features_mask is None:
                raise MlxGemmaError("input_features need their input_features_mask (the processor gives it)")
            h = scatter(h, slots[AUDIO], mx.concatenate(self.get_audio_features(input_features,
                                                                                input_features_mask)), "audio")
        if not given and bool(any_slot.any()):
            raise MlxGemmaError("input_ids hold media placeholder tokens but no media were given")
        return ids, h

    def sanitize_towers(self, weights: dict) -> dict:
        """The towers' weights through their own key fixes (each tower's sanitize); those of a tower the config
        leaves out dropped, as transformers does not use them."""
        out = dict(weights)
        for name in ("vision_tower", "audio_tower"):
            part = {k.removeprefix(name + "."): v for k, v in out.items() if k.startswith(name + ".")}
            if not part:
                continue
            out = {k: v for k, v in out.items() if not k.startswith(name + ".")}
            if name in self:
                out.update({f"{name}.{k}": v for k, v in getattr(self, name).sanitize(part).items()})
        for tower, embedder in (("vision_tower", "embed_vision"), ("audio_tower", "embed_audio")):
            if tower not in self:
                out = {k: v for k, v in out.items() if not k.startswith((tower + ".", embedder + "."))}
        return out


class Gemma4ForConditionalGeneration(WithLanguageModel, Gemma4MediaTowers, Gemma4PreTrainedModel):
    """model(input_ids, pixel_values=..., image_position_ids=..., input_features=..., input_features_mask=...,
    pixel_values_videos=..., video_position_ids=..., mm_token_type_ids=...) -> logits (B, L, vocab), with
    transformers' keyword names. media_features (n, D): every placeholder's features already encoded, in prompt
    order (encode_media's output, concatenated), stand in for the media. Without media it is Gemma 4's text
    model (mlx-lm's interface: __call__(inputs, cache=None), layers, make_cache)."""

    has_vision = True
    vision_tower_name = "vision_tower"
    readme_usage = ("```python\nimport mlxgemma\nmodel, processor = mlxgemma.load(\"path/to/this/folder\")\n"
                    "print(mlxgemma.generate(model, processor, \"Describe this photo.\", image=\"photo.jpg\"))\n```\n")

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = Gemma4ForCausalLM(text)
        self.add_towers(config, text.hidden_size)

    def load_processor(self, path, tokenizer):
        from ..media.gemma4_processor import Gemma4Processor

        return Gemma4Processor.from_pretrained(path, tokenizer, self.config)

    def media_inputs(self, features: Optional[mx.array], token_types) -> dict:
        """The keywords that give a forward already-encoded media features and the chunk's token types."""
        return {"media_features": features, "mm_token_type_ids": token_types}

    def __call__(self, input_ids, attention_mask=None, cache=None, pixel_values=None, image_position_ids=None,
                 input_features=None, input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
                 num_frames_per_video=None, mm_token_type_ids=None, media_features=None, return_hidden=False):
        ids, inputs = self.text_inputs(input_ids, pixel_values, image_position_ids, input_features,
                                       input_features_mask, pixel_values_videos, video_position_ids,
                                       num_frames_per_video, mm_token_type_ids, media_features)
        return self.language_model(ids, attention_mask=attention_mask, cache=cache, return_hidden=return_hidden,
                                   **inputs)

    def text_inputs(self, input_ids, pixel_values=None, image_position_ids=None, input_features=None,
                    input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
                    num_frames_per_video=None, mm_token_type_ids=None, media_features=None):
        """(ids with placeholders as the pad token, the text model's extra inputs: the merged embeddings, and the
        image blocks where the mask needs them)."""
        text = self.config.text_config
        raw = as_input_ids(input_ids, text.vocab_size)
        if raw.shape[1] == 1 and media_features is None and pixel_values is None and input_features is None \
                and pixel_values_videos is None:  # a decode step: no sync, no media
            return raw, {}
        ids, h = self.embed_with_media(
            raw, lambda ids: scaled_embedding(self.language_model.model.embed_tokens, ids, text.hidden_size),
            text.pad_token_id, pixel_values, image_position_ids, input_features, input_features_mask,
            pixel_values_videos, video_position_ids, num_frames_per_video, media_features)
        inputs = {"inputs_embeds": h}
        if mm_token_type_ids is not None and text.use_bidirectional_attention == "vision":
            inputs["blocks"] = image_blocks(mm_token_type_ids, kinds=(IMAGE, VIDEO))
        return ids, inputs

    def checkpoint(self, weights: dict, config: dict) -> tuple:
        """What mlxgemma.convert writes: mlx-vlm's layout (our module names), the language model's part as a
        Gemma 4 text checkpoint writes it (gemma4_checkpoint.checkpoint_of: on-disk expert names, the resolved
        text config), config.json the source's with that text_config, and one quantization block naming every
        quantized module, towers included, by its on-disk path."""
        text = {k.removeprefix("language_model."): v for k, v in weights.items() if k.startswith("language_model.")}
        text, text_config = checkpoint_of(self.language_model, text, config)
        out = {f"language_model.{k}": v for k, v in text.items()}
        out.update({k: v for k, v in weights.items() if not k.startswith("language_model.")})
        q = text_config.pop("quantization", None)
        text_config.pop("architectures", None)
        config = dict(config, text_config=dict(text_config, model_type=self.config.text_config.model_type),
                      architectures=[type(self).__name__])
        config.pop("quantization_config", None)
        if q is not None:
            block = {k: v for k, v in q.items() if not isinstance(v, (dict, bool))}
            block.update({f"language_model.{k}": v for k, v in q.items() if isinstance(v, dict)})
            for name, m in self.named_modules():
                if self.in_vision_tower(name) and hasattr(m, "scales") and hasattr(m, "bits"):
                    block[name] = {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
            config["quantization"] = block
        return out, config

    def calibration_forward(self, input_ids: mx.array) -> mx.array:
        return self.language_model(input_ids)

    def sanitize(self, weights: dict) -> dict:
        """Either layout (transformers' model.*, or mlx-vlm's); each tower's own key fixes (its sanitize)."""
        out = self.with_language_model_weights(weights)
        return self.sanitize_towers(out)


def _split(x: mx.array, sizes: List[int]) -> List[mx.array]:
    out, start = [], 0
    for n in sizes:
        out.append(x[start:start + n])
        start += n
    return out

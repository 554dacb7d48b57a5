"""Gemma 4 unified (model_type gemma4_unified, Gemma 4 12B): Gemma 4 without towers. An image is cut by its
processor into 48-pixel patches (gemma4_unified_processor.py) that become soft tokens through LayerNorm ->
Linear -> LayerNorm, plus a factorised 2-D position embedding (a row of the table per x and per y), LayerNorm,
then the multimodal embedder; a clip is cut into frames of 640 raw samples that go through the audio
embedder alone (RMSNorm without weight -> Linear). One soft token per patch or frame, spliced in at the
placeholders as in Gemma 4 (gemma4_multimodal.py, whose interface and splicing this model keeps).

The text model is Gemma 4's without per-layer inputs and experts (transformers' Gemma4UnifiedTextModel
inherits Gemma 4's attention, MLP, norms and rope); its config defaults differ (sliding_window 1024,
use_bidirectional_attention "vision", max_position_embeddings 262144). So do its masks: with "vision" and the
token types given, transformers' forward (which generation runs too, with its default cache) masks with
create_masks_for_generate(block_sequence_ids=...), the blocks OR'd onto every layer's mask after the window:
the tokens of an image see each other on full layers too, and on sliding layers across the whole block, however
long. (Gemma 4 keeps them to the sliding layers, within the window; transformers' create_masks_for_vision_model
in this family's file, which says so, is used only by generation with a static cache.)

Modules are named as mlx-vlm names them and as the checkpoints store them (language_model.model.*,
vision_embedder.*, embed_vision.*, embed_audio.*); transformers' in-memory names (model.embed_vision.patch_ln1,
model.embed_vision.multimodal_embedder.*: what its conversion_mapping renames on load) load too.
Reference: transformers/models/gemma4_unified (configuration_, modeling_gemma4_unified.py)."""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxGemmaError
from .config import BaseConfig
from .gemma4 import Gemma4ForCausalLM, Gemma4TextModel
from .gemma4_config import Gemma4TextConfig
from .gemma4_multimodal import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4MultimodalEmbedder


@dataclass
class Gemma4UnifiedTextConfig(Gemma4TextConfig):
    model_type: str = "gemma4_unified_text"
    max_position_embeddings: int = 262_144
    sliding_window: int = 1024
    use_bidirectional_attention: Optional[str] = "vision"
    hidden_size_per_layer_input: int = 0

    def resolve(self, legacy: dict) -> None:
        # transformers' unified text config removes per-layer inputs and experts (its model has neither):
        # whatever a config.json says of them is not read.
        self.hidden_size_per_layer_input, self.enable_moe_block = 0, False
        super().resolve(legacy)


def _positive(config, names, where: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31):
            raise MlxGemmaError(f"config.json {where}: {name} is {value!r}, expected a positive integer")


@dataclass
class Gemma4UnifiedVisionConfig(BaseConfig):
    model_type: str = "gemma4_unified_vision"
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840
    initializer_range: float = 0.02

    def resolve(self, legacy: dict) -> None:
        _positive(self, ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"),
                  "vision_config")
        self.model_patch_size = self.patch_size * self.pooling_kernel_size
        if legacy.get("model_patch_size", self.model_patch_size) != self.model_patch_size:  # (mlx-vlm writes it)
            raise MlxGemmaError(f"config.json vision_config: model_patch_size {legacy['model_patch_size']!r} is not "
                                f"patch_size x pooling_kernel_size ({self.model_patch_size})")
        if self.output_proj_dims != self.mm_embed_dim:  # the embedder projects the mm_embed_dim-wide patches
            raise MlxGemmaError(f"config.json vision_config: output_proj_dims {self.output_proj_dims} differs from "
                                f"mm_embed_dim {self.mm_embed_dim}; the multimodal embedder takes the patch embeddings")


@dataclass
class Gemma4UnifiedAudioConfig(BaseConfig):
    model_type: str = "gemma4_unified_audio"
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def resolve(self, legacy: dict) -> None:
        # transformers' aliases of audio_embed_dim (a clip frame's samples are the embedder's input width);
        # mlx-vlm writes them as fields.
        for alias in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            if legacy.get(alias, self.audio_embed_dim) != self.audio_embed_dim:
                raise MlxGemmaError(f"config.json audio_config: {alias} {legacy[alias]!r} differs from audio_embed_dim "
                                    f"{self.audio_embed_dim} (transformers takes them as one value)")
        _positive(self, ("audio_embed_dim",), "audio_config")

    @property
    def output_proj_dims(self) -> int:
        return self.audio_embed_dim


@dataclass
class Gemma4UnifiedConfig(Gemma4Config):
    model_type: str = "gemma4_unified"

    text_config_class, vision_config_class, audio_config_class = Gemma4UnifiedTextConfig, \
        Gemma4UnifiedVisionConfig, Gemma4UnifiedAudioConfig


class Gemma4UnifiedTextModel(Gemma4TextModel):
    """Gemma 4's text model; an image block sees itself on every layer, across the window (see above)."""

    block_types = None
    blocks_in_window = False


class Gemma4UnifiedForCausalLM(Gemma4ForCausalLM):
    base_model_class = Gemma4UnifiedTextModel


class Gemma4UnifiedVisionEmbedder(nn.Module):
    """Patches (..., 3 * model_patch_size**2) and their (x, y) positions -> (..., mm_embed_dim): LayerNorm ->
    Linear -> LayerNorm, + the x row of pos_embedding[:, 0] and the y row of pos_embedding[:, 1] (each only
    where that coordinate is not -1), LayerNorm. torch's LayerNorms: eps 1e-5, weight and bias."""

    def __init__(self, config: Gemma4UnifiedVisionConfig):
        super().__init__()
        patch, dims = 3 * config.model_patch_size**2, config.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(patch)
        self.patch_dense = nn.Linear(patch, dims)
        self.patch_ln2 = nn.LayerNorm(dims)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, dims))
        self.pos_norm = nn.LayerNorm(dims)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values)))
        valid = (positions != -1).astype(h.dtype)
        at = mx.maximum(positions, 0)
        x, y = self.pos_embedding[at[..., 0], 0], self.pos_embedding[at[..., 1], 1]
        return self.pos_norm(h + (x * valid[..., 0:1] + y * valid[..., 1:2]))


def _numpy(x, dtype=None) -> np.ndarray:
    return np.asarray(x if not isinstance(x, mx.array) else np.array(x), dtype=dtype)


class Gemma4UnifiedForConditionalGeneration(Gemma4ForConditionalGeneration):
    """Gemma4ForConditionalGeneration's interface (transformers' keyword names, media_features, encode_media,
    media_inputs, make_cache, ...) over this family's embedders; a video's frames go through the vision
    embedder as images (as transformers' get_video_features does)."""

    vision_tower_name = "vision_embedder"  # (kept at --q-vision-bits and whole on every rank, as a tower)
    # No towers: the embedders are the media modules, each kept at its medium's bits (--q-vision-bits,
    # --q-audio-bits) and whole on every rank, as Gemma 4's towers are.
    vision_modules, audio_modules = ("vision_embedder", "embed_vision"), ("embed_audio",)
    media_weights = ("vision_embedder.", "embed_vision.", "embed_audio.")
    # transformers' module names -> the checkpoint's (its conversion_mapping renames them so on load, back on save)
    renamed = {"embed_vision.multimodal_embedder.": "embed_vision.", "embed_vision.patch_": "vision_embedder.patch_",
               "embed_vision.pos_": "vision_embedder.pos_"}

    def __init__(self, config: Gemma4UnifiedConfig):
        super(Gemma4ForConditionalGeneration, self).__init__()  # (not Gemma 4's __init__: it builds towers)
        self.config = config
        text = config.text_config
        self.language_model = Gemma4UnifiedForCausalLM(text)
        if config.vision_config is not None:
            self.vision_embedder = Gemma4UnifiedVisionEmbedder(config.vision_config)
            self.embed_vision = Gemma4MultimodalEmbedder(config.vision_config.output_proj_dims, text.hidden_size,
                                                         config.vision_config.rms_norm_eps)
        if config.audio_config is not None:
            self.embed_audio = Gemma4MultimodalEmbedder(config.audio_config.output_proj_dims, text.hidden_size,
                                                        config.audio_config.rms_norm_eps)

    @property
    def float_dtype(self):
        """The weights' float dtype (a norm's: never quantized), which the embedders' inputs are cast to."""
        return self.language_model.model.norm.weight.dtype

    def load_processor(self, path, tokenizer):
        from ..media.gemma4_unified_processor import Gemma4UnifiedProcessor

        return Gemma4UnifiedProcessor.from_pretrained(path, tokenizer, self.config)

    def get_image_features(self, pixel_values, image_position_ids) -> List[mx.array]:
        """Patches (N, max_patches, 3 * model_patch_size**2) and positions (N, max_patches, 2) -> one
        (valid patches, D) array per image; padding patches (position (-1, -1)) are left out before the
        embedders, which treat each patch alone."""
        if "vision_embedder" not in self:
            raise MlxGemmaError("this Gemma 4 unified checkpoint has no vision_config: it takes no images")
        vision = self.config.vision_config
        pixels, positions = _numpy(pixel_values, np.float32), _numpy(image_position_ids)
        width = 3 * vision.model_patch_size**2
        if pixels.ndim != 3 or pixels.shape[-1] != width or positions.shape != pixels.shape[:2] + (2,):
            raise MlxGemmaError(f"pixel_values {pixels.shape} and image_position_ids {positions.shape} are not "
                                f"(images, patches, {width}) and (images, patches, 2): use the model's processor")
        valid = (positions != -1).all(-1)
        rows = np.flatnonzero(valid.reshape(-1))
        at = positions.reshape(-1, 2)[rows].astype(np.int32)
        if at.size and (at.min() < 0 or at.max() >= vision.mm_posemb_size):
            raise MlxGemmaError(f"an image patch sits at {int(at.max())} (or below 0) but the position table holds "
                                f"{vision.mm_posemb_size}: the image has more patches per side than the model reads")
        patches = mx.array(pixels.reshape(-1, width)[rows]).astype(self.float_dtype)  # (transformers casts them so)
        h = self.embed_vision(self.vision_embedder(patches, mx.array(at)))
        bounds = np.cumsum(valid.sum(-1))[:-1].tolist()
        return mx.split(h, bounds) if bounds else [h]

    def get_audio_features(self, input_features, input_features_mask) -> List[mx.array]:
        """Frames (N, T, audio_embed_dim) and their mask -> one (valid frames, D) array per clip."""
        if "embed_audio" not in self:
            raise MlxGemmaError("this Gemma 4 unified checkpoint has no audio_config: it takes no audio")
        frames, mask = _numpy(input_features, np.float32), _numpy(input_features_mask).astype(bool)
        width = self.config.audio_config.audio_embed_dim
        if frames.ndim != 3 or frames.shape[-1] != width or mask.shape != frames.shape[:2]:
            raise MlxGemmaError(f"input_features {frames.shape} and input_features_mask {mask.shape} are not "
                                f"(clips, frames, {width}) and (clips, frames): use the model's processor")
        valid = mx.array(frames.reshape(-1, width)[np.flatnonzero(mask.reshape(-1))]).astype(self.float_dtype)
        h = self.embed_audio(valid)
        bounds = np.cumsum(mask.sum(-1))[:-1].tolist()
        return mx.split(h, bounds) if bounds else [h]

    def checkpoint(self, weights: dict, config: dict) -> tuple:
        """Gemma 4's (mlx-vlm's layout, which mlx-vlm's gemma4_unified reads: our module names are its), with
        the sizes transformers derives written out: mlx-vlm reads model_patch_size and the audio frame's aliases
        as fields of their own, whose defaults are the 12B's."""
        out, config = super().checkpoint(weights, config)
        vision, audio = self.config.vision_config, self.config.audio_config
        if vision is not None:
            config["vision_config"] = dict(config["vision_config"], model_patch_size=vision.model_patch_size)
        if audio is not None:
            width = audio.audio_embed_dim
            config["audio_config"] = dict(config["audio_config"], hidden_size=width, output_proj_dims=width,
                                          audio_samples_per_token=width)
        return out, config

    def sanitize(self, weights: dict) -> dict:
        """transformers' layout (model.*, its in-memory names too) or mlx-vlm's; the text part as Gemma 4's.
        Weights of an embedder the config leaves out are not used, as in transformers."""
        media, text = {}, {}
        for k, v in weights.items():
            key = k.removeprefix("model.")
            for old, new in self.renamed.items():
                if key.startswith(old):
                    key = new + key[len(old):]
            if key.startswith(self.media_weights):
                if key.split(".", 1)[0] in self:
                    media[key] = v
            else:
                text[k] = v
        return {**super().sanitize(text), **media}

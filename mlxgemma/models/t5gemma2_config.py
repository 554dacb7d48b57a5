"""T5Gemma 2's configuration (transformers' T5Gemma2Config): an encoder of a Gemma 3 text part and a SigLIP
tower, and a Gemma 3 decoder, each with transformers' defaults where config.json leaves a field out."""

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import MlxGemmaError
from .config import BaseConfig
from .gemma3 import Gemma3TextConfig
from .gemma3_vision import check_mm_tokens
from .siglip import SiglipVisionConfig


@dataclass
class T5Gemma2TextConfig(Gemma3TextConfig):
    """Encoder text part and decoder (transformers' T5Gemma2TextConfig / T5Gemma2DecoderConfig)."""
    model_type: str = "t5gemma2_text"
    dropout_rate: float = 0.0


@dataclass
class T5Gemma2EncoderConfig(BaseConfig):
    model_type: str = "t5gemma2_encoder"
    text_config: Any = None
    vision_config: Any = None
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144

    def resolve(self, legacy: dict) -> None:
        self.text_config = T5Gemma2TextConfig.from_dict(self.text_config or {}, "config.json encoder.text_config",
                                                        require=False)
        self.vision_config = SiglipVisionConfig.from_dict(self.vision_config or {},
                                                          "config.json encoder.vision_config", require=False)
        check_mm_tokens(self.mm_tokens_per_image, self.vision_config)


@dataclass
class T5Gemma2Config(BaseConfig):
    model_type: str = "t5gemma2"
    encoder: Any = None
    decoder: Any = None
    image_token_index: int = 256_001
    eoi_token_index: Optional[int] = None
    classifier_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    tie_word_embeddings: bool = True
    vocab_size: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None

    writes_legacy_rope_keys = False  # its rope parameters are nested in the encoder's and decoder's configs

    def resolve(self, legacy: dict) -> None:
        self.encoder = T5Gemma2EncoderConfig.from_dict(self.encoder or {}, "config.json encoder", require=False)
        self.decoder = T5Gemma2TextConfig.from_dict(self.decoder or {}, "config.json decoder", require=False)
        self.encoder.image_token_index = self.image_token_index  # the top-level id wins, as in transformers
        self.eoi_token_index = self.encoder.eoi_token_index
        for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, key) is None:
                setattr(self, key, getattr(self.decoder, key))
        text = self.encoder.text_config
        if (text.hidden_size, text.vocab_size) != (self.decoder.hidden_size, self.decoder.vocab_size):
            raise MlxGemmaError("config.json: encoder and decoder must have the same hidden_size and vocab_size")

"""mlxgemma: the Gemma model lineage on Apple silicon with MLX, exact to transformers."""

import warnings

# `python -m mlxgemma.generate` (and .convert) runs a module whose name this package also binds to a function
# (mlxgemma.generate, as mlx-lm does); runpy warns about that on every run. The module runs as __main__ all
# the same, so the warning says nothing to a user.
warnings.filterwarnings("ignore", message=r"'mlxgemma\.\w+' found in sys\.modules", category=RuntimeWarning)

from .errors import MlxGemmaError
from .checkpoints.loading import build_model, load, load_model
from .models.gemma import GemmaConfig, GemmaForCausalLM, GemmaForSequenceClassification, GemmaForTokenClassification, GemmaModel
from .models.gemma2 import (Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification,
                            Gemma2ForTokenClassification, Gemma2Model)
from .models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextForSequenceClassification, Gemma3TextModel
from .models.gemma4 import Gemma4ForCausalLM, Gemma4TextConfig, Gemma4TextModel
from .models.gemma4_multimodal import Gemma4Config, Gemma4ForConditionalGeneration
from .models.stablelm import (StableLmConfig, StableLmForCausalLM, StableLmForSequenceClassification,
                              StableLmForTokenClassification, StableLmModel)
from .models.t5gemma2 import (T5Gemma2Config, T5Gemma2ForConditionalGeneration, T5Gemma2ForSequenceClassification,
                              T5Gemma2ForTokenClassification, T5Gemma2Model)
from .media.gemma4_processor import Gemma4Processor
from .media.processor import Gemma3Processor, T5Gemma2Processor

from .convert import convert  # noqa: E402  (the function; importing mlxgemma.convert here keeps the name bound to it)
from .generate import Reply, generate, generate_reply, stream_generate  # noqa: E402
from .embed import embed  # noqa: E402  (as convert: the function keeps the name)

__version__ = "0.1.0"
__all__ = [
    "MlxGemmaError", "build_model", "load", "load_model", "convert", "embed", "generate", "generate_reply", "Reply",
    "stream_generate",
    "GemmaConfig", "GemmaModel", "GemmaForCausalLM", "GemmaForSequenceClassification", "GemmaForTokenClassification",
    "Gemma2Config", "Gemma2Model", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification", "Gemma3TextConfig", "Gemma3TextModel", "Gemma3ForCausalLM",
    "Gemma3TextForSequenceClassification", "Gemma4TextConfig", "Gemma4TextModel", "Gemma4ForCausalLM",
    "Gemma4Config", "Gemma4ForConditionalGeneration",
    "StableLmConfig", "StableLmModel", "StableLmForCausalLM",
    "StableLmForSequenceClassification", "StableLmForTokenClassification", "T5Gemma2Config", "T5Gemma2Model",
    "T5Gemma2ForConditionalGeneration", "T5Gemma2ForSequenceClassification", "T5Gemma2ForTokenClassification",
    "Gemma3Processor", "T5Gemma2Processor", "Gemma4Processor",
]

"""Tiny Gemma 4 assistant drafters (transformers' Gemma4AssistantForCausalLM, every weight randomised: its
layer_scalar buffers and a random token_ordering too) for the tiny Gemma 4 targets of tests/test_gemma4.py.

transformers 5.23 cannot build one as released: Gemma4TextConfig.kv_sharing_modes wants a layer of each type
that computes keys and values before the shared ones, and an assistant has none (every layer is shared), so it
raises (the 12B Unified's alike). `all_shared_modes()` restates what it means for that case (every layer
"reuse") for the tests."""

import torch
import transformers

from reference import WINDOW, randomize
from test_gemma4 import BASE, S, F, randomize_scalars

# Narrower than the targets (hidden 32); its full layers take the targets' global_head_dim (32).
DRAFTER = dict(BASE, hidden_size=24, intermediate_size=40, num_hidden_layers=3, layer_types=[S, S, F],
               num_attention_heads=4, num_key_value_heads=2, vocab_size_per_layer_input=0,
               sliding_window=WINDOW)


def all_shared_modes() -> None:
    for config in (transformers.Gemma4TextConfig, transformers.Gemma4UnifiedTextConfig):
        if "_mlxgemma_released" in vars(config):
            continue
        config._mlxgemma_released = config.kv_sharing_modes

        def modes(self, released=config.kv_sharing_modes):
            if self.num_kv_shared_layers == self.num_hidden_layers:
                return ["reuse"] * self.num_hidden_layers
            return released.fget(self)
        config.kv_sharing_modes = property(modes)


def hf_assistant(seed: int = 0, backbone: int = 32, ordered: bool = True, unified: bool = False, **overrides):
    all_shared_modes()
    text = dict(DRAFTER, **overrides)
    options = dict(backbone_hidden_size=backbone, use_ordered_embeddings=ordered, num_centroids=8,
                   centroid_intermediate_top_k=3)
    if unified:
        config = transformers.Gemma4UnifiedAssistantConfig(text_config=dict(text, model_type="gemma4_unified_text"),
                                                           **options)
        model = transformers.Gemma4UnifiedAssistantForCausalLM(config)
    else:
        model = transformers.Gemma4AssistantForCausalLM(transformers.Gemma4AssistantConfig(text_config=text,
                                                                                           **options))
    model = randomize_scalars(randomize(model, seed), seed)
    if ordered:
        with torch.no_grad():
            order = torch.randperm(text["vocab_size"], generator=torch.Generator().manual_seed(seed + 11))
            model.masked_embedding.token_ordering.copy_(order)
    return model

"""mlxgemma and mlx-lm's gemma4_text against transformers on the same tiny Gemma 4 weights: max |Δ logits| of
each against transformers' float32 eager model, per variant, on a prompt 2.5 sliding windows long. mlx-lm
reads the checkpoint mlxgemma.convert writes (it cannot read transformers' own: it ignores the
per_layer_config transformers 5 saves and builds the full layers with its default head size, 512). The first
rows are variants mlx-lm implements; the others show where it departs from transformers:

  * hidden_activation: mlx-lm always applies the tanh GELU (MLP, experts, per-layer gate);
  * attention_bias: mlx-lm's projections have no bias (the checkpoint does not load);
  * use_bidirectional_attention "all": mlx-lm is always causal;
  * bfloat16 MoE: mlx-lm picks the top k on the router's logits and takes the softmax over those k, in the
    model's dtype (transformers: a float32 softmax over all experts, the top k renormalised) -- the same
    function in float32, another rounding in bf16. On MLX's CPU backend its bf16 experts do not run at all
    (gather_mm is float32 only there; mlxgemma computes that matmul in float32 and casts back).

    python benchmarks/gemma4_mlx_lm.py
"""

import math
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

S, F = "sliding_attention", "full_attention"
WINDOW = 6
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=WINDOW,
            vocab_size_per_layer_input=96, hidden_size_per_layer_input=0, final_logit_softcapping=3.0,
            layer_types=[S, F, S, S, F], eos_token_id=1)
ROPES = {S: {"rope_type": "default", "rope_theta": 100.0},
         F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4}}
E = dict(num_hidden_layers=7, layer_types=[S, F, S, F, S, S, F], num_kv_shared_layers=3,
         hidden_size_per_layer_input=8, use_double_wide_mlp=True)
MOE = dict(enable_moe_block=True, num_experts=5, top_k_experts=3, moe_intermediate_size=24)
VARIANTS = [
    ("dense (untied head, proportional rope)", dict(tie_word_embeddings=False, rope_parameters=ROPES), None),
    ("dense, linear ropes", dict(rope_parameters={
        S: {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 4.0, "rope_theta": 1e4}}), None),
    ("E (per-layer inputs, KV sharing, double-wide MLP)", E, None),
    ("MoE (top-3 of 5)", MOE, None),
    ("k_eq_v (31B-style full layers)", dict(attention_k_eq_v=True, num_global_key_value_heads=1), None),
    ("E, silu", dict(E, hidden_activation="silu"), None),
    ("dense, exact GELU", dict(hidden_activation="gelu"), None),
    ("dense, attention_bias", dict(attention_bias=True), None),
    ("E, use_bidirectional_attention all", dict(E, use_bidirectional_attention="all"), None),
    ("MoE in bfloat16", MOE, "bfloat16"),
]


def hf_model(overrides: dict):
    import torch
    import transformers

    config = transformers.Gemma4TextConfig(**dict(BASE, **overrides), attn_implementation="eager")
    model = transformers.Gemma4ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.5))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model


def main():
    import torch
    from mlx_lm.utils import load_model

    import mlxgemma

    ids = np.random.default_rng(1).integers(3, 96, size=(2, int(2.5 * WINDOW)))
    print("max |Δ logits| against transformers (float32, eager), 2 x 15 tokens\n"
          "| variant | mlxgemma | mlx-lm | mlxgemma vs mlx-lm |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides, dtype) in enumerate(VARIANTS):
            hf = hf_model(overrides)
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
            src, dst = Path(tmp) / f"{i}-hf", Path(tmp) / f"{i}-mlx"
            hf.save_pretrained(src)
            mlxgemma.convert(src, dst, dtype=dtype)
            ours = mlxgemma.load_model(dst, dtype=dtype)(mx.array(ids)).astype(mx.float32)
            cells = [f"{np.abs(np.array(ours) - ref).max():.1e}"]
            try:
                theirs = np.array(load_model(dst)[0](mx.array(ids)).astype(mx.float32))
                cells += [f"{np.abs(theirs - ref).max():.1e}", f"{np.abs(theirs - np.array(ours)).max():.1e}"]
            except Exception as e:  # what mlx-lm cannot load or run
                cells += [f"fails ({type(e).__name__}: {str(e).splitlines()[0][:60]})", "-"]
            if dtype:  # the error a bfloat16 model makes anyway: transformers' own in that dtype
                with torch.no_grad():
                    own = hf.to(getattr(torch, dtype))(input_ids=torch.tensor(ids)).logits.float().numpy()
                name += f" (transformers' own bf16: {np.abs(own - ref).max():.1e})"
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

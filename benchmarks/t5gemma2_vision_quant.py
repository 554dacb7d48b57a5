"""Does quantizing T5Gemma 2's SigLIP vision tower cost accuracy? Compares, on one random-weight model with
the real widths of t5gemma-2-270m-270m (vision 1152/4304/16 heads, text 640/2048, 4 heads, 1 kv head),
fewer layers and smaller images so that MLX's CPU backend can run it:

  * the image features (projector output): relative L2 error against float;
  * the decoder's next-token distributions over a caption prompt: mean KL(float || quantized) and top-1
    agreement, for the language model quantized alone and for the language model and the tower quantized.

Quantized weights are evaluated through their dequantized twins (exactly the weights a quantized checkpoint
holds, in float32): it compares weights, not kernels. Random weights stand in for real ones (no T5Gemma 2
checkpoint is reachable here), so read the numbers as relative: how much the tower adds to the error the
language model's quantization already makes.

    python benchmarks/t5gemma2_vision_quant.py [--vision-layers 6] [--text-layers 6] [--image-size 224]
"""

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def build(args, path: Path):
    import torch
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=args.vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=args.text_layers,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                query_pre_attn_scalar=256)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.vision_layers,
                  num_attention_heads=16, image_size=args.image_size, patch_size=14, vision_use_head=False)
    config = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=args.tokens_per_image,
                     boi_token_index=args.vocab - 3, eoi_token_index=args.vocab - 2),
        decoder=dict(text), image_token_index=args.vocab - 1)
    model = transformers.T5Gemma2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # trained-like spread: unit-variance activations, non-trivial norm scales
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.3
            p.copy_(torch.randn(p.shape) * scale)
    model.save_pretrained(path)


def fake_quantize(model, bits: int, group_size: int, vision: bool, text: bool) -> None:
    """Round every weight that quantize() would quantize, in place, through mx.quantize/mx.dequantize."""
    for name, m in model.named_modules():
        in_vision = model.in_vision_tower(name)
        if not isinstance(m, (nn.Linear, nn.Embedding)) or (vision, text)[0 if in_vision else 1] is False:
            continue
        if m.weight.shape[-1] % group_size:
            continue
        m.weight = mx.dequantize(*mx.quantize(m.weight, group_size, bits), group_size=group_size, bits=bits)
    mx.eval(model.parameters())


def run(model, ids, pixels, dec):
    encoded = model.encode(ids, pixel_values=pixels)
    features = model.model.encoder.get_image_features(pixels)
    logits = model.decode_step(dec, encoded)
    return features, mx.softmax(logits.astype(mx.float32), axis=-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision-layers", type=int, default=6)
    p.add_argument("--text-layers", type=int, default=6)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--tokens-per-image", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    import mlxgemma

    with tempfile.TemporaryDirectory() as tmp:
        build(args, Path(tmp))
        rng = np.random.default_rng(0)
        n_text = 16
        ids = [2] + [args.vocab - 3] + [args.vocab - 1] * args.tokens_per_image + [args.vocab - 2]
        ids += rng.integers(3, args.vocab - 3, n_text).tolist()
        ids, dec = mx.array([ids]), mx.array([[2] + rng.integers(3, args.vocab - 3, 15).tolist()])
        x = np.linspace(-1, 1, args.image_size, dtype=np.float32)
        pixels = mx.array(np.stack([np.sin(3 * x[None] + 2 * x[:, None]), np.outer(x, x), x[None] + 0 * x[:, None]])[None])
        variants = [("float", None, None)] + [(f"{b}-bit {what}", b, what) for b in (4, 8)
                                              for what in ("language model", "language model + vision")]
        ref = None
        print("| weights | image features rel. error | decoder KL | top-1 agreement |\n|---|---|---|---|")
        for name, bits, what in variants:
            model = mlxgemma.load_model(tmp)
            if bits:
                fake_quantize(model, bits, args.group_size, vision=what.endswith("vision"), text=True)
            t = time.perf_counter()
            features, probs = run(model, ids, pixels, dec)
            mx.eval(features, probs)
            if ref is None:
                ref = (features, probs)
                print(f"| {name} | 0 | 0 | 100% |  ({time.perf_counter() - t:.1f} s)")
                continue
            rel = (mx.linalg.norm(features - ref[0]) / mx.linalg.norm(ref[0])).item()
            kl = (ref[1] * (mx.log(ref[1] + 1e-30) - mx.log(probs + 1e-30))).sum(-1).mean().item()
            top1 = (mx.argmax(ref[1], -1) == mx.argmax(probs, -1)).mean().item()
            print(f"| {name} | {rel:.4f} | {kl:.5f} | {100 * top1:.0f}% |")


if __name__ == "__main__":
    main()

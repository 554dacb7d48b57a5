"""T5Gemma 2 speed, mlxgemma (float and 4-bit) against transformers (torch, float32) on the same machine and
the same random weights of the t5gemma-2-270m-270m shape: image encode time (SigLIP + projector, one image),
encoder prompt tokens/s (one image's 256 tokens plus text, after the image encode), decode tokens/s over
--decode tokens (cached, greedy). After a warm-up, trials alternate and medians are reported.

    python benchmarks/t5gemma2_speed.py [--image-size 896] [--vision-layers 27] [--trials 3]

The real tower reads 896-pixel images (4096 patches). MLX's Linux CPU backend (a reference BLAS, ~2 GFLOP/s
in float32 here) needs most of an hour for that, so on such a machine pass --image-size 224: the same tower
(all 27 layers, real widths) on 256 patches, pooled 1x1 to the same 256 image tokens; the text parts are
unchanged. On a Mac, run the defaults.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def build(path: Path, image_size: int, vision_layers: int):
    import torch
    import transformers

    text = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    config = transformers.T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=256),
                                         decoder=dict(text), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.T5Gemma2ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model


def inputs(config, n_text: int = 32):
    rng = np.random.default_rng(0)
    enc = config.encoder
    ids = [2] + [enc.boi_token_index] + [enc.image_token_index] * enc.mm_tokens_per_image + [enc.eoi_token_index]
    ids += rng.integers(3, 200000, n_text).tolist()
    size = enc.vision_config.image_size
    return np.array([ids]), rng.standard_normal((1, 3, size, size)).astype(np.float32)


def time_mlx(model, ids, pixels, n_decode):
    ids = mx.array(ids)
    t0 = time.perf_counter()
    features = None if pixels is None else model.model.encoder.get_image_features(mx.array(pixels))
    mx.eval(features)
    t1 = time.perf_counter()
    cache = model.make_cache(model.encode(ids, image_features=features))  # evaluates encoder + cross K/V
    t2 = time.perf_counter()
    token = mx.array([[2]])
    mx.eval(model.decode_step(token, cache=cache))  # first step outside the decode timing, as mlx-lm does
    t3 = time.perf_counter()
    for _ in range(n_decode):
        token = mx.argmax(model.decode_step(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    t4 = time.perf_counter()
    return t1 - t0, ids.shape[1] / (t2 - t1), n_decode / (t4 - t3)


def time_torch(model, ids, pixels, n_decode):
    import torch

    ids = torch.tensor(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        features = None if pixels is None else model.model.encoder.get_image_features(torch.tensor(pixels)).pooler_output
        t1 = time.perf_counter()
        embeds = model.model.encoder.get_input_embeddings()(ids)
        if features is not None:
            embeds = embeds.masked_scatter((ids == model.config.encoder.image_token_id)[..., None], features)
        encoded = model.model.encoder.text_model(inputs_embeds=embeds)
        t2 = time.perf_counter()
        model.generate(encoder_outputs=encoded, input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t3 = time.perf_counter()
        model.generate(encoder_outputs=encoded, input_ids=ids, max_new_tokens=n_decode + 1,
                       min_new_tokens=n_decode + 1, do_sample=False)
        t4 = time.perf_counter()
    return t1 - t0, ids.shape[1] / (t2 - t1), n_decode / ((t4 - t3) - (t3 - t2))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=896)
    p.add_argument("--vision-layers", type=int, default=27)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args()
    import torch

    import mlxgemma

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(Path(tmp) / "hf", args.image_size, args.vision_layers)
        mlxgemma.convert(Path(tmp) / "hf", Path(tmp) / "f32", dtype="float32")
        mlxgemma.convert(Path(tmp) / "hf", Path(tmp) / "q4", dtype="float32", quantize=True)
        runners = {"transformers float32": (hf, time_torch),
                   "mlxgemma float32": (mlxgemma.load_model(Path(tmp) / "f32"), time_mlx),
                   "mlxgemma 4-bit (mixed_4_6, vision 8-bit)": (mlxgemma.load_model(Path(tmp) / "q4"), time_mlx)}
        ids, pixels = inputs(runners["mlxgemma float32"][0].config)
        results = {name: [] for name in runners}
        for name, (model, fn) in runners.items():  # warm-up: a text-only encoder pass and 2 decode steps
            fn(model, ids[:, -8:], None, 2)
        for trial in range(1, args.trials + 1):
            for name, (model, fn) in runners.items():
                r = fn(model, ids, pixels, args.decode)
                results[name].append(r)
                print(f"  trial {trial} {name}: {r[0]:.2f} s image, {r[1]:.1f} enc tok/s, {r[2]:.2f} dec tok/s",
                      flush=True)
    print(f"\nT5Gemma 2 270m-270m shape, random weights; image {args.image_size}px, {args.vision_layers} SigLIP "
          f"layers; encoder prompt {ids.shape[1]} tokens; decode {args.decode} tokens; medians of {args.trials}; "
          f"{platform.machine()} {platform.system()}, MLX {mx.__version__} ({mx.default_device()}), torch "
          f"{torch.__version__}\n")
    print("| backend | image encode (s) | encoder prompt (tok/s) | decode (tok/s) |\n|---|---|---|---|")
    for name, rows in results.items():
        med = [statistics.median(col) for col in zip(*rows)]
        print(f"| {name} | {med[0]:.2f} | {med[1]:.1f} | {med[2]:.2f} |")


if __name__ == "__main__":
    main()

"""Gemma 3 with an image, mlxgemma against mlx-vlm on one checkpoint in one run: image encode time, prompt
tokens/s, decode tokens/s, peak memory, and the max |Δ logits| of each against transformers.

The checkpoint has random weights (seed 0, float32) of gemma-3-4b's widths (tests/real_configs): the SigLIP
tower (1152 wide, 4304 MLP, 16 heads, 896-pixel images in 14-pixel patches, 256 image tokens) and the 4B's
text model (2560 wide, 10240 MLP, 8 query / 4 KV heads of 256, vocabulary 262208); only the layer counts are
cut. transformers builds and saves it; mlxgemma.convert writes the folder both libraries load.

The prompt: <bos>, 20 text tokens, one image block (<start_of_image>, 256 image tokens, <end_of_image>),
20 text tokens. Each library encodes the image (tower + projector) and prefills as its own generation does:
the prompt but its last token (mlxgemma: mlxgemma.media.features.prefill, as mlxgemma.generate; mlx-vlm: what
mlx_vlm's generate_step does, embeddings from the encoded image as its vision cache gives them, chunks that
evaluate only the caches), then the last token gives the first logits. "prompt tok/s" is the prompt over that
prefill and first token, the encode not included; the row "incl. image encode" adds it. Then --decode
greedy steps, each what both generate_steps do per token (the model on the last token, argmax), taken one
library after the other (A B B A ...): this shared VM's speed drifts by tens of percent within minutes, so
the two decodes see the same machine. Trials alternate which library goes first; medians are printed with
the ratio mlxgemma / mlx-vlm. Peak memory: the library's weights plus its encode + prefill's peak above what
was live before it (the other library's weights do not count).

Logits: each library's final hidden states over the whole prompt (one forward, no cache; this is also the
warm-up) times the tied embedding, that matmul taken in torch (MLX's reference BLAS would need minutes for
it); against transformers float32 eager with token_type_ids. Its image tokens attend to each other, future
ones included; mlx-vlm's gemma3 is causal everywhere, so its logits differ. "greedy = transformers" counts
the decoded tokens equal to transformers' generate.

    python benchmarks/gemma3_vision.py [--text-layers 6] [--vision-layers 1] [--repeats 3] [--decode 16]
    python benchmarks/gemma3_vision.py --tiny          # a smoke test of the script, tiny widths
"""

import argparse
import gc
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REAL = Path(__file__).resolve().parent.parent / "tests/real_configs/google__gemma-3-4b-it/config.json"
TINY_TEXT = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=128)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=224)


def build(args, path: Path):
    """A random transformers Gemma3ForConditionalGeneration of the real widths, saved to `path`."""
    import torch
    import transformers

    real = json.loads(REAL.read_text())
    config = {k: v for k, v in real.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    config["text_config"] = dict(config["text_config"], num_hidden_layers=args.text_layers,
                                 **(TINY_TEXT if args.tiny else {}))
    config["vision_config"] = dict(config["vision_config"], num_hidden_layers=args.vision_layers,
                                   **(TINY_VISION if args.tiny else {}))
    if args.tiny:
        config.update(boi_token_index=4000, eoi_token_index=4001, image_token_index=4002)
    config = transformers.Gemma3Config(**config, dtype="float32", attn_implementation="eager")
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():  # matrices ~ 1/sqrt(fan-in), vectors (norms, biases) ~ 0.5
            scale = 1 / math.sqrt(math.prod(p.shape[1:])) if p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(path)
    return model


def prompt(config, n_text: int):
    """(ids, pixel values (1, 3, S, S)): <bos>, text, one image block, text."""
    rng = np.random.default_rng(1)
    text = rng.integers(10, min(config.text_config.vocab_size, config.boi_token_index), n_text).tolist()
    block = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image
    ids = [2] + text[: n_text // 2] + block + [config.eoi_token_index] + text[n_text // 2:]
    size = config.vision_config.image_size
    return ids, rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)


def reference(hf, ids, pixels, n_decode):
    """transformers' logits over the prompt and its greedy tokens."""
    import torch

    ids_t = torch.tensor([ids])
    inputs = dict(input_ids=ids_t, pixel_values=torch.tensor(pixels),
                  token_type_ids=(ids_t == hf.config.image_token_index).long())
    with torch.no_grad():
        logits = hf(**inputs).logits[0].numpy()
        out = hf.generate(**inputs, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
    return logits, out[0, len(ids):].tolist()


def repair(src: Path, dst: Path) -> list:
    """What the converted folder needs for mlx-vlm to read it as Gemma 3 with its tower; says what."""
    notes, config = [], json.loads((dst / "config.json").read_text())
    if "vision_config" not in config:  # mlx_lm.utils.save_config drops it unless keep_vision_config=True
        config["vision_config"] = json.loads((src / "config.json").read_text())["vision_config"]
        notes.append("mlxgemma.convert's config.json had no vision_config (mlx-vlm cannot load it, mlxgemma "
                     "reads a text-only model): the source's was put back")
    text = config["text_config"]
    if "rope_scaling" not in text:  # as the hub's config.json (transformers 4.50) has it
        text["rope_scaling"] = json.loads(REAL.read_text())["text_config"]["rope_scaling"]
        notes.append("text_config.rope_scaling added, as the real config.json has it (mlx-vlm's gemma3 reads "
                     "only that key, not rope_parameters: without it its full layers lose the linear factor 8)")
    (dst / "config.json").write_text(json.dumps(config, indent=4))
    return notes + ["both libraries load that one folder"]


class Ours:
    name = "mlxgemma"

    def __init__(self, path):
        import mlxgemma

        self.model = mlxgemma.load_model(path)

    def hidden(self, ids, pixels):
        ids_mx = mx.array([ids])
        tokens, inputs = self.model.text_inputs(ids_mx, pixel_values=pixels,
                                                token_type_ids=ids_mx == self.model.config.image_token_index)
        return self.model.language_model.model(tokens, **inputs)

    def encode(self, pixels):
        return self.model.get_image_features(mx.array(pixels))

    def prefill(self, ids, features):
        """As mlxgemma.generate: the prompt but its last token through images.prefill, then mlx-lm's loop."""
        from mlxgemma.media.features import prefill

        cache = self.model.make_cache()
        prefill(self.model, cache, ids[:-1], features)
        return cache, self.step(mx.array(ids[-1:]), cache)

    def step(self, y, cache):
        return self.model(y[None], cache=cache)[:, -1]


class Theirs:
    name = "mlx-vlm"

    def __init__(self, path):
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))

    def hidden(self, ids, pixels):
        ids_mx = mx.array([ids])
        embeds = self.model.get_input_embeddings(ids_mx, mx.array(pixels), mask=mx.ones(ids_mx.shape)).inputs_embeds
        return self.model.language_model.model(ids_mx, inputs_embeds=embeds)

    def encode(self, pixels):  # what get_input_embeddings does with pixel values
        hidden, _, _ = self.model.vision_tower(mx.array(pixels).transpose(0, 2, 3, 1), output_hidden_states=True)
        return self.model.multi_modal_projector(hidden)

    def prefill(self, ids, features, step: int = 2048):
        """As mlx_vlm.generate_step: the embeddings (the image given encoded, its vision_cache path), the
        prompt but its last token in chunks evaluating only the caches, the last token for the logits."""
        from mlx_vlm.models.cache import make_prompt_cache

        ids_mx, lm = mx.array([ids]), self.model.language_model
        cache = make_prompt_cache(lm)
        embeds = self.model.get_input_embeddings(ids_mx, mx.zeros((1,)), mask=mx.ones(ids_mx.shape),
                                                 cached_image_features=features).inputs_embeds
        for start in range(0, len(ids) - 1, step):
            end = min(start + step, len(ids) - 1)
            lm(ids_mx[:, start:end], inputs_embeds=embeds[:, start:end], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        return cache, lm(ids_mx[:, -1:], inputs_embeds=embeds[:, -1:], cache=cache).logits[:, -1]

    def step(self, y, cache):
        return self.model.language_model(y[None], cache=cache).logits[:, -1]


def trial(libs, ids, pixels, n_decode, weights: dict) -> dict:
    """Each library's encode and prefill in turn (peak memory over those), then their greedy decode steps
    interleaved one by one (A B B A ...), so that both see the same machine."""
    out, state = {}, {}
    for lib in libs:
        gc.collect()
        mx.clear_cache()
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        features = lib.encode(pixels)
        mx.eval(features)
        t1 = time.perf_counter()
        cache, logits = lib.prefill(ids, features)
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
        t2 = time.perf_counter()
        out[lib.name] = dict(encode=t1 - t0, prompt=len(ids) / (t2 - t1), prompt_all=len(ids) / (t2 - t0),
                             memory=(weights[lib.name] + mx.get_peak_memory() - before) / 2**30,
                             tokens=[y.item()], seconds=0.0)
        state[lib.name] = [cache, y]
    return decode_interleaved(libs, state, out, n_decode)


def decode_interleaved(libs, state: dict, out: dict, n_decode: int) -> dict:
    """n_decode greedy steps per library from state[name] = [cache, last token], one library after the other
    (A B B A ...), each step timed; out[name] gains the tokens and "decode" (tokens/s). (gemma4_media.py too.)"""
    for i in range(n_decode):
        for lib in libs if i % 2 == 0 else libs[::-1]:
            cache, y = state[lib.name]
            t0 = time.perf_counter()
            y = mx.argmax(lib.step(y, cache), axis=-1)
            mx.eval(y)
            out[lib.name]["seconds"] += time.perf_counter() - t0
            out[lib.name]["tokens"].append(y.item())
            state[lib.name][1] = y
    for r in out.values():
        r["decode"] = n_decode / r.pop("seconds") if n_decode else float("nan")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-layers", type=int, default=6, help="real: 34; the real pattern (5 sliding : 1 full)")
    p.add_argument("--vision-layers", type=int, default=1, help="real: 27")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of this script")
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = p.parse_args()
    import torch

    import mlxgemma

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="gemma3-vision-"))
    src, dst = work / "hf", work / "mlx"
    hf = build(args, src)
    ids, pixels = prompt(hf.config, args.text_tokens)
    ref, ref_tokens = reference(hf, ids, pixels, args.decode + 1)
    embedding = hf.get_input_embeddings().weight.detach()
    types = hf.config.text_config.layer_types
    del hf
    gc.collect()
    mlxgemma.convert(src, dst)
    libs, weights, notes = [], {}, repair(src, dst)
    for cls in (Ours, Theirs):
        gc.collect()
        before = mx.get_active_memory()
        libs.append(cls(dst))
        mx.eval(libs[-1].model.parameters())
        weights[cls.name] = mx.get_active_memory() - before
    deltas, first_image = {}, ids.index(libs[0].model.config.image_token_index)
    for lib in libs:  # warm-up and accuracy
        h = np.array(lib.hidden(ids, pixels).astype(mx.float32))[0]
        diff = np.abs((torch.from_numpy(h) @ embedding.T).numpy() - ref).max(axis=-1)
        deltas[lib.name] = (diff[-1], diff.max(), int(diff.argmax()), diff[:first_image].max())
        print(f"  {lib.name}: max |Δ logits| {diff.max():.2e} (position {diff.argmax()})", flush=True)
    results = {lib.name: [] for lib in libs}
    for r in range(args.repeats):
        for name, t in trial(libs if r % 2 == 0 else libs[::-1], ids, pixels, args.decode, weights).items():
            results[name].append(t)
            print(f"  trial {r + 1} {name}: {t['encode']:.2f} s encode, {t['prompt']:.2f} prompt tok/s, "
                  f"{t['decode']:.3f} decode tok/s, {t['memory']:.2f} GB", flush=True)
    report(args, ids, libs[0].model.config.image_token_index, types, results, deltas, ref_tokens, notes, weights,
           time.perf_counter() - start)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def cpu() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else platform.processor()


def report(args, ids, image, types, results, deltas, ref_tokens, notes, weights, seconds):
    import torch

    first, n_img = ids.index(image), ids.count(image)
    kinds = ", ".join(f"{types.count(t)} {t.split('_')[0]}" for t in dict.fromkeys(types))
    print(f"\nGemma 3 with one image, random weights of gemma-3-4b's widths{' (TINY widths)' if args.tiny else ''}, "
          f"float32; reduced: text {args.text_layers} of 34 layers ({kinds}), vision tower {args.vision_layers} of "
          f"27 layers. Prompt {len(ids)} tokens (image tokens at {first}..{first + n_img - 1}), {args.decode} "
          f"greedy decode steps; medians of {args.repeats} trials (order alternating). {'; '.join(notes)}.")
    print(f"{platform.machine()} {platform.system()}, {cpu()}, MLX {mx.__version__} ({mx.default_device()}), "
          f"torch {torch.__version__}; whole run {seconds / 60:.1f} min\n")
    rows = [("image encode, tower + projector (s)", "encode", "{:.2f}", False),
            ("prompt tok/s (image encode not included)", "prompt", "{:.2f}", True),
            ("prompt tok/s incl. image encode", "prompt_all", "{:.2f}", True),
            ("decode tok/s", "decode", "{:.3f}", True),
            ("peak memory (GB, weights + run)", "memory", "{:.2f}", False)]
    a, b = results["mlxgemma"], results["mlx-vlm"]
    print("| figure | mlxgemma | mlx-vlm | mlxgemma / mlx-vlm | per-trial ratios |\n|---|---|---|---|---|")
    for label, key, fmt, higher in rows:
        ma, mb = (statistics.median(t[key] for t in x) for x in (a, b))
        ratios = [x[key] / y[key] for x, y in zip(a, b)]
        print(f"| {label} | {fmt.format(ma)} | {fmt.format(mb)} | {ma / mb:.3f} ({'higher' if higher else 'lower'} "
              f"is better) | {min(ratios):.3f} to {max(ratios):.3f} |")
    print(f"| weights resident (GB) | {weights['mlxgemma'] / 2**30:.2f} | {weights['mlx-vlm'] / 2**30:.2f} | "
          f"{weights['mlxgemma'] / weights['mlx-vlm']:.3f} | |")
    d, e = deltas["mlxgemma"], deltas["mlx-vlm"]
    for i, label in ((0, "at the last prompt position"), (1, "over the prompt"), (3, "over the text before the image")):
        print(f"| max abs Δ logits vs transformers, {label} | {d[i]:.2e} | {e[i]:.2e} | | |")
    print(f"| position of the largest Δ | {d[2]} | {e[2]} | | |")
    same = [sum(x == y for x, y in zip(t[0]["tokens"], ref_tokens)) for t in (a, b)]
    n = len(ref_tokens)
    print(f"| greedy tokens = transformers' (first trial) | {same[0]}/{n} | {same[1]}/{n} | | |")

if __name__ == "__main__":
    main()

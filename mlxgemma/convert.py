"""python -m mlxgemma.convert: convert HF / Hub / MLX / GGUF weights into an MLX checkpoint, optionally quantized
(the library function is mlxgemma.checkpoints.convert.convert).

    python -m mlxgemma.convert --hf-path google/gemma-3-270m --mlx-path gemma3-4bit -q
"""

import argparse
import sys

from .checkpoints.convert import convert
from .checkpoints.quantize import RECIPES, VISION_BITS
from .cli import run


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.convert",
                                description="Convert HF / Hub / MLX / GGUF weights into an MLX checkpoint.")
    p.add_argument("--hf-path", "--model", required=True, help="HF directory, Hub repo id or .gguf file")
    p.add_argument("--mlx-path", default="mlx_model", help="where to write the MLX checkpoint")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, default=64, help="group size (default 64)")
    p.add_argument("--quant-predicate", default=None,
                   help=f"recipe: {', '.join(RECIPES)} (default: budget at 4 bits, else uniform)")
    p.add_argument("--q-vision-bits", default=str(VISION_BITS), choices=["4", "8", "float"],
                   help=f"bits for a vision tower (Gemma 3, Gemma 4, T5Gemma 2), or float (default {VISION_BITS}, "
                        "measured)")
    p.add_argument("--q-audio-bits", default=str(VISION_BITS), choices=["4", "8", "float"],
                   help=f"bits for an audio tower (Gemma 4 E2B/E4B), or float (default {VISION_BITS})")
    p.add_argument("--calibrate", action="store_true", help="with -q: GPTQ rounding on activations of real text")
    p.add_argument("--calibration-data", default=None, metavar="FILE|builtin",
                   help="UTF-8 text to calibrate on (default: the built-in text)")
    p.add_argument("--calibration-samples", type=int, default=None, help="rows of text (default: all there are)")
    p.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--awq", action=argparse.BooleanOptionalAction, default=True,
                   help="with --calibrate: AWQ's input scaling before GPTQ where the family has it (default), "
                        "or (--no-awq) none")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="the budget recipe's bits per weight, scales included (default: --q-bits + 0.75 at "
                        "4 bits)")
    p.add_argument("--q-search", action=argparse.BooleanOptionalAction, default=True,
                   help="choose each group's grid by least rounding error among clipped ones (default), or "
                        "(--no-q-search) from its min and max as mlx-lm does")
    p.add_argument("--dtype", default=None, help="float dtype: float32, float16, bfloat16")
    p.add_argument("-d", "--dequantize", action="store_true", help="write float weights from a quantized source")
    p.add_argument("--revision", default=None, help="Hub revision")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    return p


def main(argv=None) -> int:
    args = configure_parser().parse_args(argv)

    def body() -> int:
        dst = convert(args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize,
                      q_bits=args.q_bits, q_group_size=args.q_group_size, quant_predicate=args.quant_predicate,
                      dequantize=args.dequantize, overwrite=args.overwrite, revision=args.revision,
                      q_vision_bits=None if args.q_vision_bits == "float" else int(args.q_vision_bits),
                      q_audio_bits=None if args.q_audio_bits == "float" else int(args.q_audio_bits),
                      calibrate=args.calibrate, calibration_data=args.calibration_data,
                      calibration_samples=args.calibration_samples, calibration_seq_len=args.calibration_seq_len,
                      target_bpw=args.target_bpw, q_search=args.q_search, awq=args.awq)
        print(f"[mlxgemma] wrote {dst}", file=sys.stderr)
        return 0

    return run(body, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    sys.exit(main())

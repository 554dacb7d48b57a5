"""Transcribe (or describe) audio files with Gemma 4 E2B/E4B, one line per file: WAV, FLAC, MP3, M4A or OGG,
any sample rate (resampled to 16 kHz), up to 30 s each (a longer recording: cut it into parts first).

    python examples/transcribe.py --model PATH/TO/gemma-4-E2B-it memos/*.m4a
    python examples/transcribe.py --model PATH/TO/gemma-4-E4B-it call.wav --prompt "Summarise this call."
"""

import argparse
import sys
from pathlib import Path

import mlxgemma


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+", help="audio files, or folders of them")
    p.add_argument("--model", required=True, help="a Gemma 4 checkpoint with an audio tower (E2B, E4B)")
    p.add_argument("--prompt", default="Transcribe this audio.")
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    try:
        model, processor = mlxgemma.load(args.model)
        if "audio" not in getattr(processor, "marks", {}) or processor.feature_extractor is None:
            raise mlxgemma.MlxGemmaError(f"{args.model} does not hear: transcription needs Gemma 4 E2B or E4B")
        files = [f for arg in args.files for f in (sorted(arg.iterdir()) if arg.is_dir() else [arg])]
    except (mlxgemma.MlxGemmaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for f in files:
        try:  # one bad file does not stop the others
            text = mlxgemma.generate(model, processor, args.prompt, audio=[f], max_tokens=args.max_tokens)
            print(f"{f.name}: {' '.join(text.split())}", flush=True)
        except mlxgemma.MlxGemmaError as e:
            failed += 1
            print(f"{f.name}: error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

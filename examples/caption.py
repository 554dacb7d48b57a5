"""Caption every image in a folder with a T5Gemma 2 checkpoint, one line per image.

    python examples/caption.py --model PATH_OR_REPO photos/ --prompt " in this image, there is"
"""

import argparse
import sys
from pathlib import Path

import mlxgemma

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--model", required=True, help="T5Gemma 2 checkpoint (MLX/HF directory or Hub id)")
    p.add_argument("--prompt", default=" in this image, there is")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    try:
        model, processor = mlxgemma.load(args.model)
        files = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in EXTENSIONS)
        if not files:
            raise mlxgemma.MlxGemmaError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {args.folder}")
        for f in files:
            try:
                text = mlxgemma.generate(model, processor, args.prompt, image=f, max_tokens=args.max_tokens)
                print(f"{f.name}: {' '.join(text.split())}", flush=True)
            except mlxgemma.MlxGemmaError as e:  # one bad file does not stop the others
                print(f"{f.name}: error: {e}", file=sys.stderr)
    except (mlxgemma.MlxGemmaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

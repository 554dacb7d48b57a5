"""Caption every image in a folder with an image+text checkpoint, one line per image. Gemma 4 and Gemma 3 (4B
and up) caption --batch-size images at a time: their tower encodes them together, and their captions decode
together in one batched forward per token. T5Gemma 2 captions one at a time.

    python examples/caption.py --model mlx-community/gemma-3-4b-it-4bit photos/ --prompt "Describe this photo."
    python examples/caption.py --model PATH/TO/gemma-4-E4B-it photos/ --image-budget 560
    python examples/caption.py --model PATH_OR_REPO photos/ --prompt " in this image, there is"   # T5Gemma 2
"""

import argparse
import sys
from pathlib import Path

import mlxgemma

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--model", required=True, help="Gemma 4, Gemma 3 or T5Gemma 2 checkpoint (MLX/HF directory or "
                   "Hub id)")
    p.add_argument("--prompt", default=None, help="default: 'Describe this image in one sentence.' (Gemma 3), "
                   "' in this image, there is' (T5Gemma 2)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4, help="images captioned together (Gemma 4, Gemma 3)")
    p.add_argument("--image-budget", type=int, default=None, help="Gemma 4: soft tokens per image (70 to 1120)")
    args = p.parse_args()
    try:
        model, processor = mlxgemma.load(args.model)
        files = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in EXTENSIONS)
        if not files:
            raise mlxgemma.MlxGemmaError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {args.folder}")
        if args.batch_size < 1:
            raise mlxgemma.MlxGemmaError(f"--batch-size must be positive, got {args.batch_size}")
        if "image" not in getattr(processor, "marks", {}):
            raise mlxgemma.MlxGemmaError(f"{args.model} is a text-only checkpoint: captions need Gemma 4, Gemma 3 "
                                         "(4B and up, with its vision tower) or T5Gemma 2")
        if args.image_budget is not None and not isinstance(processor, mlxgemma.Gemma4Processor):
            raise mlxgemma.MlxGemmaError("--image-budget is Gemma 4's")
        if isinstance(processor, mlxgemma.T5Gemma2Processor):
            prompt = " in this image, there is" if args.prompt is None else args.prompt
            for f in files:
                _print(f, lambda: mlxgemma.generate(model, processor, prompt, image=f, max_tokens=args.max_tokens))
        else:
            caption_in_batches(model, processor, files, args)
    except (mlxgemma.MlxGemmaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def caption_in_batches(model, processor, files, args) -> None:
    from mlxgemma.generate import prompt_text
    from mlxgemma.decode.batch import generate_batch
    from mlxgemma.media.processor import load_image

    prompt = "Describe this image in one sentence." if args.prompt is None else args.prompt
    text = prompt_text(processor.tokenizer, processor.marks["image"] + prompt, None, chat_template=True)
    options = {} if args.image_budget is None else {"max_soft_tokens": args.image_budget}
    for start in range(0, len(files), args.batch_size):
        group, images = [], []
        for f in files[start:start + args.batch_size]:
            try:  # one bad file does not stop the others
                images.append(load_image(f))
                group.append(f)
            except mlxgemma.MlxGemmaError as e:
                print(f"{f.name}: error: {e}", file=sys.stderr)
        if group:
            captions = generate_batch(model, processor, [text] * len(group), [[i] for i in images], args.max_tokens,
                                      **options)
            for f, caption in zip(group, captions):
                print(f"{f.name}: {' '.join(caption.split())}", flush=True)


def _print(f, caption) -> None:
    try:
        print(f"{f.name}: {' '.join(caption().split())}", flush=True)
    except mlxgemma.MlxGemmaError as e:  # one bad file does not stop the others
        print(f"{f.name}: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

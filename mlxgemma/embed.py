"""python -m mlxgemma.embed: embeddings of files or of standard input's lines, as JSON lines or a .npy file.

    python -m mlxgemma.embed --model PATH/embeddinggemma-300m --prompt-name document notes/*.txt > index.jsonl
    echo "where did I park" | python -m mlxgemma.embed --model PATH --prompt-name query --dim 256
    python -m mlxgemma.embed --model PATH --output vectors.npy < lines.txt

Each file is one input: its whole UTF-8 text, or (EmbeddingGemma 2) an image, audio or video file by its
suffix; without files each line of standard input is one (empty lines skipped). The Python API is
mlxgemma.embed (embedding/encode.py)."""

import argparse
import json
import sys
from pathlib import Path
from typing import List

from .cli import DTYPE_CHOICES, run
from .embedding.encode import embed
from .errors import MlxGemmaError

__all__ = ["embed", "main"]
MEDIA = {"image": {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}, "audio": {".wav", ".mp3", ".m4a", ".flac", ".ogg"},
         "video": {".mp4", ".mov", ".mkv", ".webm", ".avi"}}


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.embed", description="Embed texts with EmbeddingGemma.")
    p.add_argument("files", nargs="*", help="text files (and, for EmbeddingGemma 2, images, audio, video), one input "
                   "each (default: standard input, a line each)")
    p.add_argument("--model", required=True, help="an embedding model: a sentence-transformers folder "
                   "(EmbeddingGemma), EmbeddingGemma 2, or their Hub ids")
    p.add_argument("--prompt-name", default=None, help="one of the model's prompts, e.g. query or document")
    p.add_argument("--prompt", default=None, help="a prompt of your own, put before each input")
    p.add_argument("--dim", type=int, default=None, help="keep the first DIM values (Matryoshka: 512, 256, 128)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="do not normalise again after --dim")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward (default: %(default)s)")
    p.add_argument("--output", "-o", default=None, help="write a .npy file (N, dim) instead of JSON lines")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="compute dtype (default: %(default)s)")
    return p


def read_inputs(files: List[str]) -> tuple:
    """(names, texts): each file's text, or standard input's non-empty lines."""
    if files:
        texts = []
        for f in files:
            kind = next((k for k, suffixes in MEDIA.items() if Path(f).suffix.lower() in suffixes), None)
            if kind is not None:
                if not Path(f).is_file():
                    raise MlxGemmaError(f"{f}: no such file")
                texts.append({kind: f})
                continue
            try:
                texts.append(Path(f).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise MlxGemmaError(f"{f}: no such file") from None
            except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
                raise MlxGemmaError(f"{f}: cannot read it as UTF-8 text ({type(e).__name__})") from None
        return list(files), texts
    raw = getattr(sys.stdin, "buffer", None)
    try:
        text = raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise MlxGemmaError(f"standard input is not UTF-8 text (byte {e.start})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    return [f"line {i + 1}" for i in range(len(lines))], lines


class Progress:
    """A bar on standard error once the inputs fill more than one batch."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="input", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    args = configure_parser().parse_args(argv)

    def body() -> int:
        import numpy as np

        from .checkpoints.loading import load

        if args.output is not None and not args.output.endswith(".npy"):
            raise MlxGemmaError("--output writes a .npy file (JSON lines go to standard output)")
        names, texts = read_inputs(args.files)
        if not texts:
            raise MlxGemmaError("nothing to embed: give files or lines on standard input")
        model, tokenizer = load(args.model, dtype=args.dtype)
        progress = Progress() if len(texts) > args.batch_size else None
        try:
            vectors = np.array(embed(model, tokenizer, texts, prompt_name=args.prompt_name, prompt=args.prompt,
                                     dim=args.dim, normalize=args.normalize, batch_size=args.batch_size,
                                     progress=progress))
        finally:
            if progress is not None:
                progress.close()
        if args.output:
            np.save(args.output, vectors)
            print(f"wrote {vectors.shape[0]} embeddings of {vectors.shape[1]} values to {args.output}", file=sys.stderr)
            return 0
        for i, (name, v) in enumerate(zip(names, vectors)):
            print(json.dumps({"index": i, "input": name, "embedding": v.tolist()}))
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

"""Search your own files offline: index a folder of text files (and, with EmbeddingGemma 2, images and audio)
with an embedding model, then query it. The index is two files beside each other: INDEX.npy (the vectors) and
INDEX.json (what each row is).

    python examples/search.py index notes/ --model PATH/embeddinggemma-300m --index notes-index
    python examples/search.py query "where did I write about the boiler" --model PATH/embeddinggemma-300m \\
        --index notes-index --top 5

EmbeddingGemma's task prompts are used as it was trained: "document" for what is indexed, "query" for what
is asked. Text files are cut into passages of about --chunk characters (on line breaks) so that a long file
is found by any of its parts; the scores are cosine similarities (the vectors are unit length).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import mlxgemma

TEXT = {".txt", ".md", ".rst", ".py", ".csv", ".json", ".html", ".tex", ".org"}
IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
AUDIO = {".wav", ".mp3", ".m4a", ".flac", ".ogg"}


def passages(text: str, size: int) -> list:
    """Consecutive runs of lines of about `size` characters (a line longer than that is a passage itself)."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > size:
            out.append(current)
            current = ""
        current += line
    return [p for p in out + [current] if p.strip()]


def collect(folder: Path, size: int, media: bool) -> tuple:
    """(inputs for mlxgemma.embed, a description of each): text passages, then images and clips if asked."""
    inputs, rows = [], []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = f.suffix.lower()
        if suffix in TEXT:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                print(f"skipped {f}: not UTF-8 text", file=sys.stderr)
                continue
            for i, p in enumerate(passages(text, size)):
                inputs.append(p)
                rows.append({"file": str(f), "passage": i, "text": p[:200]})
        elif media and suffix in IMAGES | AUDIO:
            inputs.append({"image" if suffix in IMAGES else "audio": str(f)})
            rows.append({"file": str(f)})
    return inputs, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["index", "query"])
    p.add_argument("target", help="index: the folder; query: the question")
    p.add_argument("--model", required=True, help="EmbeddingGemma (a sentence-transformers folder) or EmbeddingGemma 2")
    p.add_argument("--index", default="index", help="the index's path without extension (default: %(default)s)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1000, help="characters per text passage (default: %(default)s)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka size of the vectors (e.g. 256: a smaller index)")
    p.add_argument("--media", action="store_true", help="also index images and audio (EmbeddingGemma 2)")
    args = p.parse_args()
    try:
        model, processor = mlxgemma.load(args.model)
        if args.command == "index":
            inputs, rows = collect(Path(args.target), args.chunk, args.media)
            if not inputs:
                raise mlxgemma.MlxGemmaError(f"nothing to index in {args.target}")
            vectors = np.array(mlxgemma.embed(model, processor, inputs, prompt_name="document", dim=args.dim))
            np.save(args.index + ".npy", vectors)
            Path(args.index + ".json").write_text(json.dumps({"dim": args.dim, "rows": rows}))
            print(f"indexed {len(rows)} passages and files into {args.index}.npy / .json", file=sys.stderr)
            return 0
        meta = json.loads(Path(args.index + ".json").read_text())
        vectors = np.load(args.index + ".npy")
        query = np.array(mlxgemma.embed(model, processor, args.target, prompt_name="query", dim=meta["dim"]))[0]
        scores = vectors @ query
        for i in np.argsort(-scores)[: args.top]:
            row = meta["rows"][i]
            where = row["file"] + (f" (passage {row['passage']})" if "passage" in row else "")
            print(f"{scores[i]:.3f}  {where}\n       {row.get('text', '').strip()[:160]!r}")
        return 0
    except (mlxgemma.MlxGemmaError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

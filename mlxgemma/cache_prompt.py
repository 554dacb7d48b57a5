"""python -m mlxgemma.cache_prompt --model M --prompt TEXT --prompt-cache-file F: prefill a prompt once and
save its caches (mlx-lm's tool and flag names). `python -m mlxgemma.generate --prompt-cache-file F` and
`python -m mlxgemma.chat --prompt-cache-file F` then continue from it, prefilling only what they add.

The prompt is cached as text (with <bos>, without the chat template: a document, instructions); what follows
it continues the text (generate: the prompt as written; chat: the conversation through the template).
Images (Gemma 3 with its tower) may be part of it: --image, with <start_of_image> placeholders or in front.
"""

import argparse
import sys

from .cli import DTYPE_CHOICES, load_for_cli, run
from .errors import MlxGemmaError
from .decode.prompt import check_text
from .generate import read_prompt
from .models import has_vision, is_encoder_decoder


def cache_prompt(model, tokenizer, prompt: str, path, image=None, max_kv_size=None, prefill_step_size=2048,
                 progress=None) -> int:
    """Prefill `prompt` (text; tokenizer may be Gemma 3's processor, with `image`) and save its caches to
    path (cache_file.save). Returns the number of tokens cached."""
    from .checkpoints import cache_file
    from .decode.decoder import fill

    if is_encoder_decoder(model):
        raise MlxGemmaError("T5Gemma 2 encodes each request afresh: a prompt-cache file is for decoder-only models")
    check_text(prompt, "the prompt")
    if not prompt.strip() and image is None:
        raise MlxGemmaError("the prompt is empty: give the text to cache")
    cache = model.make_cache(max_kv_size=max_kv_size)
    if has_vision(model):
        from .media.features import encode_prompt, prefill

        images = tokenizer.images_per_prompt(image, 1)[0] if image is not None else []
        if images and tokenizer.marks["image"] not in prompt:
            prompt = tokenizer.marks["image"] * len(images) + prompt
        ids, features = encode_prompt(model, tokenizer, prompt, images)
        prefill(model, cache, ids, features, prefill_step_size, progress)
    else:
        if image is not None:
            raise MlxGemmaError(f"{type(model).__name__} is a text-only model: it takes no image")
        ids = list(tokenizer.encode(prompt))
        fill(model, cache, ids, prefill_step_size)
    cache_file.save(path, model, cache, ids)
    return len(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.cache_prompt", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX/HF directory, Hub repo id or .gguf (default: the embedded model)")
    p.add_argument("--prompt", "-p", default=None, help="the text to cache; - reads standard input")
    p.add_argument("--prompt-cache-file", required=True, help="the file to write (safetensors)")
    p.add_argument("--image", action="append", default=None, help="image file (Gemma 3 with images), repeatable")
    p.add_argument("--max-kv-size", type=int, default=None)
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    args = p.parse_args(argv)

    def body() -> int:
        prompt = read_prompt(args.prompt)
        model, tokenizer = load_for_cli(args)
        n = cache_prompt(model, tokenizer, prompt, args.prompt_cache_file, args.image, args.max_kv_size,
                         args.prefill_step_size)
        print(f"[mlxgemma] cached {n} tokens in {args.prompt_cache_file}", file=sys.stderr)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())

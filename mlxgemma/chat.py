"""python -m mlxgemma.chat --model PATH: a multi-turn REPL.

The conversation goes through the tokenizer's chat template. The KV cache is kept across turns: the cache
holds the tokens of the last prompt and reply, each turn re-renders the conversation, keeps the longest
common prefix (trimming the rest exactly, or starting over when a window-bounded cache cannot trim that far)
and prefills only what is new. /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply.
"""

import argparse
import sys
from typing import Iterator, List, Optional

from .errors import MlxGemmaError
from .models import is_encoder_decoder
from .generate import prompt_ids, stream_generate


class ChatSession:
    def __init__(self, model, tokenizer, system: Optional[str] = None, **options):
        if is_encoder_decoder(model):
            raise MlxGemmaError("chat keeps a decoder-only cache across turns; for T5Gemma 2 use "
                                "python -m mlxgemma.generate (with --image for pictures)")
        if not getattr(tokenizer, "chat_template", None):
            raise MlxGemmaError("this model's tokenizer has no chat template: use python -m mlxgemma.generate")
        self.model, self.tokenizer, self.system, self.options = model, tokenizer, system, options
        self.reset()

    def reset(self) -> None:
        self.messages: List[dict] = []
        self.cache = self.model.make_cache(max_kv_size=self.options.get("max_kv_size"))
        self.cached: List[int] = []  # the token ids the cache holds, in order

    def _reuse(self, ids: List[int]) -> int:
        """Keep the cached prefix shared with ids (at least one token must stay new); returns its length."""
        common = 0
        for a, b in zip(self.cached, ids[:-1]):
            if a != b:
                break
            common += 1
        drop = len(self.cached) - common
        if drop and not all(c.trim(drop) == drop for c in self.cache):
            self.cache = self.model.make_cache(max_kv_size=self.options.get("max_kv_size"))
            common = 0
        self.cached = self.cached[:common]
        return common

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to a user message; it joins the conversation even if interrupted."""
        self.messages.append({"role": "user", "content": text})
        ids = prompt_ids(self.tokenizer, self.messages, self.system)
        start = self._reuse(ids)
        generated, pieces = [], []
        try:
            for chunk in stream_generate(self.model, self.tokenizer, ids[start:], prompt_cache=self.cache,
                                         **self.options):
                generated.append(chunk.token)
                pieces.append(chunk.text)
                yield chunk.text
        finally:
            # mlx-lm feeds each token before yielding it: the cache holds the prompt and every yielded token
            # (an interruption during the prefill leaves it partial: trust its offset).
            self.cached = (ids + generated)[: self.cache[0].offset]
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.chat", description="Chat with a Gemma model.")
    p.add_argument("--model", default=None, help="model path, Hub id or .gguf (default: the embedded model)")
    p.add_argument("--system", default=None)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None)
    args = p.parse_args(argv)
    try:
        from .default_model import default_model_path
        from .loading import load

        model, tokenizer = load(args.model if args.model else default_model_path())
        session = ChatSession(model, tokenizer, args.system, max_tokens=args.max_tokens, temp=args.temp,
                              top_p=args.top_p, seed=args.seed, max_kv_size=args.max_kv_size)
    except MlxGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("[mlxgemma chat] /reset starts over, /quit leaves, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/quit leaves)", file=sys.stderr)
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            for text in session.reply(line):
                print(text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=sys.stderr)
        except MlxGemmaError as e:
            print(f"error: {e}", file=sys.stderr)
        print()


if __name__ == "__main__":
    sys.exit(main())

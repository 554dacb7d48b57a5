"""What the command lines (generate, chat, convert) share: the generation options with mlx-lm's names, one
line and exit code 2 for bad input, 130 for Ctrl-C, and SIGTERM treated as Ctrl-C so that every cleanup
(a convert's temporary folder, for one) runs before the process ends."""

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional

from .errors import MlxGemmaError
from .checkpoints.loading import DTYPES

DTYPE_CHOICES = ["auto"] + list(DTYPES)


def add_generation_options(p, max_tokens: int = 100) -> None:
    """mlx_lm.generate's sampling and cache options (and its --max-tokens default of 100)."""
    p.add_argument("--model", default=None, help="MLX/HF directory, Hub repo id or .gguf (default: the embedded "
                   "Gemma 3 270M of mlxgemma[demo])")
    p.add_argument("--max-tokens", "-m", type=int, default=max_tokens,
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                   "this probability mass; 1 keeps all (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 is off "
                   "(default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this fraction of the "
                   "most likely one; 0 is off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalize the last 20 tokens (mlx-lm's); e.g. 1.1 (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same tokens "
                   "(default: random)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="bound every KV cache to this many tokens (full layers then attend to a window)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype; auto: float32 on MLX's CPU backend, the checkpoint's own (bf16) on a GPU")
    p.add_argument("--kv-bits", type=int, default=None, choices=[4, 8],
                   help="store the KV caches quantized to this many bits (default: float)")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV caches")
    p.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="quantize a cache once it holds this many tokens (with --kv-bits)")
    p.add_argument("--prompt-cache-file", default=None, help="continue from a prompt cached by "
                   "python -m mlxgemma.cache_prompt (only the new tokens are prefilled)")
    p.add_argument("--draft-model", default=None, help="a smaller model of the same tokenizer that proposes "
                   "tokens for the model to check (speculative decoding; output as without it)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="tokens proposed per step (default 3)")
    p.add_argument("--prompt-lookup-ngram", type=int, default=None, help="speculate without a draft model: "
                   "propose what followed the last N tokens where they occurred before (prompt lookup)")
    add_pipeline_option(p)


def add_thinking_options(p, where: Optional[str] = None) -> None:
    """Gemma 4's thinking switch and budget, the chat template's arguments, and (where a command shows thoughts:
    `where`) --hide-thinking."""
    p.add_argument("--think", dest="think", action="store_true", default=None,
                   help="think before answering (Gemma 4: enable_thinking; default: the chat template's, off)")
    p.add_argument("--no-think", dest="think", action="store_false", help="do not think before answering")
    p.add_argument("--chat-template-args", default=None, metavar="JSON",
                   help='JSON arguments for the chat template, e.g. \'{"enable_thinking": true}\'')
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="close a thought after N tokens and let the answer start (default: no bound)")
    if where is not None:
        p.add_argument("--hide-thinking", action="store_true",
                       help=f"do not show thoughts ({where}, dimmed on a terminal)")


def thinking_kwargs(args) -> dict:
    """stream_generate's think, chat_template_args and max_thinking_tokens, checked (before a model loads)."""
    import json

    template_args = None
    if args.chat_template_args is not None:
        try:
            template_args = json.loads(args.chat_template_args)
        except ValueError as e:
            raise MlxGemmaError(f"--chat-template-args is not JSON: {e}") from None
        if not isinstance(template_args, dict):
            raise MlxGemmaError("--chat-template-args must be a JSON object")
    from .decode.thinking import check_budget

    check_budget(args.max_thinking_tokens)
    return dict(think=args.think, chat_template_args=template_args, max_thinking_tokens=args.max_thinking_tokens)


def unescape(text: str) -> str:
    """A command-line string with its backslash escapes made real (--stop "\\n\\n" is two newlines, as a user
    typing it means); text that is not a valid escape sequence stays as typed."""
    if "\\" not in text:
        return text
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return text


def add_pipeline_option(p) -> None:
    p.add_argument("--pipeline", action="store_true", help="under mlx.launch with several ranks: split the "
                   "model by runs of layers (pipeline parallelism) instead of by heads (tensor parallelism)")


def sampling_kwargs(args) -> dict:
    launched(args)  # under mlx.launch: every rank's seed is rank 0's
    speculation = {"num_draft_tokens": args.num_draft_tokens, "prompt_lookup_ngram": args.prompt_lookup_ngram,
                   "kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size,
                   "quantized_kv_start": args.quantized_kv_start}
    return dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, max_kv_size=args.max_kv_size,
                **speculation)


def add_structured_options(p) -> None:
    """Structured output: at most one constraint on the whole completion (constrained.py)."""
    p.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                   help="the output is JSON that matches this schema (a file, or the schema itself)")
    p.add_argument("--regex", default=None, help="the output matches this regular expression")
    p.add_argument("--choices", nargs="+", default=None, help="the output is exactly one of these strings")
    p.add_argument("--grammar", default=None, metavar="FILE|TEXT", help="the output follows this Lark or GBNF grammar")


def structured_kwargs(args) -> dict:
    """The constraint of --json-schema / --regex / --choices / --grammar for stream_generate."""
    from pathlib import Path

    def text_of(value, what):
        if value is None or value.lstrip().startswith(("{", "[")) or "\n" in value:
            return value
        path = Path(value)
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MlxGemmaError(f"cannot read {what} {value}: {e}") from None
        if what == "--json-schema":
            raise MlxGemmaError(f"--json-schema {value!r} is neither a file nor JSON")
        return value

    return dict(json_schema=text_of(args.json_schema, "--json-schema"), regex=args.regex, choices=args.choices,
                grammar=text_of(args.grammar, "--grammar"))


def load_draft(args):
    """The --draft-model (None without one), in the --dtype of the model."""
    if args.draft_model is None:
        return None
    from .checkpoints.loading import load_model

    return load_model(args.draft_model, dtype=args.dtype)


def load_for_cli(args, sharded: bool = False):
    """(model, tokenizer or processor) of --model, or of the embedded default model when none is given;
    sharded across the ranks when launched with several (mlx.launch -n N ...: see launched) and the command
    runs so (sharded; generate does), else refused there."""
    from .checkpoints.default_model import default_model_path
    from .checkpoints.loading import load

    group = launched(args)
    if group is not None and not sharded:
        from pathlib import Path

        import mlx.core as mx

        # Every rank reaches this point before any exits: mlx.launch stops the others as soon as one exits, and
        # shows only rank 0's output, so a rank 1 that got here first used to cut rank 0 off before it spoke.
        mx.eval(mx.distributed.all_sum(mx.array(0), group=group))
        here = Path(sys.argv[0])
        name = here.parent.name if here.stem == "__main__" else here.stem
        raise MlxGemmaError(f"python -m mlxgemma.{name} does not run across ranks yet (each input would have to "
                            "reach every rank): under mlx.launch, run python -m mlxgemma.generate, chat or server")
    if group is not None and getattr(args, "prompt_cache_file", None):
        raise MlxGemmaError("--prompt-cache-file holds one process's whole cache: it cannot be split across the "
                            "ranks of mlx.launch (leave it out there)")
    return load(args.model if args.model else default_model_path(), dtype=args.dtype, group=group,
                pipeline=getattr(args, "pipeline", False))


def launched(args=None):
    """The mx.distributed group when this process is one of several ranks (mlx.launch), else None. Then only
    rank 0 writes to the terminal, and every rank samples with the same seed (rank 0's), so all agree on
    each token."""
    import os

    if not any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE")):
        return None  # not launched: no distributed backend is even looked for
    import mlx.core as mx

    try:
        group = mx.distributed.init()
    except RuntimeError:  # mlx.launch -n 1 writes a host file its own backend cannot read: one process
        return None
    if group.size() == 1:
        return None
    if args is not None and getattr(args, "seed", 0) is None:
        import random

        mine = mx.array(random.getrandbits(62) if group.rank() == 0 else 0, dtype=mx.int64)
        args.seed = int(mx.distributed.all_sum(mine, group=group, stream=mx.cpu).item())
    if group.rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return group


def share(group, data: Optional[bytes]) -> Optional[bytes]:
    """Rank 0's bytes (or None) on every rank of group: under mlx.launch, what one rank reads (a line typed,
    an image file) must reach every rank, which then act on it alike."""
    import mlx.core as mx
    import numpy as np

    mine = group.rank() == 0
    n = int(mx.distributed.all_sum(mx.array((-1 if data is None else len(data)) if mine else 0), group=group,
                                   stream=mx.cpu).item())
    if n <= 0:
        return None if n < 0 else b""
    buf = np.frombuffer(data, np.uint8) if mine else np.zeros(n, np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(buf), group=group, stream=mx.cpu)))


def shared_input(group):
    """input(prompt) on rank 0, the same line (or EOFError) on every rank of group."""

    def read(prompt: str = "") -> str:
        data = None
        if group.rank() == 0:
            try:
                data = input(prompt).encode()
            except EOFError:
                pass
        data = share(group, data)
        if data is None:
            raise EOFError
        return data.decode()

    return read


def interrupt_ends_run() -> None:
    """Under mlx.launch Ctrl-C reaches each rank at its own moment: rather than leave the ranks at different
    tokens, it ends the run everywhere (as SIGTERM does)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise_terminated)


def _raise_terminated(signum, frame):
    raise Terminated


def run(body, interrupted: str = "[interrupted]") -> int:
    """body() -> exit code, with bad input as one line on stderr (exit 2) and Ctrl-C or SIGTERM as exit 130."""
    with _sigterm_as_interrupt():
        try:
            return body()
        except MlxGemmaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\n{interrupted}", file=sys.stderr)
            return 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanups run; a REPL that survives Ctrl-C lets this one through."""


@contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signals can only be set there
        yield
        return

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PrefillProgress:
    """'[prefill] done/total tokens' on stderr for prompts longer than one prefill chunk (updated in place on
    a terminal, a line per chunk otherwise); mlx-lm's generate loop calls it after every chunk."""

    def __init__(self, chunk: int, stream=None):
        self.chunk, self.stream = chunk, stream or sys.stderr

    def __call__(self, done: int, total: int) -> None:
        if total <= self.chunk or done == 0:
            return
        tty = self.stream.isatty()
        end = "\n" if done >= total or not tty else ""
        print(f"{chr(13) if tty else ''}[prefill] {done}/{total} tokens", end=end, file=self.stream, flush=True)

"""mlxgemma's HTTP server against mlx_lm.server on the same MLX checkpoint, in one run on one machine: aggregate
decode tokens/s and time to first token (TTFT) for 1..16 concurrent streaming clients, and the TTFT of each
turn of a 6-turn conversation with the prompt cache on and off.

Each server is a subprocess on a free 127.0.0.1 port (both get --decode-concurrency of the highest level),
polled on /health until ready, warmed up by one short request, and killed at the end. Both sides run at once,
idle while the other is measured, so that the machine's drifting speed hits both alike: each concurrency level
runs on one, then the other (which goes first alternates). A level is `--rounds` bursts of N clients started
together, each streaming /v1/completions (temperature 0, `--max-tokens`, random words of its own so that no
prompt cache helps); tokens/s is all the tokens generated (usage.completion_tokens of the stream's usage chunk,
else the chunks counted) over the bursts' wall time, from the first request sent to the last stream finished;
TTFT is to the first chunk with text. The conversation: turn k's prompt is turn k-1's prompt, its completion
and a new piece of text, 16 new tokens a turn; the turns go round the servers one by one, those above (cache
on) and a second pair started with --prompt-cache-size 0 (which both read as: keep no cache). The initial
prompt puts turn 6 past 1000 tokens. Each TTFT cell also shows the prompt tokens the server reported as cached
(usage.prompt_tokens_details.cached_tokens).

On this project's 2-core VM (MLX's CPU backend, where Gemma 3 270M prefills ~8 tokens/s and decodes ~3) the
tiny checkpoint takes about 5 minutes for both servers, the real one about 40: for a short real run, cut
--first-words (e.g. 40: turn 6 of ~330 tokens), --concurrency and --max-tokens.

    python benchmarks/server.py                          # both checkpoints: tiny random, then Gemma 3 270M
    python benchmarks/server.py --tiny --concurrency 1,4 --max-tokens 16 --only mlx_lm
    python benchmarks/server.py --real --json out.json   # the default model, from mlxgemma[demo]
    python benchmarks/server.py --tiny --before ../old-checkout   # against an earlier mlxgemma instead
"""

import argparse
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

COMMANDS = {"mlxgemma": [sys.executable, "-m", "mlxgemma.server"], "mlx_lm": [sys.executable, "-m", "mlx_lm", "server"]}
BEFORE = {}  # --before PATH: "mlxgemma-before" is mlxgemma's server run from a checkout of an earlier commit
TIMEOUT = httpx.Timeout(10.0, read=300.0)  # read: between two chunks (a 16-client prefill can be slow)
# Per checkpoint: tokens per request, words in each concurrency prompt, bursts per level, words before turn 1
# and added each turn (one token a word on both tokenizers; turn 6 = 1 + 900 + 5 * (40 + 16) = 1181 tokens).
SIZES = {"tiny": dict(max_tokens=64, prompt_words=48, rounds=2, first_words=900, turn_words=40),
         "real": dict(max_tokens=16, prompt_words=24, rounds=1, first_words=900, turn_words=40)}
WORDS = ("the river ran past an old mill where children once counted boats and the baker sold bread to "
         "sailors who told long stories about storms islands lighthouses and a city of glass far to the "
         "south while the miller listened and wrote each story in a book that nobody else would read").split()


class Server:
    """One server subprocess (its own process group, so that nothing it starts outlives it)."""

    def __init__(self, name: str, model: Path, extra: list, log_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}-{self.port}.log"
        cmd = COMMANDS[name] + ["--model", str(model), "--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = dict(os.environ, PYTHONPATH=BEFORE["path"]) if name == "mlxgemma-before" else None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)

    def wait_ready(self, timeout: float = 600.0):
        """Polls /health (or /v1/models where /health is missing), then one short request: mlx_lm answers
        /health before its generation thread has loaded the model."""
        deadline = time.monotonic() + timeout
        paths = ["/health", "/v1/models"]
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + paths[0], timeout=5.0)
                if r.status_code == 404 and len(paths) > 1:
                    paths.pop(0)
                elif r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        with httpx.Client(timeout=TIMEOUT) as client:
            stream(client, self.url, "warm up " * 8, 4)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the group: the server and anything it started
                self.proc.wait(10)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                pass


def stream(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: start/end times, TTFT, generated tokens, text, the usage chunk if any."""
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
    start, first, first_text, chunks, usage, text = time.perf_counter(), None, None, 0, None, []
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg, now = json.loads(data), time.perf_counter()
            first = first or now
            usage = msg.get("usage") or usage
            for choice in msg.get("choices") or []:
                if choice.get("text"):
                    first_text = first_text or now
                    chunks += 1
                    text.append(choice["text"])
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: a stream without data chunks")
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else chunks
    return dict(start=start, end=end, ttft=(first_text or first or end) - start, tokens=tokens,
                text="".join(text), usage=usage)


def burst(url: str, prompts: list, max_tokens: int) -> list:
    """All prompts at once, one thread and connection each, released together."""
    results, errors, gate = [None] * len(prompts), [], threading.Barrier(len(prompts))

    def client(i):
        try:
            with httpx.Client(timeout=TIMEOUT) as c:
                gate.wait(30)
                results[i] = stream(c, url, prompts[i], max_tokens)
        except Exception as e:  # noqa: BLE001 - reported below, with the others
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    if errors or any(r is None for r in results):
        raise RuntimeError(f"{url}: {len(errors)} of {len(prompts)} clients failed: {errors[:3]}")
    return results


def text_of(tiny: bool, n_words: int, rng: random.Random) -> str:
    """Words the tokenizer knows: t4..t4095 for the tiny model, English words for the real one."""
    return " ".join(f"t{rng.randrange(4, 4096)}" if tiny else rng.choice(WORDS) for _ in range(n_words))


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


def concurrency(servers: dict, levels: list, rounds: int, max_tokens: int, prompt_words: int, tiny: bool) -> dict:
    out = {name: {} for name in servers}
    for k, n in enumerate(levels):
        order = list(servers) if k % 2 == 0 else list(servers)[::-1]
        rng = random.Random(f"level {n}")  # random words: distinct prompts, the same on both sides
        prompts = [[text_of(tiny, prompt_words, rng) for _ in range(n)] for _ in range(rounds)]
        for name in order:
            wall, tokens, ttfts = 0.0, 0, []
            for batch in prompts:
                res = burst(servers[name].url, batch, max_tokens)
                wall += max(r["end"] for r in res) - min(r["start"] for r in res)
                tokens += sum(r["tokens"] for r in res)
                ttfts += [r["ttft"] for r in res]
            out[name][n] = dict(tok_s=tokens / wall, tokens=tokens, wall=wall,
                                ttft_p50=percentile(ttfts, 0.5), ttft_p95=percentile(ttfts, 0.95))
            print(f"  {name:8s} {n:2d} clients: {tokens / wall:7.1f} tok/s, TTFT p50 {out[name][n]['ttft_p50']:.3f} s",
                  file=sys.stderr, flush=True)
    return out


def conversation(servers: dict, tiny: bool, first_words: int, turn_words: int, turns=6, new_tokens=16) -> dict:
    """The turns go round all servers one by one; each server keeps its own conversation."""
    rng = random.Random("conversation")
    first, pieces = text_of(tiny, first_words, rng), [text_of(tiny, turn_words, rng) for _ in range(turns)]
    prompts, out = {label: first for label in servers}, {label: [] for label in servers}
    with httpx.Client(timeout=TIMEOUT) as client:
        for k in range(turns):
            for label, server in servers.items():
                r = stream(client, server.url, prompts[label], new_tokens)
                usage = r["usage"] or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                out[label].append(dict(ttft=r["ttft"], prompt_tokens=usage.get("prompt_tokens"), cached_tokens=cached))
                # The word-level tokenizer's text lacks the space before its first word; SentencePiece's has it.
                prompts[label] += (" " if tiny else "") + r["text"] + " " + pieces[k]
    return out


def tiny_model(out: Path) -> Path:
    """benchmarks/speed.py's random Gemma 3, with a word-level tokenizer over its 4096 ids (eos 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import tiny_checkpoint

    tiny_checkpoint("gemma3", out)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 4096)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(out)
    return out


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report(name: str, conc: dict, conv: dict, sides: list):
    print(f"\n### {name}: concurrent streaming clients\n")
    cols = [f"{s} tok/s" for s in sides] + (["ratio"] if len(sides) == 2 else [])
    cols += [f"{s} TTFT p50 / p95 (s)" for s in sides]
    print("| clients | " + " | ".join(cols) + " |\n|---:|" + "---:|" * len(cols))
    for n in conc[sides[0]]:
        row = [f"{conc[s][n]['tok_s']:.1f}" for s in sides]
        row += [f"{conc[sides[0]][n]['tok_s'] / conc[sides[1]][n]['tok_s']:.2f}"] if len(sides) == 2 else []
        row += [f"{conc[s][n]['ttft_p50']:.3f} / {conc[s][n]['ttft_p95']:.3f}" for s in sides]
        print(f"| {n} | " + " | ".join(row) + " |")
    print(f"\n### {name}: 6-turn conversation, TTFT (s) with / without the prompt cache (cached prompt tokens)\n")
    labels = [f"{s} {c}" for s in sides for c in ("cache", "no cache")]
    print("| turn | prompt tokens | " + " | ".join(labels) + " |\n|---:|---:|" + "---:|" * len(labels))
    for k in range(len(conv[labels[0]])):
        cells = [f"{fmt(conv[lb][k]['ttft'])} ({fmt(conv[lb][k]['cached_tokens'], 'd')})" for lb in labels]
        print(f"| {k + 1} | {fmt(conv[labels[0]][k]['prompt_tokens'], 'd')} | " + " | ".join(cells) + " |")
    last = {lb: conv[lb][-1]["ttft"] for lb in labels}
    notes = [f"{s} no cache / cache {last[s + ' no cache'] / last[s + ' cache']:.2f}" for s in sides]
    if len(sides) == 2:
        notes += [f"{sides[0]} / {sides[1]} {c} {last[sides[0] + ' ' + c] / last[sides[1] + ' ' + c]:.2f}"
                  for c in ("cache", "no cache")]
    print("\nTurn-6 TTFT ratios: " + "; ".join(notes))


def bench(name: str, model: Path, args, sides: list, work: Path) -> dict:
    size = dict(SIZES[name], **{k: v for k in SIZES[name] if (v := getattr(args, k, None)) is not None})
    servers, extra, start = {}, ["--decode-concurrency", str(max(args.concurrency))], time.monotonic()
    try:
        for s in sides:
            servers[s] = Server(s, model, extra, work)
        for s in sides:
            servers[s].wait_ready()
        print(f"[{name}] concurrency", file=sys.stderr, flush=True)
        conc = concurrency(servers, args.concurrency, size["rounds"], size["max_tokens"], size["prompt_words"],
                           name == "tiny")
        for s in sides:
            servers[f"{s} no cache"] = Server(s, model, extra + ["--prompt-cache-size", "0"], work)
        for s in sides:
            servers[f"{s} no cache"].wait_ready()
        print(f"[{name}] conversation", file=sys.stderr, flush=True)
        conv = conversation({(f"{s} cache" if s in sides else s): v for s, v in servers.items()}, name == "tiny",
                            size["first_words"], size["turn_words"])
    except Exception:
        for label, server in servers.items():
            if server.proc.poll() is not None:
                print(f"[{name}] {label} exited with {server.proc.returncode}:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            server.stop()
    print(f"[{name}] done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    report(name, conc, conv, sides)
    return dict(model=str(model), sizes=size, concurrency=conc, conversation=conv)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="Gemma 3 270M (the default model)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3")
    p.add_argument("--max-tokens", type=int, help="per concurrent request (default 64 tiny, 16 real)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, help="bursts per concurrency level (default 2 tiny, 1 real)")
    p.add_argument("--first-words", type=int, help="words before the conversation's turn 1 (default 900)")
    p.add_argument("--only", choices=list(COMMANDS))
    p.add_argument("--before", type=Path, help="a checkout of an earlier mlxgemma: compare mlxgemma with it "
                   "(sides mlxgemma and mlxgemma-before) instead of with mlx_lm")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally clauses that stop the servers
    import mlx.core as mx
    import mlx_lm

    sides = [args.only] if args.only else list(COMMANDS)
    if args.before:
        COMMANDS["mlxgemma-before"] = COMMANDS["mlxgemma"]
        BEFORE["path"] = str(args.before.resolve())
        sides = ["mlxgemma", "mlxgemma-before"]
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, mlx {mx.__version__}, mlx_lm {mlx_lm.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tiny or not args.real:
            results["tiny"] = bench("tiny", tiny_model(work / "tiny"), args, sides, work)
        if args.real or not args.tiny:
            from mlxgemma.checkpoints.default_model import default_model_path

            results["real"] = bench("real", default_model_path(), args, sides, work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Tensor and pipeline parallelism on localhost, one run: 1, 2 and 4 ranks (`mlx.launch --backend ring`) on a tiny
Gemma 3 and on the real Gemma 3 270M (mlxgemma[demo], float32): the most weight bytes a rank holds against the
whole model's, prefill and decode tokens/s, and whether the ranks' greedy tokens equal one process's. Also
whether mlx-lm can shard the same checkpoint (its models need a shard() or pipeline() method).

    python benchmarks/distributed.py [--ranks 1 2 4] [--skip-real]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(path: str, prompt_len: int, decode: int, pipeline: bool) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlxgemma

    group = mx.distributed.init()
    model = mlxgemma.load_model(path, group=group if group.size() > 1 else None, pipeline=pipeline)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ids = mx.array([[2] + list(range(100, 100 + prompt_len - 1))])
    cache = model.make_cache()
    start = time.perf_counter()
    logits = model(ids, cache=cache)[:, -1]
    mx.eval(logits)
    prefill = prompt_len / (time.perf_counter() - start)
    tokens, start = [], time.perf_counter()
    for _ in range(decode):
        token = mx.argmax(logits, axis=-1)
        tokens.append(int(token.item()))
        logits = model(token[:, None], cache=cache)[:, -1]
    mx.eval(logits)
    rate = decode / (time.perf_counter() - start)
    most = mx.distributed.all_gather(mx.array([held]), group=group).max().item() if group.size() > 1 else held
    if group.rank() == 0:
        print(json.dumps(dict(ranks=group.size(), held=int(most), prefill=prefill, decode=rate, tokens=tokens)))


def launch(n: int, path: Path, prompt_len: int, decode: int, pipeline: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--prompt-len", str(prompt_len), "--decode", str(decode)]
    cmd += ["--pipeline"] if pipeline else []
    if n > 1:
        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(n), "--backend", "ring", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(out.stdout + out.stderr)
    return json.loads(lines[-1])


def table(name: str, path: Path, ranks, prompt_len: int, decode: int) -> None:
    base = None
    for n in ranks:
        for pipeline in ((False, True) if n > 1 else (False,)):
            r = launch(n, path, prompt_len, decode, pipeline)
            base = base or r
            how = "one process" if n == 1 else "pipeline" if pipeline else "tensor"
            print(f"| {name} | {n} | {how} | {r['held'] / 2**20:.1f} | {r['held'] / base['held']:.2f}x | "
                  f"{r['prefill']:.1f} | {r['decode']:.2f} | {r['tokens'] == base['tokens']} |", flush=True)


def mlx_lm_shards(path: Path) -> str:
    from mlx_lm.utils import load_model

    model = load_model(path)[0]
    if hasattr(model, "shard") or hasattr(getattr(model, "model", None), "pipeline"):
        return "yes"
    return f"no: its {type(model).__module__} has neither shard() nor pipeline()"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--worker", default=None)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.prompt_len, args.decode, args.pipeline)
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    from reference import hf_model, save_checkpoint

    tiny = save_checkpoint(hf_model("gemma3", hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                                    num_key_value_heads=4, head_dim=32, vocab_size=4096, num_hidden_layers=6,
                                    layer_types=None), Path(tempfile.mkdtemp()) / "tiny")
    print("| model | ranks | split | weights per rank (MiB) | vs 1 rank | prefill tok/s | decode tok/s | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    table("tiny Gemma 3 (hidden 256, 6 layers)", tiny, args.ranks, args.prompt_len, args.decode)
    if not args.skip_real:
        from speed import real_checkpoint

        real = real_checkpoint("float32", Path("/tmp/mlxgemma-kv"))
        table("Gemma 3 270M float32", real, args.ranks, args.prompt_len, args.decode)
        print(f"\nmlx-lm shards this checkpoint: {mlx_lm_shards(real)}")


if __name__ == "__main__":
    main()

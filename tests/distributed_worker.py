"""Run by tests/test_distributed.py under `mlx.launch -n N --backend ring`: each checkpoint whole and sharded
across the ranks (distributed.py: by heads, or with `pipeline` as the second argument by layers) on the same
inputs. Rank 0 prints one JSON line per checkpoint: the largest
logit differences (prefill past the window, a left-padded batch, cached greedy decoding over 3 windows),
whether greedy generation gave the same tokens, whether every rank generated the same ones, and rank 0's share
of the weights' bytes. With `tensor-methods` or `pipeline-methods`, each whole model is split afterwards, as
mlx-lm's loaders do, by its method (model.shard / model.pipeline) and by distributed.py's function: the
differences of their logits from each other and from the loader's split, and of the method's from the whole
model's (method_checks)."""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

import mlxgemma
from mlxgemma.errors import MlxGemmaError
from mlxgemma.models import distributed, has_vision, is_encoder_decoder


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def diff(a, b) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))


def decoder_checks(full, part, steps: int) -> dict:
    ids = mx.array([[2] + [int(t) for t in np.random.default_rng(0).integers(4, 90, 3 * steps // 4)]])
    out = {"prefill": diff(full(ids), part(ids))}
    batch = mx.array([[0, 0, 0] + ids[0, :9].tolist(), ids[0, :12].tolist()])
    mask = mx.array([[0, 0, 0] + [1] * 9, [1] * 12])
    out["padded"] = diff(full(batch, attention_mask=mask), part(batch, attention_mask=mask))
    caches = [full.make_cache(), part.make_cache()]
    worst, token = 0.0, None
    la, lb = full(ids, cache=caches[0])[:, -1], part(ids, cache=caches[1])[:, -1]
    for _ in range(steps):
        worst = max(worst, diff(la, lb))
        token = mx.argmax(la, axis=-1)[:, None]
        la, lb = full(token, cache=caches[0])[:, -1], part(token, cache=caches[1])[:, -1]
    out["decode"] = worst
    return out


def logits(model, ids) -> mx.array:
    return model(ids, decoder_input_ids=ids[:, :12]) if is_encoder_decoder(model) else model(ids)


def method_checks(path: str, group, pipeline: bool, steps: int) -> dict:
    """The same model split by its method, by the function and by the loader: the same logits, exactly."""
    split = "pipeline" if pipeline else "shard"
    by_method = getattr(mlxgemma.load_model(path), split)(group)
    by_function = getattr(distributed, split)(mlxgemma.load_model(path), group)
    by_loader = mlxgemma.load_model(path, group=group, pipeline=pipeline)
    whole = mlxgemma.load_model(path)
    ids = mx.array([[2] + list(range(10, 30))])
    ours = logits(by_method, ids)
    out = {"function": diff(ours, logits(by_function, ids)), "loader": diff(ours, logits(by_loader, ids)),
           "weights": nbytes(by_method) / nbytes(whole)}
    if is_encoder_decoder(whole):
        out["prefill"] = diff(logits(whole, ids), ours)
    else:
        out.update(decoder_checks(whole, by_method, steps))
    return out


def main():
    group = mx.distributed.init()
    steps, mode, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    pipeline = mode.startswith("pipeline")
    if mode.endswith("-methods"):
        for path in paths:
            out = method_checks(path, group, pipeline, steps)
            if group.rank() == 0:
                print(json.dumps(dict(out, name=path.rsplit("/", 1)[-1])), flush=True)
        return
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        try:
            full, tok = mlxgemma.load(path)
            part = mlxgemma.load_model(path, group=group, pipeline=pipeline)
        except MlxGemmaError as e:
            if group.rank() == 0:
                print(json.dumps({"name": name, "error": str(e)}), flush=True)
            continue
        extra = {}
        if is_encoder_decoder(full):
            enc = mx.array([[2] + list(range(10, 30))])
            dec = mx.array([[2] + list(range(40, 52))])
            out = {"prefill": diff(full(enc, decoder_input_ids=dec), part(enc, decoder_input_ids=dec))}
            prompt = " ".join(f"t{i}" for i in range(5, 20))
        else:
            out = decoder_checks(full, part, steps)
            prompt = [2] + list(range(10, 22))
        if has_vision(full):  # the towers whole on every rank, their features into the sharded language model
            pixels = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            prompt, extra = f"t9 {tok.marks['image']} t12", dict(image=[Image.fromarray(pixels)], chat_template=False)
            if "audio" in tok.marks:  # (Gemma 4 E2B/E4B)
                clip = np.sin(np.arange(8000) / 16_000 * 2 * np.pi * 440).astype(np.float32)
                prompt, extra["audio"] = prompt + f" {tok.marks['audio']} t13", [clip]
        a = [c.token for c in mlxgemma.stream_generate(full, tok, prompt, max_tokens=steps, **extra)]
        b = [c.token for c in mlxgemma.stream_generate(part, tok, prompt, max_tokens=steps, **extra)]
        everyone = mx.distributed.all_gather(mx.array(b)[None], group=group)
        out.update(name=name, weights=nbytes(part) / nbytes(full), same_greedy=a == b,
                   ranks_agree=bool(mx.all(everyone == everyone[0]).item()), tokens=len(b))
        if group.rank() == 0:
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

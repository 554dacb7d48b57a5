"""Gemma 4's assistant drafter (multi-token prediction): the rows of benchmarks/speculative.py for Gemma 4
(`python benchmarks/speculative.py --assistant` runs this).

No trained drafter is offline, so both models have random weights, at real widths: the target is E2B's text
model (tests/real_configs) cut to 10 layers (the last 4 KV-shared), 4-bit; the drafter has the width of E2B's
assistant (256) with 4 layers, its sparse head over 2048 clusters (top 32), 4-bit too. Its acceptance is
controlled: it drafts for real (its cost is measured), then each proposal is replaced by plain greedy's
token with probability `alpha` and by another token otherwise (a round stops at the first wrong one, as a
real check does). Reported: tokens per target forward and the wall speed-up against plain greedy decoding
(interleaved A B B A, median), the output checked equal to plain greedy's; then the measured cost of a drafter
step and of a target check of k + 1 tokens, both relative to a plain target step, and the speed-up they
predict: E / (k * c_draft + c_check), with E = (1 - alpha^(k+1)) / (1 - alpha) tokens per round.
"""

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxgemma.checkpoints.loading import build_model
from mlxgemma.decode.decoder import Decoder, Row, fill, forward, last_prompt_step
from mlxgemma.decode.proposers import Assistant
from mlxgemma.decode.sampling import SamplingOptions

REAL = Path(__file__).resolve().parents[1] / "tests" / "real_configs" / "google__gemma-4-E2B-it" / "config.json"


def models(layers: int = 10, shared: int = 4, draft_layers: int = 4):
    text = json.loads(REAL.read_text())["text_config"]
    text = dict(text, num_hidden_layers=layers, num_kv_shared_layers=shared, layer_types=text["layer_types"][:layers])
    target = build_model(text)
    drafter = build_model({
        "model_type": "gemma4_assistant", "backbone_hidden_size": text["hidden_size"], "use_ordered_embeddings": True,
        "num_centroids": 2048, "centroid_intermediate_top_k": 32,
        "text_config": dict(text, hidden_size=256, intermediate_size=2048, num_hidden_layers=draft_layers,
                            layer_types=["sliding_attention"] * (draft_layers - 1) + ["full_attention"],
                            num_attention_heads=4, num_kv_shared_layers=draft_layers, hidden_size_per_layer_input=0,
                            vocab_size_per_layer_input=0, use_double_wide_mlp=False)})
    order = np.random.default_rng(0).permutation(text["vocab_size"]).astype(np.int32)
    drafter.masked_embedding.token_ordering = mx.array(order)
    for m in (target, drafter):
        nn.quantize(m, group_size=64, bits=4, class_predicate=lambda p, x: hasattr(x, "to_quantized")
                    and x.weight.shape[-1] % 64 == 0)
        mx.eval(m.parameters())
    return target, drafter


class Controlled(Assistant):
    """Drafts for real, then keeps each proposal right with probability alpha (plain greedy's `truth`)."""

    def __init__(self, drafter, target, truth, prompt_len, alpha, seed=0):
        super().__init__(drafter, target)
        self.truth, self.prompt_len, self.alpha = truth, prompt_len, alpha
        self.rng = np.random.default_rng(seed)

    def propose(self, rows, n, target_cache=None):
        drafted = super().propose(rows, n, target_cache)
        done, vocab = len(rows[0].seq) - self.prompt_len, self.model.config.vocab_size
        return [[t if self.rng.random() < self.alpha else (t + 1) % vocab
                 for t in self.truth[done:done + len(d)]] for d in drafted]


def decode(model, prompt, n, proposer=None, k=3):
    """(tokens, seconds, the row): greedy decoding of n tokens after the prompt (its prefill not timed)."""
    cache = model.make_cache()
    fill(model, cache, prompt[:-1])
    mx.eval([c.state for c in cache])
    start = time.perf_counter()
    logits, state = last_prompt_step(model, mx.array([prompt[-1:]]), cache, proposer)
    decoder, row = Decoder(model, proposer, k), Row(SamplingOptions().sampler(), list(prompt), n, prompt=len(prompt))
    tokens = [decoder.start(row, logits).token]
    decoder.add(row, cache, state)
    while len(tokens) < n:
        tokens += [e.token for e in decoder.step()[0]]
    return tokens[:n], time.perf_counter() - start, row


def costs(target, drafter, prompt, k, repeats=20):
    """Seconds of a plain target step, a target check of k + 1 tokens, and a drafter step, each median."""
    cache = target.make_cache()
    fill(target, cache, prompt)
    assistant = Assistant(drafter, target)
    state = mx.zeros((1, 1, target.config.hidden_size))
    shared, offset = drafter.target_states(target, cache)

    def timed(fn):
        out = []
        for _ in range(repeats):
            for c in cache:
                c.mark()
            start = time.perf_counter()
            mx.eval(fn())
            out.append(time.perf_counter() - start)
            for c in cache:
                c.rollback([c.offset - len(prompt)] if isinstance(c.offset, int) else [0])
                c.unmark()
        return statistics.median(out)
    step = timed(lambda: forward(target, mx.array([[5]]), cache))
    check = timed(lambda: forward(target, mx.array([[5] * (k + 1)]), cache))
    draft = timed(lambda: drafter(drafter.inputs(target, mx.array([[5]]), state), shared, offset))
    del assistant
    return step, check, draft


def bytes_per_step(target, drafter) -> tuple:
    """(bytes a target step reads, bytes a drafter step reads): every weight, but of a table that is only looked
    up the rows used (E2B's per-layer token table: one row; the drafter's own table, which its sparse head reads
    top_k of num_centroids clusters of: that share)."""
    from mlx.utils import tree_flatten

    def total(model, skip=()):
        return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith(skip))
    table = sum(v.nbytes for k, v in tree_flatten(drafter.model.embed_tokens.parameters()))
    share = drafter.config.centroid_intermediate_top_k / drafter.config.num_centroids
    return total(target, ("model.embed_tokens_per_layer",)), total(drafter, ("model.embed_tokens",)) + share * table


def mac_arithmetic(target, drafter, k: int, alphas) -> None:
    """What the speed-up would be where a step costs the bytes it reads (Apple silicon's decode, bound by memory
    bandwidth) and a check of k + 1 tokens costs about one step: E / (k * c_draft + 1)."""
    from mlx.utils import tree_flatten

    t, d = bytes_per_step(target, drafter)
    layers = sum(v.nbytes for name, v in tree_flatten(target.parameters()) if name.startswith("model.layers."))
    full = t - layers + layers * 35 / len(target.model.layers)  # (E2B has 35 layers)
    print(f"\nOn a Mac (a step costs the bytes it reads; a check of {k + 1} tokens about one step): the target "
          f"reads {t / 2**20:.0f} MiB a step at these 10 layers ({full / 2**20:.0f} MiB at E2B's 35), the drafter "
          f"{d / 2**20:.1f} MiB: c_draft = {d / t:.4f} ({d / full:.4f})")
    for alpha in alphas:
        expected = (k + 1) if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
        print(f"- alpha {alpha:.1f}: {expected:.2f} tokens a round, {expected / (k * d / t + 1):.2f}x "
              f"({expected / (k * d / full + 1):.2f}x at 35 layers)")


def report(tokens: int = 128, k: int = 4, alphas=(0.0, 0.5, 0.8, 1.0), rounds: int = 2) -> None:
    import platform

    target, drafter = models()
    prompt = [2] + np.random.default_rng(1).integers(10, 20000, 63).tolist()
    truth, _, _ = decode(target, prompt, tokens + k + 1)
    step, check, draft = costs(target, drafter, prompt, k)
    print(f"\nGemma 4 assistant drafter: random E2B-width target (10 layers, 4-bit) and drafter (width 256, 4 layers, "
          f"4-bit), {platform.machine()} {platform.system()}, MLX CPU; {tokens} tokens after a 64-token prompt, "
          f"{k} drafts a round, greedy\n")
    print(f"measured: target step {1000 * step:.1f} ms, check of {k + 1} tokens {check / step:.2f}x a step, drafter "
          f"step {draft / step:.3f}x a step\n")
    print("| drafts right (alpha) | tokens / target forward | wall speed-up (measured) | predicted from costs "
          "| same as plain |")
    print("|---|---|---|---|---|")
    for alpha in alphas:
        plain_s, spec_s, same, per_forward = [], [], True, 0.0
        for r in range(rounds):  # A B B A
            for which in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                if which == "plain":
                    out, seconds, _ = decode(target, prompt, tokens)
                    plain_s.append(seconds)
                else:
                    proposer = Controlled(drafter, target, truth, len(prompt), alpha, seed=r)
                    out, seconds, row = decode(target, prompt, tokens, proposer, k)
                    spec_s.append(seconds)
                    per_forward = tokens / max(tokens - row.accepted, 1)
                same = same and out == truth[:tokens]
        expected = (k + 1) if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
        predicted = expected / (k * draft / step + check / step)
        print(f"| {alpha:.1f} | {per_forward:.2f} | {statistics.median(plain_s) / statistics.median(spec_s):.2f}x "
              f"| {predicted:.2f}x | {same} |", flush=True)
    mac_arithmetic(target, drafter, k, alphas)


if __name__ == "__main__":
    report()

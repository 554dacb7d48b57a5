"""Two ideas for the 4-bit recipes, measured outside the converter (docs/convert-and-quantize.md: the first is in
--calibrate, the second was not taken), reproducible: AWQ's input scaling before GPTQ, and a loss-based (KL)
choice of which layers get more bits. Same model, text and perplexity as benchmarks/quality.py (the real Gemma
3 270M, two 512-token Apache windows, transformers' Gemma 3 in float32 holding each variant's dequantized
weights); every variant keeps the budget recipe's token table (4 bits, groups of 128, searched) and its bits
per weight.

    python benchmarks/quality.py --only reference      # makes the float checkpoint, if not there yet
    python benchmarks/quality_tried.py [--what awq,kl] [--work DIR]

Prints perplexity for: the budget recipe with -q's rounding and with GPTQ (the baselines); with AWQ's scales
(per group of linears reading one input: q, k, v after input_layernorm; gate, up after the MLP's norm; down
after up: columns times s = rms^alpha, alpha in 0..0.7 by the group's output error after rounding, the
feeding norm or up_proj's rows divided by s, evaluated as the equivalent unscaled weights) then -q's rounding
or GPTQ; and with the bits chosen by KL (each decoder linear alone at 4, 5 and 6 bits, the KL of the
next-token distribution from the float model's on two 256-token calibration rows over the tokens in the float
model's top 256 anywhere, then greedily the most KL saved per extra bit within the budget recipe's bits).
The Hessians come from transformers' float32 forward over the built-in calibration text."""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten

import mlxgemma
from mlxgemma.checkpoints.calibrate import calibration_tokens, dequantized, gptq
from mlxgemma.checkpoints.grids import best_grid, codes, output_error
from mlxgemma.checkpoints.quantize import layer_specs

sys.path.insert(0, str(Path(__file__).parent))
from quality import apache_text, windows  # noqa: E402

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


class Bench:
    def __init__(self, floats: Path):
        from transformers import Gemma3ForCausalLM

        model = mlxgemma.load_model(floats, dtype="float32")
        _, self.tokenizer = mlxgemma.load(floats)
        self.W = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
        self.specs = layer_specs(mlxgemma.load_model(floats, dtype="bfloat16"), 4, 64)  # -q's plan
        self.ref = Gemma3ForCausalLM.from_pretrained(floats, dtype=torch.float32).eval()
        self.rows = windows(self.tokenizer, apache_text())
        self.H = self.hessians(calibration_tokens(self.tokenizer))
        self.linears = [p for p in self.specs if p in self.H]
        self.base = dict(self.W)  # the float model with the token tables rounded as -q rounds them
        for p in self.specs:
            if p not in self.H:
                self.base[p + ".weight"] = round_searched(self.W[p + ".weight"], self.specs[p])
        self.bits = {p: self.specs[p]["bits"] for p in self.linears}

    def hessians(self, tokens):
        H, hooks = {}, []

        def catch(name):
            def hook(module, inputs):  # returns None: the input goes on unchanged
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                H[name] += x.T @ x
            return hook

        for name, m in self.ref.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                H[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                hooks.append(m.register_forward_pre_hook(catch(name)))
        self.load(self.W)
        with torch.no_grad():
            for i in range(0, tokens.shape[0], 4):
                self.ref.model(torch.tensor(np.array(tokens[i:i + 4])))
        for h in hooks:
            h.remove()
        return {k: v.numpy() for k, v in H.items()}

    def load(self, weights):
        self.ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)

    def perplexity(self, weights) -> float:
        self.load(weights)
        nll = []
        with torch.no_grad():
            for ids in self.rows:
                x = torch.tensor(ids)[None]
                logits = self.ref(x[:, :-1]).logits[0].float()
                nll.append(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none"))
        return float(torch.exp(torch.cat(nll).mean()))

    def rounded(self, bits, weights=None, use_gptq=False, scales=None):
        """The base weights with every decoder linear rounded at bits[p] (weights: scaled ones to round
        instead, whose inputs are divided by scales[p])."""
        out = dict(self.base)
        for p in self.linears:
            w = (weights or {}).get(p, self.W[p + ".weight"])
            spec = dict(self.specs[p], bits=bits[p])
            if use_gptq:
                s = (scales or {}).get(p)
                H = self.H[p] / np.outer(s, s) if s is not None else self.H[p]
                out[p + ".weight"] = dequantized(*gptq(w, H, spec["bits"], spec["group_size"], mx.bfloat16),
                                                 spec["group_size"])
            else:
                out[p + ".weight"] = round_searched(w, spec)
        return out


def round_searched(w: np.ndarray, spec: dict) -> np.ndarray:
    """w rounded as -q rounds it (grids.best_grid, every weight alike, bf16 scales), dequantized."""
    bits, group = spec["bits"], spec["group_size"]
    wm = mx.array(w)
    s, b = (v.astype(mx.float32) for v in best_grid(wm, mx.ones((w.shape[1],)), bits, group, mx.bfloat16))
    q = codes(wm.reshape(w.shape[0], -1, group), s, b, 2**bits - 1)
    return np.array((q * s[..., None] + b[..., None]).reshape(w.shape))


def awq(bench: Bench):
    """{linear: scaled weight}, {linear: s} and the row scales up_proj carries for down_proj."""
    current = {p: bench.W[p + ".weight"] for p in bench.linears}
    scaled, scales, rows = {}, {}, {}
    for i in range(len(bench.ref.model.layers)):
        at = f"model.layers.{i}."
        for members in (["mlp.down_proj"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                        ["mlp.gate_proj", "mlp.up_proj"]):
            members = [at + m for m in members]
            x = np.sqrt(np.diag(bench.H[members[0]]) + 1e-12)
            best = None
            for alpha in ALPHAS:
                s = x**alpha / np.sqrt((x**alpha).max() * (x**alpha).min())
                error = sum(output_error(current[p], round_searched(current[p] * s, bench.specs[p]) / s, bench.H[p])
                            for p in members)
                best = best if best is not None and best[0] <= error else (error, s)
            s = best[1].astype(np.float32)
            for p in members:
                scaled[p], scales[p] = (current[p] * s).astype(np.float32), s
            if members[0].endswith("down_proj"):  # up_proj's rows divided by s: down reads act(gate) * up
                up = at + "mlp.up_proj"
                current[up], rows[up] = (current[up] / s[:, None]).astype(np.float32), s
    return scaled, scales, rows


def unscaled(weights, scales, rows):
    """The equivalent weights of the unscaled model: what the folded norms and rows give."""
    out = dict(weights)
    for p, s in scales.items():
        out[p + ".weight"] = weights[p + ".weight"] / s
    for p, s in rows.items():
        out[p + ".weight"] = out[p + ".weight"] * s[:, None]
    return out


def kl_bits(bench: Bench):
    x = torch.tensor(np.array(calibration_tokens(bench.tokenizer, samples=2)))
    bench.load(bench.base)
    with torch.no_grad():
        full = bench.ref.lm_head(bench.ref.model(x).last_hidden_state)
        keep = torch.unique(full.topk(256, -1).indices)
        head, target = bench.ref.lm_head.weight[keep], torch.log_softmax(full[..., keep], -1)

    def kl(p, w):
        module = bench.ref.get_submodule(p)
        old, module.weight.data = module.weight.data, torch.from_numpy(w)
        with torch.no_grad():
            log_q = torch.log_softmax(bench.ref.model(x).last_hidden_state @ head.T, -1)
        module.weight.data = old
        return float((target.exp() * (target - log_q)).sum(-1).mean())

    table = {p: {b: kl(p, round_searched(bench.W[p + ".weight"], dict(bench.specs[p], bits=b))) for b in (4, 5, 6)}
             for p in bench.linears}
    size = {p: bench.W[p + ".weight"].size for p in bench.linears}
    budget = sum(size[p] * (bench.bits[p] - 4) for p in bench.linears)
    plan, used = {p: 4 for p in bench.linears}, 0
    while True:
        options = [((table[p][plan[p]] - table[p][plan[p] + 1]) / size[p], p) for p in bench.linears
                   if plan[p] < 6 and used + size[p] <= budget]
        if not options:
            return plan
        p = max(options)[1]
        plan[p], used = plan[p] + 1, used + size[p]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", default="awq,kl")
    parser.add_argument("--work", default="/tmp/mlxgemma-quality", help="benchmarks/quality.py's --work")
    args = parser.parse_args()
    floats = Path(args.work) / "float"
    if not floats.exists():
        raise SystemExit(f"{floats} is missing: run python benchmarks/quality.py --only reference first")
    bench = Bench(floats)
    start = time.time()

    def row(name, weights):
        print(f"| {name} | {bench.perplexity(weights):.3f} | {time.time() - start:.0f} |", flush=True)

    print("| variant | perplexity | seconds so far |\n|---|---|---|")
    row("float", bench.W)
    row("budget, -q's rounding", bench.rounded(bench.bits))
    row("budget, GPTQ", bench.rounded(bench.bits, use_gptq=True))
    if "awq" in args.what:
        scaled, scales, rows = awq(bench)
        row("budget, AWQ scales, -q's rounding", unscaled(bench.rounded(bench.bits, scaled), scales, rows))
        row("budget, AWQ scales, GPTQ", unscaled(bench.rounded(bench.bits, scaled, True, scales), scales, rows))
    if "kl" in args.what:
        plan = kl_bits(bench)
        row("bits by KL, -q's rounding", bench.rounded(plan))
        row("bits by KL, GPTQ", bench.rounded(plan, use_gptq=True))


if __name__ == "__main__":
    main()

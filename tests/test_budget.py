"""The budget recipe (quantize.budget, -q's default at 4 bits): token tables in groups of 128 at --q-bits,
then the decoder's layers up a bit at a time, mlx-lm's mixed_4_6 choices first, within the bits per weight
asked for (default: 0.25 more than uniform --q-bits); --target-bpw below what --q-bits takes is one clear
error. That this recipe is the better one is a measurement on real weights (benchmarks/quality.py), not a
test: random weights have no trained outliers and no sensitive layers."""

import pytest

from mlxgemma.checkpoints.quantize import TABLE_GROUP, layer_specs
from mlxgemma.errors import MlxGemmaError
from reference import hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from reference import save_checkpoint

    path = tmp_path_factory.mktemp("budget")
    save_checkpoint(hf_model("gemma3", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                             layer_types=None, vocab_size=4096), path)
    import mlxgemma

    return mlxgemma.load_model(path, dtype="bfloat16")


def _spent(model, specs):
    sizes = {p: m.weight.size for p, m in model.named_modules() if p in specs}
    return sum(sizes[p] * (s["bits"] + 32 / s["group_size"]) for p, s in specs.items()) / sum(sizes.values())


@pytest.mark.parametrize("target", [None, 4.45, 4.6, 5.0, 9.0])
def test_within_the_target_and_favoured_first(model, target):
    specs = layer_specs(model, 4, 64, target_bpw=target)
    modules = dict(model.named_modules())
    table = specs["model.embed_tokens"]
    assert table == {"group_size": TABLE_GROUP, "bits": 4, "mode": "affine"}  # never raised
    budget = target if target is not None else 4 + 32 / 64 + 0.25
    spent = _spent(model, specs)
    step = max(m.weight.size for p, m in modules.items() if p in specs) / sum(
        m.weight.size for p, m in modules.items() if p in specs)
    assert spent <= budget + 1e-9 and (target == 9.0 or spent > budget - 2 * step), (spent, budget)
    bits = {p: s["bits"] for p, s in specs.items() if p != "model.embed_tokens"}
    assert set(bits.values()) <= {4, 5, 6}
    favoured = {p for p in bits if p.endswith(("v_proj", "down_proj")) and int(p.split(".")[2]) in (0, 3, 6, 7)}
    others = set(bits) - favoured  # mlx-lm's mixed_4_6 raises v_proj and down_proj in layers 0, 3, 6, 7 of 8
    total = sum(m.weight.size for p, m in modules.items() if p in specs)
    left = (budget - spent) * total  # a layer passed over on its turn did not fit then, so does not fit now
    if any(bits[p] > 4 for p in others):
        assert all(bits[p] >= 5 or modules[p].weight.size > left for p in favoured)
    if any(bits[p] == 6 for p in bits):
        assert all(bits[p] == 5 or modules[p].weight.size > left for p in others)
    if target == 9.0:  # more than it can spend: every layer as high as the recipe goes
        assert all(bits[p] == 6 for p in favoured) and all(bits[p] == 5 for p in others)


def test_below_what_the_bits_take(model):
    with pytest.raises(MlxGemmaError, match="below what 4-bit layers take"):
        layer_specs(model, 4, 64, target_bpw=4.2)
    with pytest.raises(MlxGemmaError, match="has its own"):
        layer_specs(model, 4, 64, recipe="mixed_4_6", target_bpw=4.8)

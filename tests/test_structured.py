"""Structured output (constrained.py) on tiny random-weight models, which emit garbage unconstrained: every
finished output of the JSON Schema corpus (tests/schemas.py), greedy and sampled, parses and validates with
jsonschema; regex and choices outputs match, on every family; the MLX mask equals llguidance's own; a cut
output says "length" and is not claimed valid; every bad constraint is one clear error."""

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

import mlxgemma
from mlxgemma.decode import constrained
from mlxgemma.errors import MlxGemmaError
from schemas import NESTED, SCHEMAS
from structured_util import structured_checkpoint

FAMILIES = ["gemma", "gemma2", "gemma3", "stablelm", "t5gemma2"]
PROMPT = "Answer in JSON please"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root, loaded = tmp_path_factory.mktemp("structured"), {}

    def get(family):
        if family not in loaded:
            loaded[family] = mlxgemma.load(structured_checkpoint(family, root / family))
        return loaded[family]
    return get


def _run(model, tok, **kw):
    chunks = list(mlxgemma.stream_generate(model, tok, PROMPT, **kw))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def _check_corpus(model, tok, schemas, runs, max_tokens=96):
    """Every finished output validates; returns how many finished of how many."""
    finished = total = 0
    for schema in schemas:
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        for kw in runs:
            text, reason = _run(model, tok, json_schema=schema, max_tokens=max_tokens, **kw)
            total += 1
            if reason == "length":
                continue  # cut: not claimed valid
            assert reason == "stop"
            validator.validate(json.loads(text))  # raises on any invalid output
            assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) or \
                "." in text or "e" in text.lower(), f"JSON not compact: {text!r}"  # numbers keep their spelling
            finished += 1
    return finished, total


@pytest.mark.slow
def test_corpus_greedy_and_sampled(models):
    assert len(SCHEMAS) >= 30
    model, tok = models("gemma3")
    runs = [dict(), dict(temp=1.0, seed=1), dict(temp=0.8, top_p=0.9, seed=2), dict(temp=1.5, top_k=20, min_p=0.05,
                                                                                      seed=3)]
    finished, total = _check_corpus(model, tok, SCHEMAS, runs)
    assert finished >= 0.8 * total  # the bounded corpus mostly finishes: the check above covers them


@pytest.mark.parametrize("family", ["gemma", "gemma2", "stablelm", "t5gemma2"])
def test_every_family(models, family):
    model, tok = models(family)
    schemas = SCHEMAS[::4] + [NESTED]
    finished, total = _check_corpus(model, tok, schemas, [dict(), dict(temp=1.0, seed=5)], max_tokens=160)
    assert finished >= 0.7 * total


@pytest.mark.parametrize("family", FAMILIES)
def test_regex_and_choices(models, family):
    model, tok = models(family)
    for pattern in (r"[a-z]{3}-[0-9]{2}", r"(yes|no), because [a-z ]{1,12}\.", r"[0-9]{4}-[0-9]{2}"):
        for kw in (dict(), dict(temp=1.0, seed=7)):
            text, reason = _run(model, tok, regex=pattern, max_tokens=40, **kw)
            assert reason == "stop" and re.fullmatch(pattern, text), (pattern, text)
    options = ["red", "green", "dark blue", "naïve"]
    seen = set()
    for seed in range(6):
        text, reason = _run(model, tok, choices=options, max_tokens=20, temp=2.0, seed=seed)
        assert reason == "stop" and text in options
        seen.add(text)
    assert _run(model, tok, choices=["only"], max_tokens=20)[0] == "only"


def test_grammars_lark_and_gbnf(models):
    model, tok = models("gemma3")
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] [0-9]? [0-9]?'
    for grammar in (lark, gbnf):
        for kw in (dict(), dict(temp=1.0, seed=3)):
            text, reason = _run(model, tok, grammar=grammar, max_tokens=60, **kw)
            assert reason == "length" or re.fullmatch(r"\(\d{1,3}(\+\d{1,3})*\)", text), text


def test_mask_matches_llguidance(models):
    """The MLX mask equals llguidance's numpy reference, on float32 and bfloat16 logits, a batch of two."""
    from llguidance.numpy import apply_token_bitmask_inplace

    model, tok = models("gemma3")
    c = constrained.constraint_for(model, tok, json_schema=NESTED)
    first = c.mask().copy()
    for t in tok.encode('{"order_id":"AB', add_special_tokens=False):
        c.consume(t)
    bitmask = np.stack([first, c.mask()])
    logits = np.random.default_rng(0).standard_normal((2, constrained.logits_width(model))).astype(np.float32)
    expected = logits.copy()
    apply_token_bitmask_inplace(expected, bitmask)
    got = np.array(constrained.apply(mx.array(logits), bitmask))
    np.testing.assert_array_equal(got, expected)
    half = constrained.apply(mx.array(logits).astype(mx.bfloat16), bitmask)
    assert half.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.isinf(np.array(half.astype(mx.float32))), np.isinf(expected))
    assert constrained.allowed_ids(bitmask[1], logits.shape[1]) == np.flatnonzero(np.isfinite(expected[1])).tolist()


def test_greedy_is_argmax_of_masked_logits(models):
    """Constrained greedy = the plain model's argmax among the allowed tokens at every step (teacher-forced
    on the constrained output): the constraint only removes tokens, it changes no logit."""
    model, tok = models("gemma")
    chunks = list(mlxgemma.stream_generate(model, tok, PROMPT, json_schema=SCHEMAS[15], max_tokens=40))
    tokens = [c.token for c in chunks]
    ids = mlxgemma.generate.__globals__["prompt_ids"](tok, PROMPT)
    logits = np.array(model(mx.array([ids + tokens]))[0, len(ids) - 1:-1])
    c = constrained.constraint_for(model, tok, json_schema=SCHEMAS[15])
    for step, token in enumerate(tokens):
        allowed = constrained.allowed_ids(c.mask(), logits.shape[1])
        assert token == allowed[int(np.argmax(logits[step, allowed]))]
        c.consume(token)


@pytest.mark.parametrize("family", ["gemma2", "t5gemma2"])
def test_speculative_keeps_the_constraint(models, tmp_path, family):
    """Draft model (the model itself: all accepted; another random one: mostly rejected) and prompt lookup
    under a constraint give constrained greedy's tokens and log-probabilities; sampled speculative outputs
    validate."""
    model, tok = models(family)
    other = mlxgemma.load_model(structured_checkpoint(family, tmp_path / "other", seed=3))
    kw = dict(json_schema=SCHEMAS[21], max_tokens=80)

    def run(**more):
        chunks = list(mlxgemma.stream_generate(model, tok, PROMPT, **kw, **more))
        return [c.token for c in chunks], np.array([c.logprob for c in chunks]), chunks[-1]

    plain = run()
    assert plain[2].finish_reason == "stop"
    for more in (dict(draft_model=model, num_draft_tokens=4), dict(draft_model=other, num_draft_tokens=3),
                 dict(prompt_lookup_ngram=1, num_draft_tokens=3)):
        spec = run(**more)
        assert spec[0] == plain[0] and np.max(np.abs(spec[1] - plain[1])) <= 1e-4
        assert spec[2].draft_tokens > 0
    for seed in range(3):
        text, reason = _run(model, tok, **kw, draft_model=other, temp=1.0, seed=seed)
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS[21])


def test_length_is_not_claimed_valid(models):
    model, tok = models("gemma3")
    text, reason = _run(model, tok, json_schema=NESTED, max_tokens=4)
    assert reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(MlxGemmaError, match="cut at max_tokens=4"):
        mlxgemma.generate(model, tok, PROMPT, json_schema=NESTED, max_tokens=4, parse=True)


def test_parsed_results(models):
    from typing import Annotated, List, Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=6)
        kind: Literal["cat", "dog"]
        ages: List[Annotated[int, Field(ge=0, le=30)]] = Field(max_length=2)

    model, tok = models("gemma2")
    pet = mlxgemma.generate(model, tok, PROMPT, json_schema=Pet, max_tokens=200, parse=True)
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")
    point = mlxgemma.generate(model, tok, PROMPT, json_schema=json.dumps(SCHEMAS[15]), max_tokens=60, parse=True)
    assert set(point["point"]) == {"x", "y"}
    with pytest.raises(MlxGemmaError, match="parses a json_schema"):
        mlxgemma.generate(model, tok, PROMPT, regex="a+", parse=True)


@pytest.mark.parametrize("spec, message", [
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "Unsatisfiable"),
    (dict(json_schema={"if": {"type": "string"}, "then": {"maxLength": 3}}), "Unimplemented keys"),
    (dict(json_schema={"type": "foo"}), "Invalid type"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "does not exist"),
    (dict(json_schema={"type": "string", "format": "nonsense"}), "Unknown format"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1]), "a JSON schema is an object"),
    (dict(regex="("), "unclosed group"),
    (dict(regex=""), "non-empty"),
    (dict(grammar="start: foo"), "unknown name"),
    (dict(grammar="root ::= foo"), "GBNF grammar does not compile"),
    (dict(choices=[]), "non-empty list"),
    (dict(choices="yes"), "non-empty list"),
    (dict(regex="a", choices=["a"]), "one constraint at a time"),
])
def test_bad_constraints(models, spec, message):
    model, tok = models("gemma3")
    with pytest.raises(MlxGemmaError, match=message):
        _run(model, tok, max_tokens=4, **spec)


def test_without_llguidance(models, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)
    model, tok = models("gemma3")
    with pytest.raises(MlxGemmaError, match=r"pip install 'mlxgemma\[structured\]'"):
        _run(model, tok, regex="a+", max_tokens=4)
    assert _run(model, tok, max_tokens=2)[1] == "length"  # unconstrained generation needs none of it


def test_cli(models, tmp_path, capsys):
    from mlxgemma.generate import main

    path = structured_checkpoint("gemma3", tmp_path / "m")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    for flags in (["--json-schema", str(schema)], ["--json-schema", json.dumps(SCHEMAS[2])]):
        assert main(["--model", str(path), "--prompt", PROMPT, "--max-tokens", "60", *flags]) == 0
        out = capsys.readouterr().out.strip()
        jsonschema.validate(json.loads(out), json.loads(flags[1]) if flags[1].startswith("{") else SCHEMAS[0])
    assert main(["--model", str(path), "--prompt", PROMPT, "--regex", "[0-9]{3}"]) == 0
    assert re.fullmatch(r"\d{3}", capsys.readouterr().out.strip())
    assert main(["--model", str(path), "--prompt", PROMPT, "--choices", "alpha", "beta", "--temp", "1"]) == 0
    assert capsys.readouterr().out.strip() in ("alpha", "beta")
    for flags, message in ((["--regex", "("], "unclosed group"), (["--json-schema", str(tmp_path / "no.json")],
                                                                    "neither a file nor JSON"),
                           (["--json-schema", "[1]"], "is an object"), (["--regex", "a", "--choices", "a"],
                                                                        "one constraint at a time")):
        assert main(["--model", str(path), "--prompt", PROMPT, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

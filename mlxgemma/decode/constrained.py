"""Grammar-constrained decoding: a JSON Schema, a regular expression, a grammar (Lark or GBNF) or a list of
choices becomes, token by token, the set of tokens that keep the output inside it; every other token's logit
is set to -inf in MLX before any sampler runs, so greedy and sampled outputs alike always parse.

The masks come from llguidance (mlxgemma[structured]). It walks the tokenizer's token trie lazily against an
Earley parser instead of precomputing a state machine over the vocabulary, so Gemma's 262,144-token
SentencePiece vocabulary (byte-fallback pieces included) costs milliseconds to compile and well under a
millisecond a token to mask, and it reads the Hugging Face tokenizer.json directly (see the README's
structured output section for the measurements). Its own MLX helper is a Metal kernel; the mask is applied
here with plain MLX ops so that it runs on every backend.

JSON is generated compact (no whitespace between tokens), so a weak model cannot spend its tokens on
spaces and newlines.
"""

import json
import time
import weakref
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import MlxGemmaError

COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}, Ollama's "json"

_TOKENIZERS = weakref.WeakKeyDictionary()  # Hugging Face tokenizer -> its LLTokenizer (~1 s for a big vocab)


def _llguidance():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError:
        raise MlxGemmaError("structured output needs llguidance: pip install 'mlxgemma[structured]'") from None
    return llguidance


def grammar_of(json_schema=None, regex: Optional[str] = None, grammar: Optional[str] = None,
               choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """The llguidance grammar of the one constraint given, or None when none is. json_schema: a dict, its
    JSON text or a pydantic model class; grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's, told
    apart by its `::=`); choices: the exact strings the output may be."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                  ("choices", choices)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise MlxGemmaError(f"give one constraint at a time, not {' and '.join(given)}")
    ll = _llguidance()
    if json_schema is not None:
        return ll.LLMatcher.grammar_from_json_schema(json.dumps(schema_dict(json_schema)), defaults=COMPACT)
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise MlxGemmaError("regex must be a non-empty string")
        return ll.LLMatcher.grammar_from_regex(regex)
    if choices is not None:
        choices = list(choices) if not isinstance(choices, str) else None
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise MlxGemmaError("choices must be a non-empty list of non-empty strings")
        return ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if not isinstance(grammar, str) or not grammar.strip():
        raise MlxGemmaError("grammar must be a non-empty string (Lark or GBNF)")
    if "::=" in grammar:
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            grammar = any_to_lark(grammar)
        except Exception as e:  # its parser's own exceptions
            raise MlxGemmaError(f"the GBNF grammar does not compile: {_line(e)}") from None
    return ll.LLMatcher.grammar_from_lark(grammar)


def schema_dict(json_schema) -> dict:
    """A JSON Schema as a dict, from a dict, JSON text or a pydantic model class."""
    if hasattr(json_schema, "model_json_schema"):
        return json_schema.model_json_schema()
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise MlxGemmaError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(json_schema, dict):
        raise MlxGemmaError("a JSON schema is an object (a dict, its JSON text or a pydantic model class)")
    return json_schema


def _line(e) -> str:
    """An engine's message as one line (its regex errors span several, with a caret under the fault)."""
    parts = [p.strip() for p in str(e).splitlines() if p.strip() and set(p.strip()) != {"^"}]
    return " ".join(parts)[:300] or type(e).__name__


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a tokenizer (mlx-lm's TokenizerWrapper or a Hugging Face fast tokenizer), its
    eos tokens the checkpoint's, its width the model's logits; built once per tokenizer."""
    ll = _llguidance()
    hf = _hf(tokenizer)
    eos = getattr(tokenizer, "eos_token_ids", None) or hf.eos_token_id
    eos = sorted({eos} if isinstance(eos, int) else set(eos))
    key = (vocab_size, tuple(eos))
    cached = _TOKENIZERS.get(hf, {})
    if key not in cached:
        try:
            cached[key] = ll.hf.from_tokenizer(hf, n_vocab=max(vocab_size, len(hf)), eos_token=eos)
        except ValueError as e:  # a slow (Python) tokenizer
            raise MlxGemmaError(f"structured output needs a fast tokenizer (tokenizer.json): {_line(e)}") from None
        _TOKENIZERS[hf] = cached
    return cached[key]


class Constraint:
    """One output's grammar state: `mask()` is the bitmask of the tokens allowed next, `consume(token)`
    advances it. Built from grammar_of(...); a grammar that does not compile is one clear error here."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int, *, _matcher=None):
        ll = _llguidance()
        self.tokenizer, self.grammar, self.vocab_size = tokenizer, grammar, vocab_size
        if _matcher is None:
            lt = ll_tokenizer(tokenizer, vocab_size)
            _matcher = ll.LLMatcher(lt, grammar, log_level=0)
            if _matcher.is_error():
                raise MlxGemmaError(f"the constraint does not compile: {_line(_matcher.get_error())}")
        self.matcher = _matcher
        self.bitmask = np.full((1, (max(vocab_size, _width(tokenizer)) + 31) // 32), -1, dtype=np.int32)
        self.mask_seconds = 0.0  # time spent computing masks (the benchmark reports it)

    def copy(self) -> "Constraint":
        """A fresh copy in the same state (each of a request's n choices has its own)."""
        return Constraint(self.tokenizer, self.grammar, self.vocab_size, _matcher=self.matcher.deep_copy())

    def consume(self, token: int) -> bool:
        """Advance by token; False when the constraint has already ended (an eos after the end: the decode
        loop runs a step past it), and nothing is consumed."""
        if self.matcher.is_stopped() and not self.matcher.is_error():
            return False
        if not self.matcher.consume_token(token):
            raise MlxGemmaError(f"token {token} left the constraint: {_line(self.matcher.get_error())}")
        return True

    def mask(self) -> np.ndarray:
        """(words,) int32: bit i of word i // 32 says whether token i may come next."""
        from llguidance.numpy import fill_next_token_bitmask

        start = time.perf_counter()
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self.mask_seconds += time.perf_counter() - start
        if self.matcher.is_error():
            raise MlxGemmaError(f"the constraint failed: {_line(self.matcher.get_error())}")
        return self.bitmask[0]

    def allows(self, token: int, bitmask: Optional[np.ndarray] = None) -> bool:
        """Whether token may come next (by the last mask, or by bitmask)."""
        return allowed(self.bitmask[0] if bitmask is None else bitmask, token)

    def masks_along(self, tokens: List[int]) -> np.ndarray:
        """(len(tokens) + 1, words): the mask before each token of a proposal and after the last, the state
        left unchanged. Past a token the constraint refuses, the masks repeat (nothing there is kept)."""
        return masks_along(self, tokens)

    def rollback(self, n: int) -> None:
        if n > 0 and not self.matcher.rollback(n):
            raise MlxGemmaError(f"the constraint could not roll back {n} tokens")

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete (the grammar may end here)."""
        return self.matcher.is_accepting()


def allowed(bitmask: np.ndarray, token: int) -> bool:
    """Whether bit `token` of a (words,) int32 bitmask is set."""
    return 0 <= token < 32 * bitmask.shape[0] and bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


def masks_along(constraint, tokens: List[int]) -> np.ndarray:
    """Constraint.masks_along for any object of its protocol (mask, allows, consume, rollback): consume stops at
    a token refused or past the end (an eos: the stream stops there anyway), and what was consumed is rolled back."""
    masks, consumed = [], 0
    for token in tokens:
        masks.append(constraint.mask().copy())
        if not constraint.allows(token, masks[-1]) or not constraint.consume(token):
            break
        consumed += 1
    if consumed == len(tokens):
        masks.append(constraint.mask().copy())
    masks += [masks[-1]] * (len(tokens) + 1 - len(masks))
    constraint.rollback(consumed)
    return np.stack(masks)


def _hf(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (or the one given)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def _width(tokenizer) -> int:
    return len(_hf(tokenizer))


def masked_logprobs(logprobs: mx.array, bitmask) -> mx.array:
    """Log-probabilities (..., vocab) restricted to the tokens bitmask allows, renormalized (top-p, min-p and
    the speculative acceptance rule then see the allowed tokens' distribution)."""
    masked = apply(logprobs, bitmask)
    return masked - mx.logsumexp(masked, axis=-1, keepdims=True)


def apply(logits: mx.array, bitmask) -> mx.array:
    """logits (..., vocab) with every token whose bit is 0 in bitmask (..., words) set to -inf."""
    bitmask = mx.array(bitmask, dtype=mx.int32)
    bits = (bitmask[..., None] >> mx.arange(32, dtype=mx.int32)) & 1
    allowed = bits.reshape(*bitmask.shape[:-1], -1)[..., : logits.shape[-1]]
    return mx.where(allowed.astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))


class LogitsProcessor:
    """The constraint as one of mlx-lm's logits processors (tokens, logits) -> logits. `tokens` holds the
    `start` prompt tokens and then every sampled one; the new ones are consumed, then the mask is computed
    while the model's forward pass (queued first with async_eval) runs, so the constraint costs little."""

    def __init__(self, constraint: Constraint, start: int):
        self.constraint, self.start, self.seen = constraint, start, 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)
        new = tokens[self.start + self.seen:].tolist() if tokens.shape[0] > self.start + self.seen else []
        for token in new:
            self.constraint.consume(token)
        self.seen += len(new)
        return apply(logits, self.constraint.mask())


def constraint_for(model, tokenizer, **spec) -> Optional[Constraint]:
    """The Constraint of json_schema= / regex= / grammar= / choices= for this model (None without one)."""
    grammar = grammar_of(**spec)
    if grammar is None:
        return None
    return Constraint(tokenizer, grammar, logits_width(model))


def logits_width(model) -> int:
    config = getattr(model, "config", None)
    decoder = getattr(config, "decoder", None)  # T5Gemma 2
    return int(getattr(decoder, "vocab_size", None) or config.vocab_size)


def parse_json(text: str, json_schema=None):
    """A JSON-schema generation's text parsed: a pydantic model instance when the schema was a pydantic
    model class, else what json.loads gives."""
    try:
        if hasattr(json_schema, "model_validate_json"):
            return json_schema.model_validate_json(text)
        return json.loads(text)
    except ValueError as e:
        raise MlxGemmaError(f"the output is not the JSON asked for: {_line(e)}") from None


def allowed_ids(bitmask: np.ndarray, vocab_size: int) -> List[int]:
    """The token ids a bitmask allows (for tests and debugging)."""
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()

"""A tiny Gemma 4 chat checkpoint for the chat-protocol tests: a random float32 Gemma 4 model whose tokenizer is
Gemma's kind (SentencePiece-style BPE with byte fallback, Gemma's decoder, so mlx-lm streams it with the same
detokenizer as a real checkpoint) holding Gemma 4's special tokens at their real ids, Google's chat template
(tests/data, the 2026-07-09 canonical one) and generation_config.json's eos ids [1, 106, 50].

Every text character is one token ("▁" for a space), anything else its UTF-8 bytes (<0x..>): any string
round-trips. `force(engine, text)` makes a served model emit exactly `text` (a scripted stand-in for an
instruction-tuned model): the output goes through the real token stream, detokenizer and parsers."""

import json
from pathlib import Path

import numpy as np
import transformers

from reference import randomize

DATA = Path(__file__).parent / "data"
TEMPLATE = (DATA / "gemma4_chat_template.jinja").read_text()
SMALL_TEMPLATE = (DATA / "gemma4_e2b_chat_template.jinja").read_text()

# Gemma 4's special tokens at their ids (docs/notes/gemma4-chat-protocol.md §2).
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool>": 46, "<tool|>": 47,
            "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
            "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106}
TURN_END, TOOL_RESPONSE, CHANNEL_CLOSE = 106, 50, 101


def vocab() -> dict:
    """Specials at their ids, printable ASCII (and "▁") in the free ids below 107 and on, then the 256 bytes."""
    out = dict(SPECIALS)
    free = (i for i in range(10**6) if i not in SPECIALS.values())
    for piece in ["▁", "\n"] + [chr(c) for c in range(33, 127)] + [f"<0x{b:02X}>" for b in range(256)]:
        if piece not in out:
            out[piece] = next(free)
    for i in range(384 - len(out)):  # as Gemma's <unused..> pieces: ids that exist, never written by encode
        out[f"<unused{i}>"] = next(free)
    return out


VOCAB = vocab()
VOCAB_SIZE = len(VOCAB)  # the model's logits cover exactly the tokenizer, as a real checkpoint's


def tokenizer(template: str = TEMPLATE):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(VOCAB, [], byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.chat_template = template
    return fast


def hf_model(seed: int = 0):
    S, F = "sliding_attention", "full_attention"
    config = transformers.Gemma4TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8, vocab_size_per_layer_input=VOCAB_SIZE,
        hidden_size_per_layer_input=0, final_logit_softcapping=30.0, layer_types=[S, S, F], eos_token_id=[1, 106],
        bos_token_id=2, pad_token_id=0, attn_implementation="eager")
    return randomize(transformers.Gemma4ForCausalLM(config), seed)


def save(path: Path, template: str = TEMPLATE, seed: int = 0) -> Path:
    """The checkpoint at path (config.json's eos [1, 106]; generation_config.json's [1, 106, 50])."""
    model = hf_model(seed)
    model.save_pretrained(path)
    tokenizer(template).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106, 50],
                                                             "pad_token_id": 0}))
    return path


class Forced:
    """A stand-in for a constraint that allows exactly the tokens of a script, then only `end` (an eos id).
    The request's own constraint (a tool grammar), if any, is stepped along and must allow each token:
    `refused` lists the ones it did not (a test asserts it is empty)."""

    def __init__(self, tokens, end: int, inner=None, width: int = VOCAB_SIZE):
        self.tokens, self.end, self.inner, self.at, self.refused = list(tokens), end, inner, 0, []
        self.bitmask = np.zeros((1, (width + 31) // 32), dtype=np.int32)

    def copy(self):
        return Forced(self.tokens, self.end, self.inner.copy() if self.inner else None, self.bitmask.shape[1] * 32)

    def _next(self) -> int:
        return self.tokens[self.at] if self.at < len(self.tokens) else self.end

    def mask(self) -> np.ndarray:
        self.bitmask[:] = 0
        t = self._next()
        self.bitmask[0, t >> 5] = np.int32(np.uint32(1 << (t & 31)).view(np.int32))
        return self.bitmask[0]

    def consume(self, token: int) -> bool:
        if self.inner is not None:
            self.inner.mask()
            if not self.inner.allows(token):
                self.refused.append((self.at, token))
            else:
                self.inner.consume(token)
        self.at += 1
        return True

    def allows(self, token, bitmask=None) -> bool:
        return token == self._next()

    def masks_along(self, tokens):
        masks = []
        at = self.at
        for token in tokens:
            masks.append(self.mask().copy())
            if token != self._next():
                break
            self.at += 1
        if len(masks) == len(tokens):
            masks.append(self.mask().copy())
        masks += [masks[-1]] * (len(tokens) + 1 - len(masks))
        self.at = at
        return np.stack(masks)

    def rollback(self, n: int) -> None:
        self.at -= n

    @property
    def accepting(self) -> bool:
        return self.at >= len(self.tokens)


def force(engine, text: str, end: int = TOOL_RESPONSE, log=None):
    """Every later request to the served engine emits exactly `text` (then `end`): its constraint becomes a
    Forced over text's tokens, wrapping the one the request asked for. log (a list) collects the Forced
    objects, to check what the request's own constraint said."""
    ids = list(engine.tokenizer.encode(text, add_special_tokens=False))
    base = type(engine).constraint

    def constraint(grammar):
        inner = base(engine, grammar)
        forced = Forced(ids, end, inner)
        if log is not None:
            log.append(forced)
        return forced

    engine.constraint = constraint
    return ids


def unforce(engine) -> None:
    engine.__dict__.pop("constraint", None)


def hf_render(messages, tools=None, template: str = TEMPLATE, **kwargs) -> str:
    """transformers' own render of a conversation (the reference the server's prompts are checked against)."""
    return tokenizer(template).apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                   **kwargs)



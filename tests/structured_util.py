"""Tokenizers that can spell JSON, for the structured-output tests' tiny random models: one built like
Gemma's (SentencePiece-style BPE: "▁" for spaces, <0xNN> byte fallback, multi-character pieces) and one like
StableLM's (GPT-NeoX byte-level BPE). Both have Gemma's turn tokens and a Gemma-style chat template, and their
checkpoints' vocab_size is the tokenizer's."""

from pathlib import Path

from reference import hf_model

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
END_OF_TURN = 5
# Gemma's template, shortened: a system message goes into the first user turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
            "{% if role == 'system' %}{% set sys = m['content'] %}{% else %}<start_of_turn>{{ role }}\n"
            "{% if sys is defined and loop.index0 == 1 %}{{ sys }}\n\n{% endif %}{{ m['content'] }}<end_of_turn>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Pieces that make JSON in fewer tokens than characters (so masks must handle tokens that span lexemes).
WORDS = ['{"', '":', '",', '"}', '},', '],', '[{', '"]', 'true', 'false', 'null', '12', '00', 'name', 'age',
         'the', 'ok', 'in']


def _merges(vocab: dict, words) -> list:
    merges = []
    for w in words:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[: k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    return merges


def gemma_like_tokenizer(images: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for c in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(c, len(vocab))
    merges = _merges(vocab, WORDS + ["▁the", "▁▁"])
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _fast(tok, len(SPECIALS), images)


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in sorted(alphabet):
        vocab[c] = len(vocab)
    merges = _merges(vocab, WORDS + ["Ġthe", "Ġ\"", "ĠĠ"])
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok, len(SPECIALS))


IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _fast(tok, n_special: int, images: bool = False):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    extra = {}
    if images:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in IMAGE_TOKENS])
        extra = dict(extra_special_tokens=dict(zip(["boi_token", "eoi_token", "image_token"], IMAGE_TOKENS)))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                 unk_token="<unk>", **extra)
    hf.chat_template = TEMPLATE
    return hf


def structured_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint of the family with a JSON-capable tokenizer (StableLM's byte-level, the
    others Gemma-like), <end_of_turn> as a second eos. T5Gemma 2's tokenizer adds the image tokens at its end
    and its processor is saved too."""
    if family == "t5gemma2":
        return _t5gemma2(path, seed)
    tok = byte_level_tokenizer() if family == "stablelm" else gemma_like_tokenizer()
    hf_model(family, seed=seed, vocab_size=len(tok), eos_token_id=[1, END_OF_TURN]).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _t5gemma2(path: Path, seed: int, text: dict = None) -> Path:
    import transformers

    from reference import T5_IMAGE, T5_TEXT, T5_TOKENS, T5_VISION, randomize

    tok = gemma_like_tokenizer(images=True)
    boi, eoi, image = tok.convert_tokens_to_ids(IMAGE_TOKENS)
    text = dict(T5_TEXT, vocab_size=len(tok), **(text or {}))
    config = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=T5_VISION, mm_tokens_per_image=T5_TOKENS, boi_token_index=boi,
                     eoi_token_index=eoi), decoder=dict(text), image_token_index=image, attn_implementation="eager",
        eos_token_id=[1, END_OF_TURN])
    randomize(transformers.T5Gemma2ForConditionalGeneration(config), seed).save_pretrained(path)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": T5_IMAGE, "width": T5_IMAGE})
    transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                 image_seq_length=T5_TOKENS).save_pretrained(path)
    return path

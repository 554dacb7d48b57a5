"""The reference side of the parity tests: tiny transformers models in float32, eager attention, every
weight (norms and biases included) randomised, saved as HF checkpoints for mlxgemma to load."""

import math

import numpy as np
import torch
import transformers

import mlxgemma

TOL = 1e-4  # max |Δ logits| the issue asks for, in float32

# Small enough for a 2-core CI, big enough to exercise GQA, several heads and windows.
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
WINDOW = 6

FAMILIES = {
    "gemma": ("GemmaConfig", "Gemma", dict(BASE)),
    "gemma2": ("Gemma2Config", "Gemma2", dict(BASE, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3", dict(BASE, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                  layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention", "sliding_attention"])),
    "stablelm": ("StableLmConfig", "StableLm", dict(BASE, head_dim=None, num_key_value_heads=2)),
}

HEAD_NAMES = {
    ("gemma3", "ForCausalLM"): "Gemma3ForCausalLM",
    ("gemma3", "ForSequenceClassification"): "Gemma3TextForSequenceClassification",
    ("gemma3", "Model"): "Gemma3TextModel",
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def hf_model(family: str, head: str = "ForCausalLM", seed: int = 0, **overrides):
    config_name, prefix, kwargs = FAMILIES[family]
    kwargs = {k: v for k, v in dict(kwargs, **overrides).items() if v is not None}
    config = getattr(transformers, config_name)(**kwargs, attn_implementation="eager")
    cls = getattr(transformers, HEAD_NAMES.get((family, head), prefix + head))
    return randomize(cls(config), seed)


def save_and_load(model, tmp_path, **load_kwargs):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return mlxgemma.load_model(path, **load_kwargs), path


def hf_logits(model, ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids)),
                    attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)))
    return out.logits.float().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def random_ids(batch: int, length: int, seed: int = 1, low: int = 3, high: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(batch, length))


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 96 ids (specials 0..3, then "t4".."t95"), saved beside
    checkpoints so that mlx_lm.load and mlxgemma.load find one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")


def save_checkpoint(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# T5Gemma 2: window 4 (encoder inputs of 9+ tokens cross it), 32-pixel images in 4-pixel patches pooled 4x4
# to 4 tokens per image; ids 100/101/102 are boi/eoi/image, as the tiny processor's tokenizer says.
T5_WINDOW, T5_IMAGE, T5_TOKENS, BOI, EOI, IMAGE = 4, 32, 4, 100, 101, 102
T5_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=T5_WINDOW, query_pre_attn_scalar=24,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
T5_VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                 image_size=T5_IMAGE, patch_size=4, vision_use_head=False)


def hf_t5gemma2(head: str = "ForConditionalGeneration", seed: int = 0, text=None, vision=None, **overrides):
    text = dict(T5_TEXT, **(text or {}))
    config = transformers.T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=dict(T5_VISION, **(vision or {})), mm_tokens_per_image=T5_TOKENS,
                     boi_token_index=BOI, eoi_token_index=EOI),
        decoder=dict(text), image_token_index=IMAGE, attn_implementation="eager", **overrides)
    return randomize(getattr(transformers, "T5Gemma2" + head)(config), seed)


def image_prompt(n_images: int, n_text: int = 5, seed: int = 0) -> list:
    """bos, text, then per image: boi, the image tokens, eoi (as the processor expands a placeholder)."""
    ids = [2] + [int(t) for t in random_ids(1, n_text, seed=seed, high=BOI)[0]]
    for _ in range(n_images):
        ids += [BOI] + [IMAGE] * T5_TOKENS + [EOI]
    return ids


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, T5_IMAGE, T5_IMAGE)).astype(np.float32)


def t5_tokenizer():
    """The tiny T5Gemma 2 models' tokenizer: words t4..t127 around boi/eoi/image tokens at 100/101/102, a
    bos-prepending post-processor and left padding, as Gemma's tokenizer.json does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(4, 128) if i not in (BOI, EOI, IMAGE)}
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **words,
             "<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                   "image_token": "<image_soft_token>"})


def hf_processor():
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": T5_IMAGE, "width": T5_IMAGE})
    return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=t5_tokenizer(),
                                        image_seq_length=T5_TOKENS)


def save_t5_checkpoint(model, path):
    model.save_pretrained(path)
    hf_processor().save_pretrained(path)
    return path

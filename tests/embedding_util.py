"""A tiny EmbeddingGemma as sentence-transformers saves it: a random float32 bidirectional Gemma 3 encoder
(window 6, halved to 4 by transformers; shorter than the inputs), mean pooling, Dense 32 -> 128 -> 32 without
bias or activation, Normalize, three task prompts, max_seq_length 24, a tokenizer that adds <bos> and <eos> as
EmbeddingGemma's does."""

from pathlib import Path

import torch
import transformers

from reference import randomize, tiny_tokenizer

PROMPTS = {"query": "t5 t6 ", "document": "t7 t8 t9 ", "Clustering": "t10 "}
MAX_LEN = 24
TEXTS = ["t11", "t12 t13 t14 t15 t16 t17 t18 t19 t20", " ".join(f"t{20 + i % 70}" for i in range(40)),
         "t30 t31 t32 t33", ""]


def tokenizer():
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                                  special_tokens=[("<bos>", 2), ("<eos>", 1)])
    return tok


def save(root: Path, seed: int = 0):
    """The sentence-transformers model, saved in root / "st" (its encoder alone in root / "encoder")."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    config = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16, max_position_embeddings=64,
        use_bidirectional_attention=True, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0)
    randomize(transformers.Gemma3TextModel(config), seed).save_pretrained(root / "encoder")
    tokenizer().save_pretrained(root / "encoder")
    modules = [Transformer(str(root / "encoder"), max_seq_length=MAX_LEN), Pooling(32, "mean"),
               Dense(32, 128, bias=False, activation_function=torch.nn.Identity()),
               Dense(128, 32, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    st = SentenceTransformer(modules=modules, prompts=PROMPTS)
    with torch.no_grad():
        for i, m in enumerate(modules[2:4]):
            gen = torch.Generator().manual_seed(seed + 7 + i)
            m.linear.weight.copy_(torch.randn(m.linear.weight.shape, generator=gen) / m.linear.weight.shape[1] ** 0.5)
    st.save(str(root / "st"))
    return st, root / "st"

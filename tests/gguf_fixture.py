"""Tiny GGUF files as llama.cpp writes them (names, metadata, norms stored as 1 + w, a SentencePiece-style
vocabulary), built from a random transformers model so that transformers can load the same file too."""

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf import quants as gq

from reference import hf_model

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Every 2-D weight gets one of these in turn: all the exactly-mapped types, a requantized one, floats.
TYPES = [T.Q4_K, T.Q5_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q6_K, T.F16]
SIZES = dict(vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, head_dim=256, sliding_window=4)


def vocabulary(n: int):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\u2581"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += letters + [f"\u2581{c}" for c in letters]
    tokens += [a + b for a in "etaoin" for b in "etaoinshr"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]  # every byte, for byte fallback
    tokens += [f"<unused{i}>" for i in range(n - len(tokens))]
    types = [6 if t.startswith("<0x") else 3 if t.startswith("<") else 1 for t in tokens]
    return tokens[:n], types[:n]


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[1] == "layers":
        return f"blk.{parts[2]}.{_BLOCK['.'.join(parts[3:-1])]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def _k_blocks(weight: np.ndarray, qtype, rng) -> np.ndarray:
    """The gguf package cannot quantize K-types: random, valid blocks (sane fp16 scales up front)."""
    size = gq.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(weight.size // 256, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(len(blocks), 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        blocks[:, -2:] = scales[:, :2]
    else:
        blocks[:, :4] = scales
    return blocks.reshape(weight.shape[0], -1)


def write_gguf(path, family: str = "gemma3", seed: int = 0, types=TYPES, **overrides):
    arch = family
    kwargs = dict(SIZES, **overrides)
    if family == "gemma2":
        kwargs.update(attn_logit_softcapping=30.0, final_logit_softcapping=20.0)
    hf = hf_model(family, seed=seed, query_pre_attn_scalar=256, layer_types=None, **kwargs)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    c = hf.config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"] if family == "gemma3"
                         else c.rope_parameters["rope_theta"])
    if family == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    tokens, token_types = vocabulary(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(token_types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_uint32("tokenizer.ggml.eot_token_id", 5)
    i = 0
    for name, p in hf.state_dict().items():
        x = p.detach().float().numpy()
        gname = _gguf_name(name)
        if x.ndim == 1:
            w.add_tensor(gname, (x + 1.0).astype(np.float32))  # llama.cpp's Gemma norms: 1 + w
            continue
        qtype = types[i % len(types)]
        i += 1
        if qtype == T.F16:
            w.add_tensor(gname, x.astype(np.float16))
        elif qtype == T.Q8_1:  # a type mlxgemma refuses: raw bytes are enough
            size = gq.GGML_QUANT_SIZES[qtype][1]
            w.add_tensor(gname, rng.integers(0, 256, (x.shape[0], x.shape[1] // 32 * size), dtype=np.uint8),
                         raw_dtype=qtype)
        elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            w.add_tensor(gname, _k_blocks(x, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(gname, gq.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

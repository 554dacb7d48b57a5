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
    _write_out(w)
    return path


# Gemma 4, as llama.cpp's converter writes it (conversion/gemma.py: Gemma4Model on Gemma3Model on TextModel,
# conversion/base.py: TextModel.set_gguf_parameters, ModelBase.prepare_tensors), step by step.
GEMMA4_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                  "<|\"|>"}  # Gemma4Model.set_vocab: always rendered, USER_DEFINED


def gemma4_tokenizer(path):
    """A tiny Gemma 4 style tokenizer.json (byte-fallback BPE over "\u2581"-spelled words, merges, control tokens,
    a chat template), saved where the converter would read it. -> (path, number of tokens)."""
    from transformers import GemmaTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|tool_response>", "<|channel>"]
    vocab = specials + ["\u2581"] + letters + [f"\u2581{c}" for c in letters]
    vocab += [a + b for a in "etaoin" for b in "etaoinshr"] + [f"<0x{i:02X}>" for i in range(256)]
    merges = [("\u2581", c) for c in letters] + [(a, b) for a in "etaoin" for b in "etaoinshr"]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[4:]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
    tok.save_pretrained(path)
    return path, len(tok)


def converter_hparams(hf, **given) -> dict:
    """The hparams the converter works from: config.json as released (global_head_dim and
    num_global_key_value_heads, which transformers 5 folds into per_layer_config), defaults filled in."""
    return {**hf.config.to_dict(), **given}


def _gemma4_metadata(w, hp: dict, ftype: int) -> None:
    """The keys with the values they end with (the converter writes some twice; the last write wins)."""
    n, swa = hp["num_hidden_layers"], [t == "sliding_attention" for t in hp["layer_types"]]
    rope = hp["rope_parameters"]
    # TextModel.set_gguf_parameters
    w.add_block_count(n)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    shared = hp["num_kv_shared_layers"]
    if hp.get("use_double_wide_mlp"):  # Gemma4Model: per layer, doubled on the KV-shared layers
        ff = hp["intermediate_size"]
        w.add_feed_forward_length([ff if i < n - shared else 2 * ff for i in range(n)])
    else:
        w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    if hp.get("is_causal") is False:  # use_bidirectional_attention "all"
        w.add_causal_attention(False)
    if hp.get("num_global_key_value_heads") is not None:  # Gemma4Model: per layer
        w.add_head_count_kv([hp["num_key_value_heads"] if s else hp["num_global_key_value_heads"] for s in swa])
    else:
        w.add_head_count_kv(hp["num_key_value_heads"])
    full = rope.get("full_attention", rope)
    assert full.get("rope_type") == "proportional"  # Gemma4Model.generate_extra_tensors asserts it
    w.add_rope_freq_base(full["rope_theta"])  # (rope_type proportional: "Unknown RoPE type", no scaling keys)
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("num_experts") is not None:
        w.add_expert_count(hp["num_experts"])
    if hp.get("top_k_experts") is not None:
        w.add_expert_used_count(hp["top_k_experts"])
    w.add_key_length(hp["global_head_dim"])  # head_dim here, then Gemma3Model's, then Gemma4Model's
    w.add_value_length(hp["global_head_dim"])
    w.add_file_type(ftype)
    # Gemma3Model.set_gguf_parameters
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])
    # Gemma4Model.set_gguf_parameters
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(hp.get("hidden_size_per_layer_input") or 0)
    w.add_sliding_window_pattern(swa)
    w.add_key_length_swa(hp["head_dim"])
    w.add_value_length_swa(hp["head_dim"])
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_rope_dimension_count(hp["global_head_dim"])
    w.add_rope_dimension_count_swa(int(hp["head_dim"] * hp.get("partial_rotary_factor", 1.0)))


def _gemma4_vocab(w, tokenizer_dir) -> None:
    """Gemma4Model.set_vocab."""
    import gguf

    vocab = gguf.LlamaHfVocab(tokenizer_dir)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in GEMMA4_VISIBLE else toktype)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(w)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def _gemma4_tensors(hf, hp: dict, tokenizer_dir):
    """(gguf name, tensor, transformers name) as Gemma4Model.filter_tensors / modify_tensors and
    Gemma3Model.modify_tensors yield them: rope_freqs first (generate_extra_tensors), norms as they are (norm_shift 0), the token
    embedding cut to the tokenizer's size, layer_scalar and the experts given a ".weight", the router's
    scale and per_expert_scale renamed to ffn_gate_inp.scale and ffn_down_exps.scale."""
    import json

    import gguf

    n = hp["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    full = hp["rope_parameters"]["full_attention"]
    rotated = int(hp["global_head_dim"] * full["partial_rotary_factor"] / 2)
    yield "rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (hp["global_head_dim"] // 2 - rotated),
                                         dtype=np.float32), None
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    n_vocab = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    for hf_name, p in hf.state_dict().items():
        if hf_name == "lm_head.weight" and hp["tie_word_embeddings"]:  # not in a tied checkpoint's safetensors
            continue
        x, name = p.detach().float().numpy(), hf_name
        bid = next((int(part) for part in name.split(".") if part.isdecimal()), None)
        if name.endswith("layer_scalar") or (".experts." in name and not name.endswith(".weight")):
            name += ".weight"
        if name.endswith("router.scale"):
            yield f"blk.{bid}.ffn_gate_inp.scale", x, hf_name
        elif ".per_expert_scale" in name:
            yield f"blk.{bid}.ffn_down_exps.scale", x, hf_name
        else:
            if "embed_tokens.weight" in name:
                x = x[:n_vocab]
            yield name_map.get_name(name, try_suffixes=(".weight", ".bias")), x, hf_name


def write_gemma4_gguf(path, hf, hp: dict, tokenizer_dir, types=(T.F32,), edit_metadata=None, replace=None) -> dict:
    """A Gemma 4 GGUF of the transformers model hf (hparams hp, see converter_hparams). The tensors the
    converter would store in the output type get types[i] in turn (F32: --outtype f32; Q8_0: --outtype
    q8_0; a mix, as llama-quantize leaves them); 1-D tensors, norms, the router and the scales stay F32.
    edit_metadata(writer) changes keys afterwards; replace {gguf name: array or None} swaps, drops or adds
    tensors (for the tests of files the converter would not write). -> {gguf name: transformers name}."""
    from pathlib import Path

    w = GGUFWriter(str(path), "gemma4")
    _gemma4_metadata(w, hp, ftype=0 if list(types) == [T.F32] else 7)
    _gemma4_vocab(w, Path(tokenizer_dir))
    if edit_metadata is not None:
        edit_metadata(w)
    replace = dict(replace or {})
    tensors = [(g, replace.pop(g, x), h) for g, x, h in _gemma4_tensors(hf, hp, Path(tokenizer_dir))]
    names, i = {}, 0
    for gname, x, hf_name in tensors + [(g, x, None) for g, x in replace.items()]:
        if x is None:
            continue
        names[gname] = hf_name
        if x.ndim <= 1 or gname.endswith("_norm.weight") or gname.endswith("ffn_gate_inp.weight") \
                or not gname.endswith(".weight"):
            w.add_tensor(gname, x.astype(np.float32))
            continue
        qtype = types[i % len(types)]
        i += 1
        if qtype not in (T.F32, T.F16) and x.shape[-1] % gq.GGML_QUANT_SIZES[qtype][0]:
            qtype = T.F16  # the converter's fallback on a QuantError
        if qtype in (T.F32, T.F16):
            w.add_tensor(gname, gq.quantize(x, qtype))
        else:
            w.add_tensor(gname, gq.quantize(x, qtype), raw_dtype=qtype)
    _write_out(w)
    return names


def _write_out(w) -> None:
    """The GGUF writer's closing sequence: header, metadata, tensors."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

"""T5Gemma 2: an encoder-decoder built from Gemma 3 blocks, with a SigLIP vision tower.

Encoder: scaled embeddings (the eoi token takes a learned, unscaled `eoi_embedding`), image features spliced
into the image-token slots, then bidirectional Gemma 3 layers; sliding layers see the asymmetric window
[i - ((W+1)//2 - 1), i + W//2]. Images: SigLIP -> average pooling to mm_tokens_per_image -> Gemma RMSNorm ->
x @ W with W (vision_dim, hidden). Decoder: Gemma 3 layers whose one attention attends, under ONE softmax, to
its own causal (sliding) keys followed by the encoder's keys (the same k_proj/k_norm/v_proj, no RoPE); the
encoder's keys and values are computed once per request. Embeddings (and by default the LM head) are shared.
Module names follow the checkpoints on disk (`model.encoder.layers`, without transformers' in-memory
`text_model.` level; both layouts load). Reference: transformers/models/t5gemma2."""

from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .encoder_decoder_cache import EncoderDecoderCache, encoder_mask, merged_mask
from .common import (MLP, Attention, PreTrainedModel, RMSNorm, activation, as_input_ids, attention, heads,
                     layer_masks, make_caches, padding_of, scaled_embedding)
from .config import SLIDING
from .gemma3_vision import Gemma3MultiModalProjector, merge_image_features
from .heads import at_positions, cross_entropy, last_non_pad, sequence_classification_loss, softcap
from .siglip import SiglipVisionModel
from .t5gemma2_config import T5Gemma2Config, T5Gemma2EncoderConfig, T5Gemma2TextConfig  # noqa: F401 (re-exported)


class EncoderOutput(NamedTuple):
    hidden_states: mx.array  # (B, S_enc, D)
    valid: Optional[mx.array]  # (B, S_enc) bool, which encoder positions are real; None if all


class T5Gemma2TextScaledWordEmbedding(nn.Embedding):
    """The shared token table plus the learned embedding of the end-of-image token."""

    def __init__(self, num_embeddings: int, dims: int):
        super().__init__(num_embeddings, dims)
        self.eoi_embedding = mx.zeros((dims,))

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        q = nn.QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
        q.eoi_embedding = self.eoi_embedding  # kept in float, with its name
        return q


def embed(table, ids: mx.array, config: T5Gemma2Config) -> mx.array:
    """W[ids] * sqrt(D) (in the weights' dtype); eoi positions take eoi_embedding, unscaled."""
    h = scaled_embedding(table, ids, config.decoder.hidden_size)
    return mx.where((ids == config.eoi_token_index)[..., None], table.eoi_embedding.astype(h.dtype), h)


class T5Gemma2EncoderLayer(nn.Module):
    def __init__(self, config: T5Gemma2TextConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = self.attention_class(config, config.rope_parameters[self.attention_type],
                                              scale=config.query_pre_attn_scalar**-0.5, qk_norm=True)
        self.mlp = MLP(config.hidden_size, config.intermediate_size,
                       activation(config.hidden_activation, "hidden_activation"))
        D, eps = config.hidden_size, config.rms_norm_eps
        self.pre_self_attn_layernorm = RMSNorm(D, eps)
        self.post_self_attn_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    attention_class = Attention

    def __call__(self, x: mx.array, mask=None, cache=None, **cross) -> mx.array:
        h = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), mask, cache, **cross))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class T5Gemma2Encoder(nn.Module):
    def __init__(self, config: T5Gemma2Config):
        super().__init__()
        self.config = config
        text = config.encoder.text_config
        self.embed_tokens = T5Gemma2TextScaledWordEmbedding(text.vocab_size, text.hidden_size)
        self.layers = [T5Gemma2EncoderLayer(text, i) for i in range(text.num_hidden_layers)]
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.vision_tower = SiglipVisionModel(config.encoder.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config.encoder)

    def get_image_features(self, pixel_values) -> mx.array:
        """(N, 3, S, S) -> (N, mm_tokens_per_image, D)."""
        return self.multi_modal_projector(self.vision_tower(mx.array(pixel_values)))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_features=None) -> mx.array:
        """image_features (get_image_features' output) stand in for pixel_values, e.g. to reuse an image."""
        text = self.config.encoder.text_config
        input_ids = as_input_ids(input_ids, text.vocab_size)
        h = embed(self.embed_tokens, input_ids, self.config)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            h = merge_image_features(input_ids, h, image_features, self.config.encoder.image_token_index)
        L = input_ids.shape[1]
        valid = padding_of(attention_mask, L)
        masks = {t: encoder_mask(L, valid, text.sliding_window if t == SLIDING else None)
                 for t in set(text.layer_types)}
        for layer in self.layers:
            h = layer(h, masks[layer.attention_type])
        return self.norm(h)


class T5Gemma2MergedAttention(Attention):
    """Self- and cross-attention with one set of projections and one softmax over [self keys ; encoder keys]."""

    def __call__(self, x: mx.array, mask=None, cache=None, cross=None, encoder_valid=None) -> mx.array:
        offset = cache.offset if cache is not None else 0
        q, k, v = self.project(x, cache)
        cross_k, cross_v = cross
        mask = merged_mask(mask, encoder_valid, x.shape[1], _length(k), _length(cross_k), offset)
        k, v = _joined(k, cross_k), _joined(v, cross_v)
        return self.output(attention(q, k, v, self.scale, mask))

    def cross_kv(self, encoder_hidden: mx.array):
        """The encoder's keys (k_norm, no RoPE) and values for this layer."""
        k = heads(self.k_proj(encoder_hidden), self.n_kv_heads)
        return self.k_norm(k), heads(self.v_proj(encoder_hidden), self.n_kv_heads)


def _length(keys) -> int:
    return (keys[0] if isinstance(keys, tuple) else keys).shape[2]


def _joined(own, cross):
    """Self then cross keys (or values): arrays, or quantized triples (both quantized, see EncoderDecoderCache)."""
    if isinstance(own, tuple):
        return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(own, cross))
    return mx.concatenate([own, cross], axis=2)


class T5Gemma2DecoderLayer(T5Gemma2EncoderLayer):
    attention_class = T5Gemma2MergedAttention


class T5Gemma2Decoder(nn.Module):
    def __init__(self, config: T5Gemma2Config):
        super().__init__()
        self.config = config
        dec = config.decoder
        if not config.tie_word_embeddings:
            self.embed_tokens = T5Gemma2TextScaledWordEmbedding(dec.vocab_size, dec.hidden_size)
        self.layers = [T5Gemma2DecoderLayer(dec, i) for i in range(dec.num_hidden_layers)]
        self.norm = RMSNorm(dec.hidden_size, eps=dec.rms_norm_eps)

    def cross_kv(self, encoder_hidden: mx.array) -> list:
        return [layer.self_attn.cross_kv(encoder_hidden) for layer in self.layers]

    def __call__(self, h: mx.array, cross: list, encoder_valid=None, attention_mask=None, cache=None) -> mx.array:
        """h: the decoder's input embeddings; cross: cross_kv(encoder output)."""
        dec = self.config.decoder
        masks = layer_masks(dec.layer_types, cache, h.shape[1], attention_mask, dec.sliding_window)
        for layer, c, kv in zip(self.layers, cache or [None] * len(self.layers), cross):
            h = layer(h, masks[layer.attention_type], c, cross=kv, encoder_valid=encoder_valid)
        return self.norm(h)


class T5Gemma2PreTrainedModel(PreTrainedModel):
    """What T5Gemma 2 answers differently (its model and every head)."""

    is_encoder_decoder = True
    vision_tower_name = "vision_tower"
    lm_head_name = "lm_head.out_proj"
    vocab_sharded_tables = ()  # its one token table (encoder, decoder and tied head) stays whole on every rank
    supports_pipeline = False  # two stacks, the encoder's and the decoder's: split by heads only
    readme_usage = ("```python\nimport mlxgemma\nmodel, processor = mlxgemma.load(\"path/to/this/folder\")\n"
                    "print(mlxgemma.generate(model, processor, \" in this image, there is\", image=\"photo.jpg\"))\n"
                    "```\n")

    def is_tied_head(self, path: str) -> bool:
        return path.endswith("encoder.embed_tokens") and "lm_head" not in self

    def calibration_forward(self, input_ids: mx.array) -> mx.array:
        return self(input_ids, decoder_input_ids=input_ids)

    def load_processor(self, path, tokenizer):
        from ..media.processor import T5Gemma2Processor

        return T5Gemma2Processor.from_pretrained(path, tokenizer, self.config)

    def dequantize(self) -> nn.Module:
        """mlx-lm rebuilds plain embeddings: the eoi token's embedding is put back."""
        kept = {name: m.eoi_embedding for name, m in self.named_modules() if "eoi_embedding" in m}
        model = super().dequantize()
        for name, m in model.named_modules():
            if name in kept:
                m.eoi_embedding = kept[name]
        return model


class T5Gemma2Model(T5Gemma2PreTrainedModel):
    def __init__(self, config: T5Gemma2Config):
        super().__init__()
        self.config = config
        self.encoder = T5Gemma2Encoder(config)
        self.decoder = T5Gemma2Decoder(config)

    def encode(self, input_ids, attention_mask=None, pixel_values=None, image_features=None) -> EncoderOutput:
        """Run the encoder once (text, and images: pixel_values, or their get_image_features())."""
        input_ids = as_input_ids(input_ids, self.config.vocab_size)
        hidden = self.encoder(input_ids, attention_mask, pixel_values, image_features)
        return EncoderOutput(hidden, padding_of(attention_mask, input_ids.shape[1]))

    def make_cache(self, encoder_output: EncoderOutput, max_kv_size: Optional[int] = None) -> EncoderDecoderCache:
        dec = self.config.decoder
        cross = self.decoder.cross_kv(encoder_output.hidden_states)
        mx.eval(cross)
        return EncoderDecoderCache(make_caches(dec.layer_types, dec.sliding_window, max_kv_size), cross,
                                   encoder_output.valid)

    def decode(self, decoder_input_ids, encoder_output: EncoderOutput, decoder_attention_mask=None,
               cache: Optional[EncoderDecoderCache] = None) -> mx.array:
        """Decoder hidden states; with a cache (make_cache) each call continues where the last one ended."""
        ids = as_input_ids(decoder_input_ids, self.config.vocab_size)
        table = self.decoder.embed_tokens if "embed_tokens" in self.decoder else self.encoder.embed_tokens
        if cache is None:
            cross, valid = self.decoder.cross_kv(encoder_output.hidden_states), encoder_output.valid
        else:
            cross, valid = cache.quantized_cross(), cache.encoder_valid
        return self.decoder(embed(table, ids, self.config), cross, valid, decoder_attention_mask, cache)

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, pixel_values=None,
                 decoder_attention_mask=None) -> mx.array:
        encoded = self.encode(input_ids, attention_mask, pixel_values)
        return self.decode(decoder_input_ids, encoded, decoder_attention_mask)

    def sanitize(self, weights: dict, prefix: str = "") -> dict:
        """Either on-disk layout: `encoder.text_model.*` (transformers' in-memory names) or without it, and
        `vision_tower.vision_model.*` or without it; keys under `prefix` (the heads' "model."). The tied
        decoder table is dropped."""
        out, vision = {}, {}
        enc, tower = f"{prefix}encoder.", f"{prefix}encoder.vision_tower."
        for k, v in weights.items():
            k = k.replace(f"{enc}text_model.", enc, 1)
            if k.startswith(tower):
                vision[k.removeprefix(tower)] = v
            elif not (self.config.tie_word_embeddings and k.startswith(f"{prefix}decoder.embed_tokens.")):
                out[k] = v
        out.update({tower + k: v for k, v in self.encoder.vision_tower.sanitize(vision).items()})
        return out


def shift_right(ids: mx.array, start: int, pad: int) -> mx.array:
    """transformers' decoder inputs from labels: start token first, -100 -> pad."""
    shifted = mx.concatenate([mx.full((ids.shape[0], 1), start, ids.dtype), ids[:, :-1]], axis=1)
    return mx.where(shifted == -100, pad, shifted)


class _T5Gemma2Head(T5Gemma2PreTrainedModel):
    def __init__(self, config: T5Gemma2Config):
        super().__init__()
        self.config = config
        self.model = T5Gemma2Model(config)

    @property
    def layers(self):
        return self.model.decoder.layers

    def sanitize(self, weights: dict) -> dict:
        return self.model.sanitize(weights, prefix="model.")

    def _decoder_inputs(self, input_ids, decoder_input_ids):
        if decoder_input_ids is not None:
            return decoder_input_ids
        ids = mx.array(np.asarray(input_ids)) if not isinstance(input_ids, mx.array) else input_ids
        return shift_right(ids if ids.ndim == 2 else ids[None], self.config.decoder.bos_token_id,
                           self.config.decoder.pad_token_id)


class T5Gemma2LMHead(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.out_proj = nn.Linear(hidden_size, vocab_size, bias=False)


class T5Gemma2ForConditionalGeneration(_T5Gemma2Head):
    """model(input_ids, decoder_input_ids, attention_mask, pixel_values, decoder_attention_mask) -> logits
    (B, L_dec, V). For generation: encode once, make_cache(encoded), then decode_step per token."""

    def __init__(self, config: T5Gemma2Config):
        super().__init__(config)
        if not config.tie_word_embeddings:
            self.lm_head = T5Gemma2LMHead(config.decoder.hidden_size, config.vocab_size)

    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, pixel_values=None,
                 decoder_attention_mask=None) -> mx.array:
        encoded = self.encode(input_ids, attention_mask, pixel_values)
        return self.decode_step(self._decoder_inputs(input_ids, decoder_input_ids), encoded,
                                decoder_attention_mask=decoder_attention_mask)

    def encode(self, input_ids, attention_mask=None, pixel_values=None, image_features=None) -> EncoderOutput:
        return self.model.encode(input_ids, attention_mask, pixel_values, image_features)

    def make_cache(self, encoder_output: EncoderOutput, max_kv_size: Optional[int] = None) -> EncoderDecoderCache:
        return self.model.make_cache(encoder_output, max_kv_size)

    def decode_step(self, decoder_input_ids, encoder_output: Optional[EncoderOutput] = None, cache=None,
                    decoder_attention_mask=None) -> mx.array:
        """Logits for decoder tokens, reusing an encoder output (or the cache made from one)."""
        h = self.model.decode(decoder_input_ids, encoder_output, decoder_attention_mask, cache)
        head = self.lm_head.out_proj if "lm_head" in self else self.model.encoder.embed_tokens.as_linear
        return softcap(head(h), self.config.decoder.final_logit_softcapping)

    def loss(self, input_ids, labels, attention_mask=None, pixel_values=None) -> mx.array:
        """transformers' seq2seq loss: the decoder reads shift_right(labels); labels[t] is the target of
        position t (no further shift); -100 is ignored."""
        labels = mx.array(labels)
        return cross_entropy(self(input_ids, self._decoder_inputs(labels, None), attention_mask, pixel_values), labels)


class T5Gemma2ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.out_proj = nn.Linear(hidden_size, num_labels, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_proj(x)


class T5Gemma2ForTokenClassification(_T5Gemma2Head):
    """Per decoder position (the decoder reads shift_right(input_ids) unless given) -> (B, L, num_labels)."""

    def __init__(self, config: T5Gemma2Config):
        super().__init__(config)
        self.score = T5Gemma2ClassificationHead(config.decoder.hidden_size, config.num_labels)

    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, pixel_values=None,
                 decoder_attention_mask=None) -> mx.array:
        return self.score(self._hidden(input_ids, decoder_input_ids, attention_mask, pixel_values,
                                       decoder_attention_mask)[0])

    def _hidden(self, input_ids, decoder_input_ids, attention_mask, pixel_values, decoder_attention_mask):
        dec_ids = as_input_ids(self._decoder_inputs(input_ids, decoder_input_ids), self.config.vocab_size)
        return self.model(input_ids, dec_ids, attention_mask, pixel_values, decoder_attention_mask), dec_ids

    def loss(self, input_ids, labels, attention_mask=None, pixel_values=None) -> mx.array:
        return cross_entropy(self(input_ids, attention_mask=attention_mask, pixel_values=pixel_values), labels)


class T5Gemma2ForSequenceClassification(T5Gemma2ForTokenClassification):
    """Pooled at the decoder stream's rightmost non-pad position -> (B, num_labels)."""

    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, pixel_values=None,
                 decoder_attention_mask=None) -> mx.array:
        h, dec_ids = self._hidden(input_ids, decoder_input_ids, attention_mask, pixel_values, decoder_attention_mask)
        return self.score(at_positions(h, last_non_pad(dec_ids, self.config.pad_token_id)))

    def loss(self, input_ids, labels, attention_mask=None, pixel_values=None) -> mx.array:
        pooled = self(input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return sequence_classification_loss(pooled, labels, self.config)

"""A tiny Gemma 4 that sees and hears, for the media tests: gemma4_chat_util's tokenizer (Gemma 4's specials at
their ids, Google's chat template) with the media tokens in the place of seven unused pieces, and a random float32
Gemma4ForConditionalGeneration (vision and audio towers, every weight and clip bound randomised) whose window is
smaller than an image block. Saved with a processor_config.json of the sizes the towers take."""

import json
from pathlib import Path

import numpy as np
import torch
import transformers

import gemma4_chat_util as chat
from reference import randomize

MEDIA = ["<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
UNUSED = [p for p in chat.VOCAB if p.startswith("<unused")]
IDS = dict(zip(MEDIA, (chat.VOCAB[p] for p in UNUSED[-len(MEDIA):])))
PATCH, POOL, MELS = 4, 2, 128  # (128 mel bins, as released: mlx-vlm sizes its audio projection so)


def tokenizer():
    from tokenizers import AddedToken

    fast = chat.tokenizer()
    vocab = fast.backend_tokenizer.get_vocab()
    tok = fast.backend_tokenizer
    model = json.loads(tok.to_str())
    for name, i in IDS.items():  # rename the unused pieces
        old = next(p for p, j in vocab.items() if j == i)
        model["model"]["vocab"][name] = model["model"]["vocab"].pop(old)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(model))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA])
    names = dict(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>", boa_token="<|audio>",
                 eoa_token="<audio|>", audio_token="<|audio|>")  # (what transformers' Gemma4Processor reads)
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                               extra_special_tokens=names)
    out.chat_template = chat.TEMPLATE
    return out


def config(bidirectional=None, audio: bool = True) -> transformers.Gemma4Config:
    S, F = "sliding_attention", "full_attention"
    text = dict(vocab_size=chat.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, sliding_window=6,
                vocab_size_per_layer_input=chat.VOCAB_SIZE, hidden_size_per_layer_input=8, num_kv_shared_layers=1,
                layer_types=[S, F, S, F], eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0,
                use_bidirectional_attention=bidirectional)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=PATCH, pooling_kernel_size=POOL,
                  position_embedding_size=64, use_clipped_linears=True, standardize=True)
    # (the tower assumes feature_size == subsampling_conv_channels[0]: its projection is sized so)
    sound = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[MELS, 4],
                 attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
                 output_proj_dims=24, conv_kernel_size=3)
    return transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=sound if audio else None,
        image_token_id=IDS["<|image|>"], boi_token_id=IDS["<|image>"], eoi_token_id=IDS["<image|>"],
        audio_token_id=IDS["<|audio|>"], boa_token_id=IDS["<|audio>"], eoa_token_index=IDS["<audio|>"],
        video_token_id=IDS["<|video|>"], attn_implementation="eager")


def hf_model(seed: int = 0, **options):
    return randomize_towers(randomize(transformers.Gemma4ForConditionalGeneration(config(**options)), seed), seed)


def randomize_towers(model, seed: int = 0):
    """The towers' buffers randomised too: clip bounds that clip, a standardisation that moves the features."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                b.copy_(-0.5 - torch.rand(b.shape, generator=gen))
            elif name.endswith(("input_max", "output_max")):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith(("std_bias", "std_scale")):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5 + (1.0 if "scale" in name else 0.0))
    return model


PROCESSOR = {"image_processor": {"patch_size": PATCH, "pooling_kernel_size": POOL, "max_soft_tokens": 70},
             "feature_extractor": {"feature_size": MELS},
             "audio_seq_length": 750}


def save(path: Path, seed: int = 0, **options) -> Path:
    model = hf_model(seed, **options)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106, 50],
                                                             "pad_token_id": 0}))
    return path


def image(h: int, w: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def tone(seconds: float, hz: float = 440.0, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.shape) * 0.05
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def video(n: int, h: int = 24, w: int = 40, seed: int = 0):
    """n random frames (uint8 HWC) and their timestamps at 2 fps."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), [i / 2 for i in range(n)]


def mp4(path, n: int, fps: int = 10, textured: bool = False):
    """An MPEG-4 file of n grey frames, frame i at level 6 i (mod 256), 64x48, written by PyAV; textured: a
    diagonal ramp added (something for a resize to blend)."""
    import av

    ramp = (np.add.outer(np.arange(48), np.arange(64)) * 3)[..., None] if textured else 0
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = ((np.full((48, 64, 3), i * 6) + ramp) % 256).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def cached_steps(model, processor, text: str, images, audio, follow=(7, 9, 11), videos=()) -> tuple:
    """(our logits at the prompt's last token and at each of `follow` fed after it, the prompt prefilled in
    chunks of 5 through the caches (each would cut a block: they grow to its end); the processor's inputs of
    the whole sequence, whose reference logits from position len(prompt) - 1 on are to equal them)."""
    from mlxgemma.media.features import encode_prompt, prefill

    ids, features = encode_prompt(model, processor, text, images, audio, videos)
    cache = model.make_cache()
    prefill(model, cache, ids[:-1], features, step=5)
    steps = [np.array(model(np.array([ids[-1:]]), cache=cache))[0, -1]]
    for t in follow:
        steps.append(np.array(model(np.array([[t]]), cache=cache))[0, -1])
    inputs = processor(text, images, audio, videos)
    n = len(follow)
    full = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], [list(follow)]], axis=1),
                attention_mask=np.ones((1, len(ids) + n), dtype=np.int64),
                mm_token_type_ids=np.concatenate([inputs["mm_token_type_ids"], [[0] * n]], axis=1))
    return np.stack(steps), full, len(ids) - 1

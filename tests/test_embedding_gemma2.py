"""EmbeddingGemma 2 (EmbeddingGemma2Model, and EmbeddingGemma2TextModel alone) against transformers 5.23, on tiny
random float32 checkpoints: every weight randomised, the layer_scalar buffers and the towers' clip bounds and
standardisation too; a sliding window of radius 3 inside inputs of up to 23 tokens and inside image blocks;
full layers of their own head size and KV heads (per_layer_config). last_hidden_state for text, a right-padded
batch, an image, audio, both, video frames; our processor's ids, layout and arrays against transformers' whole
EmbeddingGemma2Processor (its video processor through torchvision_stand_in.py); frame sampling by rate; the
pooled sentence embedding against transformers' recipe and sentence-transformers; bad inputs."""

import copy
import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers.video_utils import VideoMetadata

import gemma4_media_util as media
import torchvision_stand_in
import mlxgemma
from mlxgemma.errors import MlxGemmaError
from reference import randomize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

S, F = "sliding_attention", "full_attention"
# (Hidden size 64, not 32: at 32, float32's rounding in the towers' features (about 2e-6) came out of the four
# layers of a random model as up to 2.4e-5 over seeds 0-2; at 64, under 1e-5 over seeds 0-4.)
TEXT = dict(vocab_size=media.chat.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=3, hidden_size_per_layer_input=16, embedding_dim=24,
            layer_types=[S, F, S, F])
TOKENS = dict(image_token_id=media.IDS["<|image|>"], boi_token_id=media.IDS["<|image>"],
              eoi_token_id=media.IDS["<image|>"], audio_token_id=media.IDS["<|audio|>"],
              boa_token_id=media.IDS["<|audio>"], eoa_token_index=media.IDS["<audio|>"],
              video_token_id=media.IDS["<|video|>"])
GEOMETRY = dict(patch_size=media.PATCH, pooling_kernel_size=media.POOL)
# Frames at another budget than images (as released: 280 and 140), so that each processor's own is checked.
PROCESSOR = {"image_processor": dict(GEOMETRY, max_soft_tokens=70), "feature_extractor": {"feature_size": media.MELS},
             "video_processor": dict(GEOMETRY, max_soft_tokens=140), "audio_seq_length": 750}
TOL = 1e-5
INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "input_features",
          "input_features_mask", "pixel_values_videos", "video_position_ids", "num_frames_per_video")


def config(vision: bool = True, audio: bool = True) -> transformers.EmbeddingGemma2Config:
    towers = media.config()  # (Gemma 4's tiny towers)
    return transformers.EmbeddingGemma2Config(
        text_config=TEXT, vision_config=towers.vision_config.to_dict() if vision else None,
        audio_config=towers.audio_config.to_dict() if audio else None, attn_implementation="eager", **TOKENS)


def hf_model(seed: int = 0, cls=transformers.EmbeddingGemma2Model, **options):
    cfg = config(**options) if cls is transformers.EmbeddingGemma2Model else config(False, False).text_config
    model = media.randomize_towers(randomize(cls(cfg), seed), seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def tokenizer():
    """gemma4_media_util's tokenizer adding <bos> and <eos> as the released one does; no chat template (with
    one, sentence-transformers would write text through it)."""
    from tokenizers.processors import TemplateProcessing

    tok = media.tokenizer()
    tok.chat_template = None
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 1)])
    return tok


def save(path, model):
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return path


@pytest.fixture(scope="module")
def reference():
    """transformers' EmbeddingGemma2Processor of the checkpoint's settings (a callable: processor(**inputs))."""
    parts = (tokenizer(), transformers.Gemma4ImageProcessorPil(**PROCESSOR["image_processor"]),
             transformers.Gemma4AudioFeatureExtractor(feature_size=media.MELS))
    with torchvision_stand_in.embedding_gemma2_processor(*parts, **PROCESSOR["video_processor"]) as processor:
        yield processor


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, reference):
    """The checkpoint as transformers saves it: the model's files and its processor's (processor_config.json
    with every part's settings, the tokenizer's files)."""
    hf, path = hf_model(), tmp_path_factory.mktemp("embedding_gemma2")
    hf.save_pretrained(path)
    reference.save_pretrained(path)
    model, processor = mlxgemma.load(path)
    return hf, encoder(model), processor


def encoder(model):
    """mlxgemma.load's embedding model (pooled, normalised: models/embedding.py) holds the encoder compared here."""
    from mlxgemma.models.embedding import SentenceEmbedding

    assert isinstance(model, SentenceEmbedding) and model.normalize and not model.dense
    return model.model


def hf_states(hf, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k in INPUTS}
        return hf(**tensors).last_hidden_state.numpy()


def ours(model, inputs: dict) -> np.ndarray:
    return np.array(model(**{k: v for k, v in inputs.items() if k in INPUTS}))


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("length", [1, 4, 9, 23])
def test_text_matches_transformers(ckpt, length):
    """Token ids straight in, shorter and longer than the window (7 tokens: radius 3)."""
    hf, model, _ = ckpt
    ids = np.random.default_rng(length).integers(3, media.IDS["<|image>"], (2, length))
    got = np.array(model(ids))
    assert got.shape == (2, length, TEXT["embedding_dim"]) and model.embedding_dim == TEXT["embedding_dim"]
    assert diff(got, hf_states(hf, {"input_ids": ids})) <= TOL


def test_padded_batch_rows_equal_alone(ckpt):
    """A right-padded batch (the tokenizer's side): each row's real tokens equal the row alone, and
    transformers' batch there (padding rows are not read: transformers lets them see the real keys, not
    themselves)."""
    hf, model, processor = ckpt
    texts = ["a long sentence that goes on and on", "short", "a middling one"]
    inputs = processor(texts)
    mask = inputs["attention_mask"]
    assert mask[:, 0].all() and not mask[:, -1].all() and (np.diff(mask, axis=1) <= 0).all()  # right padding
    got, expected = ours(model, inputs), hf_states(hf, inputs)
    for i, text in enumerate(texts):
        n = int(mask[i].sum())
        assert diff(got[i, :n], expected[i, :n]) <= TOL
        assert diff(got[i, :n], ours(model, processor(text))[0]) <= TOL


CASES = {
    "image": dict(text="<|image|> what is this", images=[media.image(40, 64)]),
    "audio": dict(text="a tone: <|audio|>", audio=[media.tone(1.3)]),
    "image and audio": dict(text="<|image|> and <|audio|> together", images=[media.image(48, 32)],
                            audio=[media.tone(0.7)]),
    "video": dict(text="<|video|> moving", videos=[media.video(5)[0]]),
    "media alone": dict(images=[[media.image(30, 30)], [media.image(20, 50, seed=1)]],
                        audio=[[media.tone(0.4)], [media.tone(0.9)]]),
    "two prompts": dict(text=["<|image|> first", "second <|image|> <|image|>"],
                        images=[[media.image(24, 24)], [media.image(32, 48), media.image(64, 16, seed=2)]]),
    # (a call's budget is the images' and the frames' alike)
    "budget": dict(text="<|video|> and <|image|>", images=[media.image(30, 30)], videos=[media.video(2, seed=1)[0]],
                   max_soft_tokens=280),
}


@pytest.mark.parametrize("case", list(CASES))
def test_media_match_transformers(ckpt, reference, case):
    """Our processor's ids and arrays equal transformers' EmbeddingGemma2Processor's (text left out: its
    placeholders), and last_hidden_state on them equals transformers' model's."""
    hf, model, processor = ckpt
    inputs = processor(**CASES[case])
    theirs = reference(**CASES[case], return_tensors="np")
    assert sorted(inputs) == sorted(theirs)
    assert inputs["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert inputs["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    for key in ("image_position_ids", "video_position_ids", "input_features_mask", "num_frames_per_video"):
        if key in inputs:
            assert np.array_equal(inputs[key], theirs[key]), key
    if "pixel_values" in inputs:
        assert diff(inputs["pixel_values"], theirs["pixel_values"]) <= 1 / 255  # (Pillow's resize may differ by 1)
    if "pixel_values_videos" in inputs:
        assert diff(inputs["pixel_values_videos"], theirs["pixel_values_videos"]) == 0
    if "input_features" in inputs:
        assert diff(inputs["input_features"], theirs["input_features"]) <= 1e-4
    got, real = ours(model, inputs), inputs["attention_mask"].astype(bool)  # (padding rows are not read)
    assert got.shape == inputs["input_ids"].shape + (TEXT["embedding_dim"],)
    assert diff(got[real], hf_states(hf, inputs)[real]) <= TOL


def test_video_layout_and_budgets(ckpt):
    """A video is one <|image> <|video|>... <image|> block per frame, back to back, each of the video budget
    (140 soft tokens: 560 patches), the image beside it of the image budget (70: 280 patches)."""
    _, _, processor = ckpt
    frames = media.video(3)[0]
    inputs = processor("x <|image|> <|video|>", [media.image(30, 30)], videos=[frames])
    text = processor.tokenizer.decode(inputs["input_ids"][0].tolist())
    per_frame = int((inputs["video_position_ids"][0] != -1).all(-1).sum()) // media.POOL**2
    block = "<|image>" + "<|video|>" * per_frame + "<image|>"
    assert text.endswith(" " + block * 3 + "<eos>") and text.startswith("<bos>")
    assert inputs["pixel_values"].shape[1] == 280 and inputs["pixel_values_videos"].shape[1] == 560
    # With add_timestamps (the video processor's config): what transformers' replace_video_token writes.
    stamped = copy.copy(processor)
    stamped.video_processor = copy.copy(processor.video_processor)
    stamped.video_processor.add_timestamps = True
    times = [0.0, 0.9676, 61.5]
    text = stamped.tokenizer.decode(stamped("<|video|>", videos=[(frames, times)])["input_ids"][0].tolist())
    stub = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>",
                           video_processor=SimpleNamespace(add_timestamps=True),
                           timestamp_fmt=transformers.EmbeddingGemma2Processor.timestamp_fmt)
    meta = VideoMetadata(total_num_frames=3, fps=1.0, frames_indices=times)  # (timestamps: indices / fps)
    expected = transformers.EmbeddingGemma2Processor.replace_video_token(
        stub, {"num_soft_tokens_per_video": [per_frame], "video_metadata": [meta]}, 0,
        videos_kwargs={}, load_audio_from_video=False)
    assert text == "<bos>" + expected + "<eos>" and "01:02 <|image>" in text
    with pytest.raises(MlxGemmaError, match="add_timestamps needs"):
        stamped("<|video|>", videos=[frames])


def test_video_sampling_matches_transformers(reference, tmp_path):
    """Frames sampled as transformers' EmbeddingGemma2VideoProcessor.sample_frames samples them (1 per second,
    then at most 32 spread evenly; all then the budget without a rate); from a file, the frames transformers'
    PyAV reader returns at those indices, with their timestamps."""
    from transformers.video_utils import read_video_pyav

    from mlxgemma.media.embedding_gemma2_processor import EmbeddingGemma2VideoProcessor, sample_frames
    from mlxgemma.media.gemma4_video import Gemma4VideoFrameProcessor

    hf_sample = reference.video_processor.sample_frames
    for total, fps in ((1, 24.0), (45, 10.0), (100, 29.97), (40, 1.0), (2000, 25.0), (70, None)):
        meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps if fps else None)
        for overflow, budget in (("uniform", 32), ("truncate", 8), (None, None)):
            expected = hf_sample(meta, fps=1, max_frames=budget, overflow_strategy=overflow)
            assert sample_frames(total, fps, meta.duration, 1, budget, overflow).tolist() == expected.tolist()
    for n, rate in ((45, 10), (40, 1)):
        path = media.mp4(tmp_path / f"clip{n}.mp4", n, fps=rate, textured=True)
        sampler = partial(hf_sample, fps=1, max_frames=32, overflow_strategy="uniform")
        expected, meta = read_video_pyav(str(path), sample_indices_fn=sampler)
        frames, stamps = EmbeddingGemma2VideoProcessor(Gemma4VideoFrameProcessor(**GEOMETRY)).frames_of(path)
        assert len(frames) == (4 if n == 45 else 32) and np.array_equal(frames, expected)
        assert np.allclose(stamps, meta.timestamps)


def test_pooled_embedding_matches_the_recipe(ckpt):
    """normalize(masked mean of last_hidden_state) equals transformers' documented recipe in torch."""
    hf, model, processor = ckpt
    inputs = processor(["task: search result | query: red planet", "title: none | text: Mars"])
    h, mask = ours(model, inputs), inputs["attention_mask"][..., None]
    pooled = (h * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        token_embeddings = hf(**tensors).last_hidden_state
    m = tensors["attention_mask"].unsqueeze(-1).to(token_embeddings.dtype)
    expected = (token_embeddings * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(expected, p=2, dim=-1).numpy()
    assert diff(pooled, expected) <= TOL


def test_sentence_transformers_folder(tmp_path):
    """The release is a sentence-transformers folder (the transformer's weights at its root, Pooling and
    Normalize beside): mlxgemma.load reads it, and the pooled embeddings equal its encode()."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    hf = hf_model(seed=5, vision=False, audio=False)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer().save_pretrained(tmp_path / "tok")
    transformer = Transformer(str(tmp_path / "hf"), tokenizer_name_or_path=str(tmp_path / "tok"))
    st = SentenceTransformer(modules=[transformer, Pooling(TEXT["embedding_dim"], "mean"), Normalize()])
    st.save(str(tmp_path / "st"))
    texts = ["The weather is lovely today.", "He drove to the stadium.", "ok"]
    expected = st.encode(texts)
    model, processor = mlxgemma.load(tmp_path / "st")
    model = encoder(model)
    inputs = processor(texts)
    h, mask = ours(model, inputs), inputs["attention_mask"][..., None]
    pooled = (h * mask).sum(1) / mask.sum(1)
    assert diff(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), expected) <= TOL


def test_text_model_checkpoint_and_registry(tmp_path):
    """transformers' EmbeddingGemma2TextModel saved alone (model_type embedding_gemma2_text) loads as ours, equal;
    both classes are embedders to the rest of the library."""
    from mlxgemma.models import has_vision, is_drafter, is_embedder, is_encoder_decoder
    from mlxgemma.models.embedding_gemma2 import EmbeddingGemma2Model, EmbeddingGemma2TextModel

    hf = hf_model(seed=3, cls=transformers.EmbeddingGemma2TextModel)
    hf.save_pretrained(tmp_path / "text")
    model = encoder(mlxgemma.load_model(tmp_path / "text"))
    assert isinstance(model, EmbeddingGemma2TextModel) and model.embedding_dim == TEXT["embedding_dim"]
    ids = np.random.default_rng(0).integers(3, 300, (1, 12))
    assert diff(np.array(model(ids)), hf_states(hf, {"input_ids": ids})) <= TOL
    assert is_embedder(model) and EmbeddingGemma2Model.is_embedder
    assert not (has_vision(model) or is_drafter(model) or is_encoder_decoder(model))


def test_config_resolves_as_transformers():
    """Defaults, and the builder keywords transformers reads but does not keep (sliding_window_pattern,
    global_head_dim, num_global_key_value_heads): the same layer types, ropes and per-type shapes."""
    from mlxgemma.models.embedding_gemma2 import EmbeddingGemma2TextConfig

    for kwargs in ({}, dict(num_hidden_layers=7, sliding_window_pattern=3, global_head_dim=64,
                            num_global_key_value_heads=2, layer_types=None)):
        theirs = transformers.EmbeddingGemma2TextConfig(**kwargs)
        mine = EmbeddingGemma2TextConfig.from_dict(kwargs, require=False)
        assert mine.layer_types == theirs.layer_types
        for t in set(theirs.layer_types):
            assert mine.head_dims[t] == theirs.per_layer_config[t].head_dim
            assert mine.kv_heads[t] == theirs.per_layer_config[t].num_key_value_heads
            assert mine.rope_parameters[t] == theirs.rope_parameters[t]
        saved = theirs.to_dict()  # (per_layer_config written out, the builder keywords gone)
        again = EmbeddingGemma2TextConfig.from_dict(saved)
        assert (again.head_dims, again.kv_heads) == (mine.head_dims, mine.kv_heads)


def test_bad_inputs(ckpt, tmp_path):
    hf, model, processor = ckpt
    with pytest.raises(MlxGemmaError, match="placeholder"):
        processor("<|image|>", [media.image(30, 30), media.image(20, 20)])
    with pytest.raises(MlxGemmaError, match="as many prompts"):
        processor(images=[media.image(30, 30), media.image(20, 20)], audio=[media.tone(0.5), media.tone(0.5)])
    with pytest.raises(MlxGemmaError, match="nothing to embed"):
        processor()
    inputs = processor("<|image|> <|image|>", [media.image(30, 30), media.image(30, 30, seed=1)])
    with pytest.raises(MlxGemmaError, match="image tokens but the image"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"][:1],
              image_position_ids=inputs["image_position_ids"][:1])
    text = processor(["hello there", "hi"])
    with pytest.raises(MlxGemmaError, match="attention_mask has shape"):
        model(text["input_ids"], attention_mask=text["attention_mask"][:, :-1])
    deaf, deaf_processor = mlxgemma.load(save(tmp_path / "no_audio", hf_model(seed=1, audio=False)))
    deaf = encoder(deaf)
    with pytest.raises(MlxGemmaError, match="EmbeddingGemma 2 checkpoint has no audio_config"):
        deaf_processor("<|audio|>", audio=[media.tone(0.5)])
    clip = processor("<|audio|>", audio=[media.tone(0.5)])
    with pytest.raises(MlxGemmaError, match="EmbeddingGemma 2 checkpoint has no audio tower"):
        deaf(clip["input_ids"], input_features=clip["input_features"],
             input_features_mask=clip["input_features_mask"])

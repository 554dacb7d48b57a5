"""Gemma3Processor (and pan-and-scan) against transformers' Gemma3Processor with Gemma3ImageProcessorPil on a tiny
setup: pixel values within 1e-6, identical input_ids / attention_mask / token_type_ids, the same crop counts.
The tokenizer keeps every space and newline as its own token and knows the words of transformers' pan-and-scan
prompt, so a difference in the expanded text (wording, spacing, order) shows up as different ids."""

from types import SimpleNamespace

import numpy as np
import pytest
import transformers
from mlx_lm.tokenizer_utils import TokenizerWrapper
from PIL import Image

from mlxgemma import Gemma3Processor, T5Gemma2Processor
from mlxgemma.errors import MlxGemmaError
from mlxgemma.media.processor import PAN_AND_SCAN

SIZE, TOKENS = 28, 4
WORDS = list(dict.fromkeys("Here is the original image and here are some crops to help you see better".split()))


def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, " ": 4, "\n": 5,
             **{w: 6 + i for i, w in enumerate(WORDS)}, **{f"t{i}": i for i in range(30, 60)},
             "<start_of_image>": 60, "<end_of_image>": 61, "<image_soft_token>": 62}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                   "image_token": "<image_soft_token>"})


def _config(tok):
    return SimpleNamespace(vision_config=SimpleNamespace(image_size=SIZE), mm_tokens_per_image=TOKENS,
                           boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                           image_token_index=tok.image_token_id)


@pytest.fixture(scope="module")
def setup():
    tok = _tokenizer()
    hf = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}),
        tokenizer=tok, image_seq_length=TOKENS)
    return Gemma3Processor(TokenizerWrapper(tok), _config(tok)), hf, tok


def _image(w, h, mode="RGB", seed=0):
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(px, "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def _hf_num_crops(hf, images, kw):
    """transformers' image processor alone needs every option (its own defaults are None): take the processor's."""
    opts = {k: v for k, v in hf.images_kwargs.items() if k in PAN_AND_SCAN}
    return hf.image_processor(images=images, **dict(opts, **kw))["num_crops"]


def _same(ours, ref):
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].dtype.kind == "i", key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["pixel_values"].shape == ref["pixel_values"].shape and ours["pixel_values"].dtype == np.float32
    assert np.max(np.abs(ours["pixel_values"] - ref["pixel_values"])) <= 1e-6  # the issue allows 1/255


def test_defaults_are_transformers(setup):
    _, hf, _ = setup
    assert PAN_AND_SCAN == {k: v for k, v in hf.images_kwargs.items() if k in PAN_AND_SCAN}


CASES = {  # image, pan-and-scan keywords
    "wide_several_crops": (_image(300, 60), dict(pan_and_scan_min_crop_size=20)),
    "tall_several_crops": (_image(50, 400, seed=1), dict(pan_and_scan_min_crop_size=20)),
    "wide_default_min_crop_no_crops": (_image(300, 60), {}),
    "square": (_image(64, 64, seed=2), dict(pan_and_scan_min_crop_size=8)),
    "tiny_truncated_last_crop": (_image(7, 5, seed=3), dict(pan_and_scan_min_crop_size=2)),
    "tiny_default": (_image(7, 5, seed=3), {}),
    "below_threshold": (_image(110, 100, seed=4), dict(pan_and_scan_min_crop_size=10)),
    "lower_threshold": (_image(110, 100, seed=4), dict(pan_and_scan_min_crop_size=10,
                                                      pan_and_scan_min_ratio_to_activate=1.05)),
    "max_two_crops": (_image(300, 60), dict(pan_and_scan_min_crop_size=20, pan_and_scan_max_num_crops=2)),
    "half_ratio_rounds_up": (_image(250, 100, seed=10), dict(pan_and_scan_min_crop_size=10)),  # 2.5 -> 3 crops
    "uneven_width": (_image(301, 100, seed=5), dict(pan_and_scan_min_crop_size=10)),
    "empty_last_crop": (_image(9, 2, seed=6), dict(pan_and_scan_min_crop_size=2)),
    "crop_too_small": (_image(400, 50, seed=7), dict(pan_and_scan_min_crop_size=60)),
    "rgba_wide": (_image(200, 50, "RGBA", seed=8), dict(pan_and_scan_min_crop_size=16)),
    "greyscale_tall": (_image(40, 130, "L", seed=9), dict(pan_and_scan_min_crop_size=16)),
}


@pytest.mark.parametrize("pan_and_scan", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_one_image(setup, name, pan_and_scan):
    ours_p, hf, _ = setup
    image, kw = CASES[name]
    kw = dict(kw, do_pan_and_scan=pan_and_scan)
    text = "t30 <start_of_image> t31"
    ref = hf(text=text, images=[image], return_tensors="np", padding=True, **kw)
    ours = ours_p(text, [image], **kw)
    _same(ours, ref)
    if pan_and_scan:
        assert ours["num_crops"] == _hf_num_crops(hf, [image], kw)
        pixels, num_crops = ours_p.preprocess_with_crops([image], **kw)
        assert num_crops == ours["num_crops"] and np.array_equal(pixels, ours["pixel_values"])
    else:
        assert "num_crops" not in ours
        assert np.array_equal(ours_p.preprocess([image], **kw), ours["pixel_values"])


def test_cases_cover_crops_and_none(setup):
    """The table above really holds several-crop, truncated, empty-crop and no-crop cases per transformers."""
    _, hf, _ = setup
    counts = {n: _hf_num_crops(hf, [img], dict(kw, do_pan_and_scan=True))[0] for n, (img, kw) in CASES.items()}
    assert counts["wide_several_crops"] > 2 and counts["tall_several_crops"] > 2
    assert counts["below_threshold"] == 0 and counts["lower_threshold"] > 0 and counts["square"] == 0
    assert 0 < counts["max_two_crops"] < counts["wide_several_crops"]
    assert counts["half_ratio_rounds_up"] == 3  # transformers rounds half up, not to even


def test_batch_with_padding_and_pan_and_scan(setup):
    ours_p, hf, _ = setup
    texts = ["t30 <start_of_image> t31 <start_of_image> t32", "t40 t41", "<start_of_image>\nt42"]
    images = [[CASES["wide_several_crops"][0], CASES["square"][0]], [], [CASES["tall_several_crops"][0]]]
    kw = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=20, pan_and_scan_max_num_crops=3)
    ref = hf(text=texts, images=images, return_tensors="np", padding=True, **kw)
    ours = ours_p(texts, images, **kw)
    _same(ours, ref)
    assert ours["num_crops"] == _hf_num_crops(hf, [i for imgs in images for i in imgs], kw)
    assert ours["attention_mask"].min() == 0  # the prompts really were padded


def test_text_only(setup):
    ours_p, hf, _ = setup
    texts = ["t30 t31 t32", "t40"]
    ref = hf(text=texts, return_tensors="np", padding=True)
    ours = ours_p(texts)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], ref[key])
    assert "pixel_values" not in ours and "pixel_values" not in ref


def test_image_sequence_builds_prompts(setup):
    """preprocess_with_crops + image_sequence give what the processor's text expansion does."""
    ours_p, hf, tok = setup
    image, kw = CASES["wide_several_crops"]
    kw = dict(kw, do_pan_and_scan=True)
    _, (n,) = ours_p.preprocess_with_crops([image], **kw)
    ref = hf(text="t30 <start_of_image>", images=[image], return_tensors="np", **kw)
    np.testing.assert_array_equal(tok("t30 " + ours_p.image_sequence(n), return_tensors="np")["input_ids"],
                                  ref["input_ids"])


def test_options_from_config_files(setup, tmp_path):
    """preprocessor/processor_config.json values apply, a call's keywords override them. (transformers'
    Gemma3Processor lets its own class defaults win over the file's values, so it gets them per call here.)"""
    _, hf, tok = setup
    saved = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20, "pan_and_scan_max_num_crops": 3,
             "pan_and_scan_min_ratio_to_activate": 1.5}
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}, **saved)
    transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                 image_seq_length=TOKENS).save_pretrained(tmp_path)
    ours_p = Gemma3Processor.from_pretrained(tmp_path, TokenizerWrapper(tok), _config(tok))
    image = CASES["tall_several_crops"][0]
    text = "<start_of_image> t33"
    _same(ours_p(text, [image]), hf(text=text, images=[image], return_tensors="np", **saved))
    override = dict(pan_and_scan_max_num_crops=2)
    _same(ours_p(text, [image], **override), hf(text=text, images=[image], return_tensors="np",
                                                **dict(saved, **override)))
    off = hf(text=text, images=[image], return_tensors="np", **dict(saved, do_pan_and_scan=False))
    assert "num_crops" not in ours_p(text, [image], do_pan_and_scan=False)
    _same(ours_p(text, [image], do_pan_and_scan=False), off)


def test_placeholder_count_mismatch(setup):
    ours_p, hf, _ = setup
    image = CASES["square"][0]
    with pytest.raises(ValueError):
        hf(text="<start_of_image> <start_of_image>", images=[image], do_pan_and_scan=True)
    with pytest.raises(MlxGemmaError, match=r"\[2\] image placeholder.*\[1\] image"):
        ours_p("<start_of_image> <start_of_image>", [image], do_pan_and_scan=True)
    with pytest.raises(MlxGemmaError, match=r"\[0, 1\] image placeholder.*\[1, 0\] image"):
        ours_p(["t30", "<start_of_image>"], [[image], []])


def test_undecodable_image(setup, tmp_path):
    ours_p, _, _ = setup
    garbage = tmp_path / "notes.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(MlxGemmaError, match="not an image file"):
        ours_p("<start_of_image>", [garbage], do_pan_and_scan=True)


BAD = [("do_pan_and_scan", "yes"), ("do_pan_and_scan", 1), ("pan_and_scan_min_crop_size", 0),
       ("pan_and_scan_min_crop_size", -3), ("pan_and_scan_min_crop_size", 2.5), ("pan_and_scan_min_crop_size", True),
       ("pan_and_scan_max_num_crops", 0), ("pan_and_scan_max_num_crops", "4"),
       ("pan_and_scan_min_ratio_to_activate", 0), ("pan_and_scan_min_ratio_to_activate", float("nan")),
       ("pan_and_scan_min_ratio_to_activate", "1.2")]


@pytest.mark.parametrize("key,value", BAD)
def test_invalid_pan_and_scan_options(setup, key, value):
    ours_p, _, tok = setup
    image = CASES["square"][0]
    with pytest.raises(MlxGemmaError, match=f"^{key}=.* is not valid: it must be"):
        ours_p("<start_of_image>", [image], **{key: value})
    with pytest.raises(MlxGemmaError, match=f"^{key}=.* is not valid"):
        ours_p.preprocess([image], **{key: value})
    with pytest.raises(MlxGemmaError, match=f"^preprocessor_config.json: {key} is .* not valid: it must be"):
        Gemma3Processor(TokenizerWrapper(tok), _config(tok), {key: value})


def test_unknown_option(setup):
    ours_p, _, _ = setup
    with pytest.raises(TypeError, match="pan_and_scan_max_crops"):
        ours_p("t30", pan_and_scan_max_crops=3)


def test_t5gemma2_refuses_pan_and_scan(setup):
    ours_p, hf, tok = setup
    t5 = T5Gemma2Processor(TokenizerWrapper(tok), SimpleNamespace(encoder=_config(tok)))
    image = CASES["wide_several_crops"][0]
    with pytest.raises(MlxGemmaError, match="T5Gemma2Processor does not support pan-and-scan"):
        t5("<start_of_image>", [image], do_pan_and_scan=True)
    with pytest.raises(MlxGemmaError, match="does not support pan-and-scan"):
        t5.preprocess([image], do_pan_and_scan=True)
    with pytest.raises(MlxGemmaError, match="does not support pan-and-scan"):
        T5Gemma2Processor(TokenizerWrapper(tok), SimpleNamespace(encoder=_config(tok)), {"do_pan_and_scan": True})
    ref = hf(text="t30 <start_of_image>", images=[image], return_tensors="np")
    _same(t5("t30 <start_of_image>", [image]), ref)
    _same(t5("t30 <start_of_image>", [image], do_pan_and_scan=False), ref)

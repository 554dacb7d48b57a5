"""Several prompts decoded together at once, greedy, to their eos (captioning a folder of photos): each
prompt prefilled alone (its image blocks whole), then every row stepping in one batched forward on the
decode core, each leaving as it ends."""

from typing import List

import mlx.core as mx

from ..errors import MlxGemmaError
from ..media.features import FEATURES, media_tokens, prefill, slots
from .decoder import Decoder, Row, forward
from .sampling import SamplingOptions
from .stream import TextStream


def generate_batch(model, processor, texts: List[str], images: List[list], max_tokens: int = 32,
                   **options) -> List[str]:
    """Greedy completions of several image prompts (Gemma 3 with its tower, Gemma 4): every row's images go
    through the tower together; the outputs are as each prompt alone would give. options go to the processor
    (Gemma 4: max_soft_tokens)."""
    if len(texts) != len(images):
        raise MlxGemmaError(f"{len(texts)} prompts but {len(images)} image lists")
    prepared = [processor.prepare(t, list(im), **options) for t, im in zip(texts, images)]
    items = [item for _, row_items in prepared for item in row_items]
    features = FEATURES.encode_items(model, items) if items else None
    decoder, done, tokens = Decoder(model), 0, set(media_tokens(model))
    streams, outputs = [], [""] * len(prepared)
    for i, (inputs, _) in enumerate(prepared):
        ids = inputs["input_ids"][0].tolist()
        k = slots(ids, tokens)
        cache = model.make_cache()
        prefill(model, cache, ids[:-1], features[done:done + k] if k else None)
        done += k
        row = Row(SamplingOptions().sampler(), ids, max_tokens, tag=i, prompt=len(ids))
        stream = TextStream(processor.tokenizer, max_tokens=max_tokens)
        text, finish = stream.add(decoder.start(row, forward(model, mx.array([ids[-1:]]), cache)[0, -1]).token)
        outputs[i] += text
        if finish is None:
            decoder.add(row, cache)
            streams.append(stream)
    while len(decoder):
        done = []
        for b, (row, emitted) in enumerate(zip(decoder.rows, decoder.step())):
            text, finish = streams[b].add(emitted[0].token)
            outputs[row.tag] += text
            if finish is not None:
                done.append(b)
        keep = [b for b in range(len(decoder)) if b not in done]
        decoder.keep(keep)
        streams = [streams[b] for b in keep]
    return outputs

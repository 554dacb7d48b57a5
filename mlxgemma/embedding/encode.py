"""embed(): inputs into (N, dim) embeddings with a sentence-embedding model (models/embedding.py).

Texts are prefixed with the prompt (a name from the model's prompts, e.g. "query" -> "task: search result |
query: ", or a string) and tokenized as sentence-transformers tokenizes them: the tokenizer's own special
tokens (EmbeddingGemma adds <bos> and <eos>), truncated to the model's max_seq_length (longer inputs are cut,
as the reference cuts them). Inputs are sorted by length into batches of `batch_size`, right-padded (the
encoder is bidirectional and masks padding keys, so each row equals its input alone), and put back in order.

EmbeddingGemma 2 also embeds media: an input {"image": ..., "audio": ..., "video": ..., "text": ...} (each
optional, a path, an image or an array, or a list of them) is laid out by its processor as the prompt, one
placeholder per item (images, then videos, then audio, space-separated: transformers' layout when no text is
given), then " " and the text; such inputs run one at a time.
"""

from typing import List, Optional, Sequence, Union

import mlx.core as mx

from ..errors import MlxGemmaError
from ..models.embedding import truncated

Inputs = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


def check_embedder(model) -> None:
    if not getattr(model, "is_embedder", False):
        raise MlxGemmaError(f"{type(model).__name__} is not an embedding model (it has no pooling head): load an "
                            "EmbeddingGemma checkpoint (a sentence-transformers folder) or EmbeddingGemma 2")


def prompt_text(model, prompt_name: Optional[str] = None, prompt: Optional[str] = None) -> str:
    """The text put before each input: `prompt` as given, else the named prompt, else the model's default."""
    if prompt is not None:
        if prompt_name is not None:
            raise MlxGemmaError("give a prompt or a prompt_name, not both")
        return prompt
    name = prompt_name if prompt_name is not None else model.default_prompt_name
    if name is None:
        return ""
    if name not in model.prompts:
        offered = ", ".join(sorted(model.prompts)) or "none"
        raise MlxGemmaError(f"prompt_name {name!r} is not one of this model's prompts ({offered})")
    return model.prompts[name]


def token_lists(model, tokenizer, inputs: Inputs, prompt: str = "", truncate: bool = True) -> List[List[int]]:
    """Each input's token ids: texts tokenized after the prompt, id lists as given (the prompt is text: it is
    not added to ids); both cut to max_seq_length, or (truncate=False) refused past it."""
    items = as_items(inputs)
    limit = model.max_seq_length
    texts = [prompt + x for x in items if isinstance(x, str)]
    hf = hugging_face_tokenizer(tokenizer)
    options = dict(truncation=True, max_length=limit) if limit and truncate else {}
    encoded = iter(hf(texts, **options)["input_ids"] if texts else [])
    vocab = model.config.vocab_size
    out = []
    for x in items:
        if isinstance(x, str):
            out.append(list(next(encoded)))
            continue
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in x):
            raise MlxGemmaError(f"token ids must be integers in 0..{vocab - 1}")
        out.append(list(x)[:limit] if limit and truncate else list(x))
    long = [i for i, x in enumerate(out) if limit and len(x) > limit]
    if long:
        raise MlxGemmaError(f"input {long[0]} holds {len(out[long[0]])} tokens, more than this model takes ({limit}); "
                            "let it be cut (truncate) or shorten it")
    return out


MEDIA = ("image", "audio", "video")


def hugging_face_tokenizer(tokenizer):
    """The Hugging Face tokenizer of what mlxgemma.load gives: mlx-lm's TokenizerWrapper holds it, a processor
    holds that wrapper."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer) if hasattr(tokenizer, "prepare") else tokenizer
    return tokenizer._tokenizer if type(tokenizer).__name__ == "TokenizerWrapper" else tokenizer


def as_items(inputs: Inputs) -> list:
    """A list of inputs, each a string, a non-empty list of token ids, or a dict of media (and text)."""
    if isinstance(inputs, (str, dict)):
        return [inputs]
    items = list(inputs) if isinstance(inputs, (list, tuple)) else None
    if not items:
        raise MlxGemmaError("embed takes a string, a non-empty list of strings, or token ids")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one list of ids
    for x in items:
        if isinstance(x, dict):
            unknown = sorted(set(x) - {"text", *MEDIA})
            if unknown or not any(x.get(k) is not None for k in MEDIA):
                raise MlxGemmaError(f"a media input is a dict of {', '.join(MEDIA)} (at least one) and text"
                                    + (f"; got {', '.join(map(repr, unknown))}" if unknown else ""))
        elif not isinstance(x, (str, list, tuple)) or (not isinstance(x, str) and not x):
            raise MlxGemmaError("each input is a string, a non-empty list of token ids, or a dict of media")
    return [x if isinstance(x, (str, dict)) else list(x) for x in items]


def media_inputs(processor, item: dict, prompt: str) -> dict:
    """The processor's inputs for one media input (see the module's docstring)."""
    if not hasattr(processor, "prepare"):
        raise MlxGemmaError("this embedding model takes text only: images, audio and video need EmbeddingGemma 2")
    given = {k: item.get(k) for k in MEDIA}
    given = {k: [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v] for k, v in given.items()}
    marks = [processor.marks[k] for k in ("image", "video", "audio") for _ in given[k]]
    text = prompt + " ".join(marks) + (" " + item["text"] if item.get("text") else "")
    return processor(text, images=given["image"], audio=given["audio"], videos=given["video"])


def embed_ids(model, ids: List[List[int]], dim: Optional[int] = None, normalize: bool = True,
              batch_size: int = 32, progress=None) -> mx.array:
    """(N, dim) embeddings of token id lists, in order, batched by length."""
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise MlxGemmaError(f"batch_size must be a positive integer, got {batch_size!r}")
    truncated(mx.zeros((1, model.dimensions)), dim, model.dimensions, normalize)  # (checks dim before any work)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out, done = [None] * len(ids), 0
    for rows in batches(order, [len(x) for x in ids], batch_size):
        width = max(len(ids[i]) for i in rows)
        batch = mx.array([ids[i] + [pad] * (width - len(ids[i])) for i in rows], dtype=mx.int32)
        mask = mx.array([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows], dtype=mx.bool_)
        vectors = truncated(model(batch, attention_mask=mask), dim, model.dimensions, normalize)
        mx.eval(vectors)
        for b, i in enumerate(rows):
            out[i] = vectors[b]
        done += len(rows)
        if progress is not None:
            progress(done, len(order))
    return mx.stack(out).astype(mx.float32)


def batches(order: List[int], lengths: List[int], batch_size: int, waste: float = 0.25,
            slack: int = 64) -> List[List[int]]:
    """Runs of `order` (longest first) of at most batch_size inputs whose padding stays within `waste` of the
    real tokens (plus `slack` tokens): a forward costs its padded tokens (on MLX's CPU backend in proportion),
    so a short input does not join a batch of long ones only to be padded to their length."""
    out, rows = [], []
    for i in order:
        width = lengths[rows[0]] if rows else lengths[i]
        real = sum(lengths[j] for j in rows) + lengths[i]
        if rows and (len(rows) == batch_size or width * (len(rows) + 1) > (1 + waste) * real + slack):
            out.append(rows)
            rows = []
        rows.append(i)
    return out + ([rows] if rows else [])


def embed(model, tokenizer, inputs: Inputs, *, prompt_name: Optional[str] = None, prompt: Optional[str] = None,
          dim: Optional[int] = None, normalize: bool = True, batch_size: int = 32, progress=None) -> mx.array:
    """(N, dim) float32 embeddings of inputs (a string, strings, or token ids) with an embedding model and its
    tokenizer (mlxgemma.load's pair). prompt_name: one of the model's prompts ("query", "document", ...);
    prompt: a prefix of your own. dim: Matryoshka truncation (re-normalised with normalize). normalize=False
    keeps the model's own output (EmbeddingGemma's is unit length: its pipeline normalises)."""
    check_embedder(model)
    items, prompt = as_items(inputs), prompt_text(model, prompt_name, prompt)
    media = [i for i, x in enumerate(items) if isinstance(x, dict)]
    if not media:
        return embed_ids(model, token_lists(model, tokenizer, items, prompt), dim, normalize, batch_size, progress)
    truncated(mx.zeros((1, model.dimensions)), dim, model.dimensions, normalize)  # (checks dim before any work)
    out = [None] * len(items)
    rest = [i for i in range(len(items)) if i not in set(media)]
    if rest:
        vectors = embed_ids(model, token_lists(model, tokenizer, [items[i] for i in rest], prompt), dim, normalize,
                            batch_size)
        for b, i in enumerate(rest):
            out[i] = vectors[b]
    for n, i in enumerate(media):
        inputs = dict(media_inputs(tokenizer, items[i], prompt))
        ids, mask = mx.array(inputs.pop("input_ids")), inputs.pop("attention_mask", None)
        vector = model(ids, attention_mask=None if mask is None else mx.array(mask).astype(mx.bool_), **inputs)
        out[i] = truncated(vector, dim, model.dimensions, normalize)[0]
        if progress is not None:
            progress(len(rest) + n + 1, len(items))
    return mx.stack(out).astype(mx.float32)

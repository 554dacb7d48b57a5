"""The model's owner: one thread that admits requests, prefills them a chunk at a time, and steps every
live row in one batched forward, streaming each row's text out as it comes.

Each loop: take new requests; drop rows whose client left; prefill one chunk of the oldest waiting request
(a request joins the batch as soon as its prompt is in); one decode step of the whole batch. So a long
prompt or a long generation never holds up the others for more than a chunk, and a request that finishes
leaves the batch at once. HTTP handlers talk to it only through `submit` and the events they receive (from
this thread: they hand them to their event loop themselves).
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx

from ..decode.decoder import Decoder, Emitted, Row, fill, last_prompt_step
from ..decode.proposers import Assistant, DraftModel, PromptLookup
from ..decode.sampling import SamplingOptions
from ..decode.stream import TextStream
from ..media.features import FEATURES, block_end, media_from, media_tokens, slots
from ..media.features import prefill as media_prefill
from ..models import has_vision, is_drafter, is_encoder_decoder
from ..models.batch_cache import BatchEncoderDecoderCache, merge_caches
from ..models.quantized_cache import quantize_cache
from .embeddings import EmbedRequest, EmbeddingQueue
from .prompt_cache import PromptCache, snapshot

log = logging.getLogger("mlxgemma.server")


@dataclass
class Request:
    """What a handler asks for. `prompt`: the decoder's token ids (T5Gemma 2: `encoder` holds the encoder's
    input_ids and pixel_values, and `prompt` is the decoder's start token). Events go to `emit`:
    ("prompt", {prompt_tokens, cached_tokens}), ("token", Token), with speculative decoding ("drafted", index,
    proposed tokens, accepted tokens), ("done", index, finish_reason, completion tokens), ("error", message)
    and finally ("end", None)."""

    prompt: List[int]
    emit: Callable
    max_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    n: int = 1
    stop: List[str] = field(default_factory=list)
    top_logprobs: int = 0  # 0: only the chosen token's logprob
    encoder: Optional[dict] = None
    context: Optional[int] = None  # the model's context: a row stops ("length") when it is full
    media: Optional[list] = None  # the processed images, clips and videos of the prompt's blocks, in order
    key: Optional[List[int]] = None  # what the prompt cache matches (the prompt, images told apart)
    constraint: Optional[object] = None  # constrained.Constraint: structured output, tool calls
    cancelled: bool = False
    uid: Optional[int] = None  # under mlx.launch: its number, the same on every rank (ranks.py)
    # the scheduler's own
    started: float = 0.0
    live: int = 0
    snapshots: list = field(default_factory=list)
    features: Optional[mx.array] = None  # the encoded media still to prefill, one row per placeholder

    @property
    def cache_key(self) -> List[int]:
        return self.key if self.key is not None else self.prompt


@dataclass
class Token:
    index: int
    text: str
    id: int
    logprob: float
    top: List[tuple]  # (id, logprob), best first


@dataclass
class Slot:
    """A decoder row's place in a request: which of its n choices, and that choice's text stream."""

    request: Request
    index: int
    stream: TextStream


def materialize(model) -> None:
    """Evaluate every array the model holds (weights and constants such as RoPE frequencies) here: a lazy
    array made on this thread's MLX stream cannot be evaluated from the scheduler's thread."""
    mx.eval(model.parameters())
    for _, module in model.named_modules():
        mx.eval([v for v in [*vars(module).values(), *module.values()] if isinstance(v, mx.array)])


class Scheduler:
    def __init__(self, model, tokenizer, prompt_cache: Optional[PromptCache] = None, decode_concurrency: int = 32,
                 prefill_step_size: int = 2048, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 prompt_lookup_ngram: Optional[int] = None, num_draft_tokens: int = 3, draft_model=None, ranks=None,
                 embedder=None):
        """draft_model or prompt_lookup_ngram: every row decodes speculatively (decode/decoder.py), each with
        the output it would have alone without speculation. ranks (ranks.Ranks): under mlx.launch, every rank
        runs this loop; rank 0 tells the others what arrives (see ranks.py), and their loop runs on their main
        thread (follow). embedder: the embedding model whose requests (embeddings.py) run between steps."""
        self.model, self.tokenizer = model, tokenizer
        self.encoder_decoder = is_encoder_decoder(model)
        self.prompt_cache = prompt_cache if not self.encoder_decoder else None
        self.decode_concurrency, self.prefill_step_size = decode_concurrency, prefill_step_size
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size  # quantized from the start: rows batch alike
        self.draft_model, self.lookup, self.num_draft = draft_model, prompt_lookup_ngram, num_draft_tokens
        self.media_tokens = set(media_tokens(model)) if has_vision(model) else set()
        self.inbox: "queue.Queue[Request]" = queue.Queue()
        self.waiting: List[Request] = []
        self.prefilling = None  # (request, cache, ids still to feed)
        self.decoder = self._decoder()
        self.stats = {"requests": 0, "cancelled": 0, "peak_rows": 0, "proposed": 0, "accepted": 0}
        self.ranks = ranks
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mlxgemma-scheduler", daemon=True)
        self.embeddings = EmbeddingQueue(embedder) if embedder is not None else None
        for m in (model, draft_model, embedder):
            if m is not None:
                materialize(m)

    def _decoder(self) -> Decoder:
        proposer = (Assistant(self.draft_model, self.model) if is_drafter(self.draft_model) else
                    DraftModel(self.draft_model) if self.draft_model is not None else
                    PromptLookup(self.lookup) if self.lookup else None)
        return Decoder(self.model, proposer, self.num_draft)

    @property
    def rows(self) -> List[Row]:
        return self.decoder.rows

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def follow(self) -> None:
        """A rank other than 0: run the loop here, on the requests rank 0 sends, until rank 0 stops."""
        self._loop()

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self.prefilling or (self.embeddings and self.embeddings.busy))

    def _loop(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # MLX streams belong to one thread
        while True:
            try:
                gone = None
                if self.ranks is None or self.ranks.leader:
                    self._take(block=not self.busy)
                if self.ranks is not None:
                    try:
                        stop, gone = self.ranks.sync(self, self._stop.is_set())
                    except RuntimeError as e:  # a rank is gone: nothing can be computed any more
                        log.error("lost the other ranks (%s): the scheduler stops", e)
                        self._fail_all("the server lost one of its ranks")
                        break
                else:
                    stop = self._stop.is_set()
                if stop:
                    break
                self._drop_cancelled(gone)
                if self.prefilling or (self.waiting and len(self.rows) < self.decode_concurrency):
                    if self.decoder.inflight is not None:  # stream the queued step before the batch changes
                        self._step()
                    self._prefill_chunk()
                if self.rows:
                    self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.rows))
                    self._step()
                if self.embeddings is not None and self.embeddings.busy:
                    self.embeddings.step()
            except Exception as e:  # never let one failure stop the server: fail what was running
                log.exception("scheduler step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _take(self, block: bool) -> None:
        try:
            r = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if r is not None:
                    self.stats["requests"] += 1
                    r.started = time.perf_counter()
                    if isinstance(r, EmbedRequest):
                        self.embeddings.add(r)
                    else:
                        self.waiting.append(r)
                r = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def held(self) -> List[Request]:
        """The requests waiting, prefilling and decoding."""
        prefilling = [self.prefilling[0]] if self.prefilling else []
        return self.waiting + prefilling + [row.tag.request for row in self.rows]

    def _drop_cancelled(self, numbers=None) -> None:
        """Requests whose client left: out of the queue, the prefill and the batch. Under mlx.launch, those
        rank 0 named (numbers): a client may leave meanwhile, and every rank must drop the same ones."""
        left = (lambda r: r.cancelled) if numbers is None else (lambda r: r.uid in numbers)
        gone = {id(r): r for r in self.held() if left(r)}
        if not gone:
            return
        self.stats["cancelled"] += len(gone)
        self.waiting = [r for r in self.waiting if not left(r)]
        if self.prefilling and left(self.prefilling[0]):
            self.prefilling = None
        rows = [i for i, row in enumerate(self.rows) if left(row.tag.request)]
        if rows:
            self._count(rows)
            self.decoder.keep([i for i in range(len(self.rows)) if i not in rows])
        for r in gone.values():
            r.emit("end", None)

    # Prefill

    def _prefill_chunk(self) -> None:
        """One chunk of the current prefill (started from the queue if none is running); a failure ends
        that request alone."""
        if self.prefilling is None:
            self.prefilling = (self.waiting.pop(0), None, None)
        request = self.prefilling[0]
        try:
            self._prefill_more()
        except Exception as e:
            self.prefilling = None
            log.exception("prefill failed")
            request.emit("error", f"{type(e).__name__}: {e}")
            request.emit("end", None)

    def _prefill_more(self) -> None:
        request, cache, rest = self.prefilling
        if cache is None:
            request, cache, rest = self.prefilling = self._begin(request)
        end = block_end(rest, self.prefill_step_size, self.media_tokens)  # never inside an image or a clip
        if end < len(rest) - 1:  # one chunk now, the rest after the next decode step
            self._fill(request, cache, rest[:end])
            self.prefilling = (request, cache, rest[end:])
            return
        self.prefilling = None
        self._fill(request, cache, rest[:-1])
        if self.prompt_cache is not None and len(request.prompt) > 1:  # where a repeat of this prompt restarts
            request.snapshots.append(snapshot(cache, len(request.prompt) - 1))
        self._join(request, cache, *last_prompt_step(self.model, mx.array([rest[-1:]]), cache, self.decoder.proposer))

    def _fill(self, request: Request, cache, ids: List[int]) -> None:
        """One chunk into the request's cache (then quantized, as mlx-lm's loop does after each chunk)."""
        if request.features is None:
            fill(self.model, cache, ids, self.prefill_step_size)
        else:
            k = slots(ids, self.media_tokens)
            media_prefill(self.model, cache, ids, request.features[:k] if k else None, self.prefill_step_size)
            request.features = request.features[k:] if k < request.features.shape[0] else None
        quantize_cache(cache, 0, self.kv_group_size, self.kv_bits)

    def _begin(self, request: Request):
        """The request's cache (from the prompt cache where it can be) and the ids it still has to feed."""
        if self.encoder_decoder:
            enc = request.encoder
            encoded = self.model.encode(mx.array(enc["input_ids"]), pixel_values=enc.get("pixel_values"))
            cache, cached = self.model.make_cache(encoded), 0
        else:
            cached, cache = 0, None
            if self.prompt_cache is not None:
                cached, cache, request.snapshots = self.prompt_cache.fetch(request.cache_key)
            cache = cache if cache is not None else self.model.make_cache()
            if request.media:  # encoded here, on the thread that owns the model
                request.features = media_from(request.prompt, FEATURES.encode_items(self.model, request.media),
                                              cached, self.media_tokens)
        prompt_tokens = len(request.encoder["input_ids"][0]) if self.encoder_decoder else len(request.prompt)
        request.emit("prompt", {"prompt_tokens": prompt_tokens, "cached_tokens": cached})
        return request, cache, request.prompt[cached:]

    def _join(self, request: Request, cache, logits: mx.array, state=None) -> None:
        """Each of the request's n choices draws its first token and, unless already done, joins the batch
        (a copy of the cache each: merged into the batch's caches). state: the target's last hidden state, for
        Gemma 4's assistant."""
        request.live = request.n
        c = request.constraint
        constraints = [c] + [c.copy() for _ in range(request.n - 1)] if c is not None else [None] * request.n
        draft = self._draft_cache(request) if state is None else None
        for index in range(request.n):
            stream = TextStream(self.tokenizer, max_tokens=request.max_tokens, stop=request.stop,
                                context=request.context, position=len(request.prompt))
            row = Row(request.sampling.sampler(index), list(request.prompt), request.max_tokens, constraints[index],
                      tag=Slot(request, index, stream), prompt=len(request.prompt))
            if self._emit(row, self.decoder.start(row, logits)):
                self._finished(row, cache, len(request.prompt))
                continue
            merge = BatchEncoderDecoderCache.merge if self.encoder_decoder else merge_caches
            self.decoder.add(row, merge([cache]), state if state is not None else
                             None if draft is None else merge_caches([draft]))

    def _draft_cache(self, request: Request):
        """The draft model's cache for a request: its prompt but the last token (decode/proposers.py)."""
        if self.draft_model is None or is_drafter(self.draft_model):
            return None
        return self.decoder.proposer.prepare(request.prompt, step=self.prefill_step_size)

    # Decode

    def _step(self) -> None:
        """One step of every row, its tokens streamed. While no request waits to join, the next plain step
        is queued first, so that the model computes it while this thread detokenizes and streams (as
        mlx-lm's generation loop does); a row that finishes meanwhile is dropped from that step's output."""
        ahead = not (self.waiting or self.prefilling)
        results = self.decoder.step(ahead=ahead)
        done = [b for b, (row, emitted) in enumerate(zip(self.rows, results)) if self._emit_all(row, emitted)]
        if done:
            self._count(done)  # before the requests end: a client that reads the stats then sees its row's
            for b in done:
                row = self.rows[b]
                cache = self.decoder.extract(b) if self.prompt_cache is not None else None
                self._finished(row, cache, self.decoder.held(b))
            self.decoder.keep([b for b in range(len(self.rows)) if b not in done])

    def _emit_all(self, row: Row, emitted: List[Emitted]) -> bool:
        return any(self._emit(row, e) for e in emitted)  # (stops at the first token that ends the row)

    def _emit(self, row: Row, e: Emitted) -> bool:
        """Stream one new token of a row; True when the row is done (its 'done' is sent)."""
        slot = row.tag
        request = slot.request
        text, finish = slot.stream.add(e.token)
        top = self._top(e.logprobs, request.top_logprobs) if request.top_logprobs else []
        request.emit("token", Token(slot.index, text, e.token, e.logprob, top))
        if finish:
            if row.proposed:
                request.emit("drafted", (slot.index, row.proposed, row.accepted))
            request.emit("done", (slot.index, finish, len(slot.stream.tokens)))
        return finish is not None

    @staticmethod
    def _top(logprobs: mx.array, k: int) -> List[tuple]:
        """The k most likely (id, logprob), best first (a partition, not a sort of the whole vocabulary)."""
        ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
        pairs = zip(ids.tolist(), logprobs[ids].tolist())
        return sorted(pairs, key=lambda p: -p[1])

    def _count(self, rows: List[int]) -> None:
        for b in rows:
            self.stats["proposed"] += self.rows[b].proposed
            self.stats["accepted"] += self.rows[b].accepted

    def _finished(self, row: Row, cache, held: int) -> None:
        """A row is done; its cache (holding its first `held` tokens) goes to the prompt cache."""
        request = row.tag.request
        if self.prompt_cache is not None and cache is not None:
            self.prompt_cache.insert(request.cache_key + row.seq[row.prompt:held], cache, request.snapshots)
        request.live -= 1
        if request.live == 0:
            request.emit("end", None)

    def _fail_all(self, message: str) -> None:
        requests = {id(r.tag.request): r.tag.request for r in self.rows}
        if self.prefilling:
            requests[id(self.prefilling[0])] = self.prefilling[0]
        for r in requests.values():
            r.emit("error", message)
            r.emit("end", None)
        self.prefilling = None
        self.decoder = self._decoder()

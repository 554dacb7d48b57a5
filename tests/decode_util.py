"""Greedy rows on the decode core's batch path (per-row caches merged, as the server runs them), for the
tests that compare a row's logits in a batch with its logits alone."""

import mlx.core as mx

from mlxgemma.decode.decoder import Decoder, Row, prefill_logits
from mlxgemma.decode.sampling import SamplingOptions
from mlxgemma.models import is_encoder_decoder
from mlxgemma.models.batch_cache import BatchEncoderDecoderCache, merge_caches


class GreedyBatch:
    """add(cache, prompt) prefills a row and joins it (returns its first token's log-probabilities); step()
    gives every row's next log-probabilities (B, vocab) and feeds the argmax; keep(rows) drops the others."""

    def __init__(self, model):
        self.model, self.decoder = model, Decoder(model)

    def add(self, cache, prompt, step: int = 2048) -> mx.array:
        row = Row(SamplingOptions().sampler(), list(prompt), 10**9, prompt=len(prompt))
        emitted = self.decoder.start(row, prefill_logits(self.model, cache, list(prompt), step))
        merge = BatchEncoderDecoderCache.merge if is_encoder_decoder(self.model) else merge_caches
        self.decoder.add(row, merge([cache]))
        return emitted.logprobs

    def step(self) -> mx.array:
        return mx.stack([e[0].logprobs for e in self.decoder.step()])

    def keep(self, rows) -> None:
        self.decoder.keep(list(rows))

    @property
    def last(self):
        """Each row's last token."""
        return [row.seq[-1] for row in self.decoder.rows]

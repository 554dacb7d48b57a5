"""The server across the ranks of mlx.launch: rank 0 listens for HTTP and runs the scheduler; every other
rank runs the same scheduler with no clients of its own, so that each prefill chunk and decode step of the
batch runs on every rank, as a sharded model needs.

Before each iteration of its loop, rank 0's scheduler sends the others what changed (Ranks.sync): the
requests that arrived (prompt, options, images, grammar; a seed drawn for any that did not bring one, so
that every rank samples alike), the ones whose clients left, and whether to stop. Everything else follows
from the same inputs on every rank: who joins, each chunk, each step, each token, each prompt-cache entry.
Idle, rank 0 sends an empty update every half second (the scheduler's own wait for requests).
"""

import base64
import dataclasses
import json
import random
from typing import Optional, Set, Tuple

import numpy as np

from ..cli import share
from ..decode.constrained import Constraint
from ..decode.sampling import SamplingOptions


class Ranks:
    def __init__(self, group):
        self.group, self.leader = group, group.rank() == 0
        self.numbered = 0  # requests numbered so far (rank 0)

    def sync(self, scheduler, stop: bool) -> Tuple[bool, Set[int]]:
        """(stop, the numbers of the requests to drop), the same on every rank; on the other ranks the
        requests that arrived at rank 0 join the scheduler's queue."""
        message = self._news(scheduler, stop) if self.leader else None
        message = json.loads(share(self.group, json.dumps(message).encode() if self.leader else None))
        if not self.leader:
            scheduler.waiting += [self._request(spec, scheduler) for spec in message["new"]]
        return message["stop"], set(message["gone"])

    def _news(self, scheduler, stop: bool) -> dict:
        new = [r for r in scheduler.waiting if r.uid is None]
        for r in new:
            r.uid, self.numbered = self.numbered, self.numbered + 1
            if r.sampling.seed is None:  # one draw, shared: each rank's own would differ
                r.sampling = dataclasses.replace(r.sampling, seed=random.getrandbits(62))
        gone = [r.uid for r in scheduler.held() if r.cancelled]
        return {"new": [_spec(r) for r in new], "gone": gone, "stop": stop}

    @staticmethod
    def _request(spec: dict, scheduler):
        from .scheduler import Request

        grammar = spec.pop("grammar")
        constraint = Constraint(scheduler.tokenizer, *grammar) if grammar else None
        encoder = spec.pop("encoder")
        encoder = {k: _array(v) for k, v in encoder.items()} if encoder is not None else None
        media = [{k: _array(v) for k, v in item.items()} for item in spec.pop("media") or ()] or None
        spec["sampling"] = SamplingOptions(**spec["sampling"])
        return Request(**spec, emit=_nowhere, encoder=encoder, media=media, constraint=constraint)


def _spec(r) -> dict:
    c = r.constraint
    return dict(uid=r.uid, prompt=list(r.prompt), max_tokens=r.max_tokens, sampling=dataclasses.asdict(r.sampling), n=r.n,
                stop=list(r.stop), top_logprobs=r.top_logprobs, context=r.context, key=r.key,
                encoder={k: _bytes(v) for k, v in r.encoder.items()} if r.encoder is not None else None,
                media=[{k: _bytes(v) for k, v in item.items()} for item in r.media or ()], grammar=[c.grammar, c.vocab_size] if c is not None else None)


def _bytes(x) -> Optional[dict]:
    if x is None:
        return None
    a = np.ascontiguousarray(np.asarray(x))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _array(d: Optional[dict]):
    if d is None:
        return None
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _nowhere(kind, data) -> None:
    """The other ranks' requests have no client: their events go nowhere."""

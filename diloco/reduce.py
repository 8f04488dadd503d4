"""Stream the round's shards into one fp32 accumulator, in a fixed order.

Deltas are added in the order they are given: the aggregator gives them in the order of their
entries in the deltas stream, which is durable, so a round redone after a crash sums the same
numbers in the same order and yields bit-identical weights (runs committed before that order
list their entries sorted by worker id, and replay them so). A bad shard rejects that worker only.
A lossy codec's delta is decoded and checked complete before it touches the accumulator: it is its
shards' pieces (diloco/shards.py `DeltaBuffer`); a sparse codec's (topk) delta is the positions and
values it sent, scatter-added, so its cost per worker is O(sent), not O(model). Memory is O(model):
the accumulator, one delta's shard bytes and decoded pieces, and the next worker's shards
downloading concurrently while the current one is checked (an fp32 delta streams: below).

`Reducer` takes one delta at a time, so the aggregator reduces each as soon as it is announced,
while the other workers still train (the pipelined reduce): once the round closes only the last
deltas remain on the critical path.

An fp32 delta streams instead (`STREAMED`): each shard is read a chunk at a time
(`ObjectStore.get_chunks`) and added to the accumulator a block at a time as it is checked, so the
aggregator never holds a delta's bytes (96 MiB for the sync benchmark's model: a sixth of its peak
memory). The accumulator then takes in part of a delta before the delta is known good; a delta found
bad after that (a corrupt block, a digest that does not match once the last chunk is read, a gap
between shards, a wrong norm) makes the reducer sum the deltas it kept again from zero, in the same
order, so the result has the bits it would have had without the bad one (each element gets the same
adds in the same order). That costs a re-read of the round's earlier deltas, only on bad input.

A weighted mean (diloco/weighting.py) adds `weight * scale * delta` in the same order and divides by
the sum of the weights, summed left to right in float64; with every weight and scale 1 the sum and
the division are exactly the unweighted ones (runs committed before weights keep their bits).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from diloco.codecs import Codec
from diloco.errors import BadInput, BadShard
from diloco.faults import crash_point
from diloco.messages import Announcement
from diloco.shards import DeltaBuffer, max_shard_object_bytes, unflatten
from diloco.store import ObjectStore

log = logging.getLogger(__name__)

STREAMED = ("fp32",)   # codecs whose deltas stream into the accumulator (a block is its own bytes)


@dataclass
class Reduced:
    mean: dict[str, torch.Tensor]
    included: list[Announcement]
    rejected: list[tuple[str, Announcement, str]]   # (entry id, announcement, reason)
    nbytes: int
    factors: list[tuple[float, float]]   # each included delta's (weight, scale), in the order summed


class Reducer:
    """Deltas added one by one (each fetched, decoded, verified, then summed), and their mean."""

    def __init__(self, store: ObjectStore, codec: Codec, like: dict[str, torch.Tensor], shard_bytes: int,
                 pool: ThreadPoolExecutor) -> None:
        self.store, self.codec, self.like, self.pool = store, codec, like, pool
        self.limit = max_shard_object_bytes(shard_bytes)
        self.acc = torch.zeros(sum(t.numel() for t in like.values()), dtype=torch.float32)  # as DeltaBuffer.buffer
        self.included: list[Announcement] = []
        self.entries: list[str] = []     # the included deltas' stream ids, in the order they were summed
        self.rejected: list[tuple[str, Announcement, str]] = []
        self.factors: list[tuple[float, float]] = []
        self.nbytes = 0
        self.closed = False   # result() divided the sum in place

    @property
    def streamed(self) -> bool:
        return self.codec.name in STREAMED

    def fetch(self, ann: Announcement) -> list[Future]:
        """Start downloading the delta's shards (none for a streamed codec: `add` reads them)."""
        if self.streamed:
            return []
        pairs = zip(ann.shards, ann.digest, strict=True)
        return [self.pool.submit(self.store.get, k, digest=h, max_bytes=self.limit) for k, h in pairs]

    def add(self, entry_id: str, ann: Announcement, futures: list[Future] | None = None,
            factors: tuple[float, float] = (1.0, 1.0)) -> str | None:
        """Sum `weight * scale *` this delta in, `factors` = (weight, scale); the reason it cannot
        count (and it was not summed), or None."""
        if self.closed:
            raise RuntimeError("this Reducer's mean was taken: a delta added now would be summed into a mean")
        futures = self.fetch(ann) if futures is None else futures
        crash_point("during_download")
        weight, scale = factors
        touched = False

        def touch() -> None:
            nonlocal touched
            touched = True

        try:
            buf = self._stream(ann, weight * scale, touch) if self.streamed else self._decode(futures)
            _check_norm(buf, ann)
        except BadInput as e:
            for f in futures:
                f.cancel()
            reason = f"{type(e).__name__}: {e}"
            self.rejected.append((entry_id, ann, reason))
            if touched:
                self._sum_again()
            return reason
        if not self.streamed:
            buf.add_to(self.acc, weight * scale)
        self.factors.append((weight, scale))
        self.included.append(ann)
        self.entries.append(entry_id)
        self.nbytes += ann.nbytes
        return None

    def _decode(self, futures: list[Future]) -> DeltaBuffer:
        buf = DeltaBuffer(self.like)
        while futures:
            buf.add_shard(futures.pop(0).result(), self.codec)
        buf.check_complete()
        return buf

    def _stream(self, ann: Announcement, alpha: float, touch) -> DeltaBuffer:
        """Read the delta's shards a chunk at a time, adding each checked block to the accumulator."""
        buf = DeltaBuffer(self.like)
        for key, digest in zip(ann.shards, ann.digest, strict=True):
            chunks = self.store.get_chunks(key, digest=digest, max_bytes=self.limit)
            try:
                buf.stream_shard(chunks, self.codec, self.limit, self.acc, alpha, touch)
            except BadShard:
                for _ in chunks:   # bytes other than the announced ones: say so, not what they fail to parse as
                    pass
                raise
            finally:
                chunks.close()
        buf.check_complete()
        return buf

    def _sum_again(self) -> None:
        """The accumulator from zero with the deltas kept, in their order (a bad one was partly added).
        A kept delta that fails now (changed in the store since) is rejected in turn."""
        while True:
            self.acc.zero_()
            kept = list(zip(self.entries, self.included, self.factors, strict=True))
            for i, (entry_id, ann, (weight, scale)) in enumerate(kept):
                try:
                    _check_norm(self._stream(ann, weight * scale, lambda: None), ann)
                except BadInput as e:
                    log.warning("delta of %s, summed before in this round, now fails: %s", ann.worker, e)
                    self.rejected.append((entry_id, ann, f"{type(e).__name__}: {e}"))
                    del self.entries[i], self.included[i], self.factors[i]
                    self.nbytes -= ann.nbytes
                    break
            else:
                return

    def result(self) -> Reduced:
        """The mean, computed in place in the accumulator (no model-sized copy): call it once, last."""
        if self.closed:
            raise RuntimeError("this Reducer's mean was taken already")
        self.closed = True
        if self.included:
            if all(w == 1.0 for w, _ in self.factors):
                self.acc.div_(len(self.included))
            else:
                total = 0.0
                for w, _ in self.factors:  # left to right: the replay sums them in the same order
                    total += w
                self.acc.div_(total)
        return Reduced(unflatten(self.acc, self.like), list(self.included), list(self.rejected), self.nbytes,
                       list(self.factors))


def _check_norm(buf: DeltaBuffer, ann: Announcement) -> None:
    norm = buf.norm()
    if abs(norm - ann.norm) > 1e-4 * max(1.0, norm):
        raise BadShard(f"the delta's norm is {norm:.6g}, the announcement claims {ann.norm:.6g}")


def reduce_round(store: ObjectStore, codec: Codec, like: dict[str, torch.Tensor],
                 anns: list[tuple[str, Announcement]], shard_bytes: int, pool: ThreadPoolExecutor,
                 factors: list[tuple[float, float]] | None = None) -> Reduced:
    """Mean of the valid deltas among `anns` (entry id, announcement), summed in the order given,
    over the tensors in `like`, weighted by `factors` (weight, scale) if given; the next delta's
    shards download while one is decoded."""
    red = Reducer(store, codec, like, shard_bytes, pool)
    pending = red.fetch(anns[0][1]) if anns else []
    for i, (entry_id, ann) in enumerate(anns):
        futures, pending = pending, (red.fetch(anns[i + 1][1]) if i + 1 < len(anns) else [])
        red.add(entry_id, ann, futures, factors[i] if factors is not None else (1.0, 1.0))
    return red.result()

"""Stream the round's shards into one fp32 accumulator, in a fixed order.

Announcements are reduced sorted by worker id, so a round redone after a crash sums the same
numbers in the same order and yields bit-identical weights. Each worker's delta is decoded into a
staging buffer and checked complete before it touches the accumulator: a bad shard rejects that
worker only; a sparse codec's (topk) delta is staged as the positions and values it sent and
scatter-added, so its cost per worker is O(sent), not O(model). Memory is O(model): the accumulator,
one staging buffer, and the next worker's shards downloading concurrently while the current one is
decoded.
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


@dataclass
class Reduced:
    mean: dict[str, torch.Tensor]
    included: list[Announcement]
    rejected: list[tuple[str, Announcement, str]]   # (entry id, announcement, reason)
    nbytes: int


def reduce_round(store: ObjectStore, codec: Codec, like: dict[str, torch.Tensor],
                 anns: list[tuple[str, Announcement]], shard_bytes: int, pool: ThreadPoolExecutor) -> Reduced:
    """Mean of the valid deltas among `anns` (entry id, announcement), over the tensors in `like`."""
    order = sorted(anns, key=lambda item: item[1].worker)
    acc = torch.zeros(sum(t.numel() for t in like.values()), dtype=torch.float32)  # laid out as DeltaBuffer.buffer
    limit = max_shard_object_bytes(shard_bytes)

    def fetch(ann: Announcement) -> list[Future]:
        pairs = zip(ann.shards, ann.sha256, strict=True)
        return [pool.submit(store.get, k, sha256=h, max_bytes=limit) for k, h in pairs]

    included, rejected, nbytes = [], [], 0
    pending = fetch(order[0][1]) if order else []
    for i, (entry_id, ann) in enumerate(order):
        futures, pending = pending, (fetch(order[i + 1][1]) if i + 1 < len(order) else [])
        crash_point("during_download")
        buf = DeltaBuffer(like)
        try:
            for f in futures:
                buf.add_shard(f.result(), codec)
            buf.check_complete()
            norm = buf.norm()
            if abs(norm - ann.norm) > 1e-4 * max(1.0, norm):
                raise BadShard(f"the delta's norm is {norm:.6g}, the announcement claims {ann.norm:.6g}")
        except BadInput as e:
            for f in futures:
                f.cancel()
            rejected.append((entry_id, ann, f"{type(e).__name__}: {e}"))
            continue
        buf.add_to(acc)
        included.append(ann)
        nbytes += ann.nbytes
    if included:
        acc /= len(included)
    return Reduced(unflatten(acc, like), included, rejected, nbytes)

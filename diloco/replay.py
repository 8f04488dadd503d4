"""Replay a run: recompute every committed version from the deltas it included, bit for bit.

The aggregator's result depends only on the base weights and momentum, the included deltas (in the
order the version's `entries` lists them) and the outer settings recorded with the version. So a
fault-free replay of the committed deltas must reproduce each committed weights object byte for
byte, whatever crashed, restarted or was rejected along the way. The chaos run and the fault
tests check exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
import torch

from diloco import keys, model, runs, update, weighting
from diloco.codecs import get_codec
from diloco.messages import Announcement, recorded_digest
from diloco.outer import outer_step
from diloco.reduce import reduce_round
from diloco.store import ObjectStore, digest_of


@dataclass
class ReplayResult:
    versions: int
    mismatched: list[int]      # versions whose recomputed weights differ from the committed ones


@dataclass
class Recomputed:
    """One committed version as the replay recomputes it."""
    entry: dict[str, str]              # its entry in the versions stream
    weights: dict[str, torch.Tensor]   # recomputed from the replay's own previous version
    momentum: dict[str, torch.Tensor]
    matches: bool                      # every delta verified and the weights' bytes hash as committed


def recompute(r: redis.Redis, store: ObjectStore, run: str,
              archive: dict[str, dict[str, str]] | None = None) -> Iterator[Recomputed]:
    """Each committed version of lane `run` (the run, or one of its fragments) in order, recomputed from
    version 0 and the deltas each one included.

    `archive` holds announcements (stream id -> fields) that a wipe took from the deltas stream."""
    cfg = runs.load_config(r, run)
    codec = get_codec(cfg.codec, cfg.codec_options)
    weights = model.from_bytes(store.get(keys.weights_object(run, 0, 0)), "weights v0")
    momentum = model.from_bytes(store.get(keys.momentum_object(run, 0, 0)), "momentum v0")
    residual: dict[str, torch.Tensor] = {}   # the download's error feedback (diloco/update.py)
    download = update.download_codec(cfg)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _, entry in r.xrange(keys.versions(run)):
            anns = []
            for entry_id in filter(None, entry.get("entries", "").split(",")):
                anns.append((entry_id, Announcement.from_fields(announcement(r, run, entry_id, archive))))
            floats = {n: t for n, t in weights.items() if t.is_floating_point()}
            factors, factors_ok = _factors(entry, [a for _, a in anns])
            red = reduce_round(store, codec, floats, anns, cfg.shard_bytes, pool, factors)
            stepped, momentum = outer_step(weights, momentum, red.mean, lr=float(entry["outer_lr"]),
                                           mu=float(entry["outer_momentum"]), nesterov=cfg.nesterov,
                                           dn_buffer=cfg.dn_buffer, arrivals=len(red.included))
            if download is None:
                weights = stepped
            else:  # what the aggregator published: the base plus the decoded update
                shards, residual = update.encode(weights, stepped, residual, download, cfg.shard_bytes)
                weights = update.apply(weights, update.decode(shards, weights, download))
            data = model.to_parts(weights, run=cfg.run, version=entry["version"])
            want = recorded_digest(entry, "weights")
            matches = factors_ok and not red.rejected and digest_of(data, like=want) == want
            yield Recomputed(entry, weights, momentum, matches)


def replay(r: redis.Redis, store: ObjectStore, run: str,
           archive: dict[str, dict[str, str]] | None = None) -> ReplayResult:
    count, mismatched = 0, []
    for version in recompute(r, store, run, archive):  # one version's tensors at a time: memory O(model)
        count += 1
        if not version.matches:
            mismatched.append(int(version.entry["version"]))
    return ReplayResult(count, mismatched)


def _factors(entry: dict[str, str], anns: list[Announcement]) -> tuple[list[tuple[float, float]] | None, bool]:
    """Each delta's (weight, scale), recomputed from the announcements and the rule the version records
    (None: a plain uniform version), and whether they are the weights and scales it records."""
    if "aggregation" not in entry:
        return None, True
    base = int(entry["version"]) - 1
    pairs = [weighting.factors(entry["aggregation"], entry["staleness_weight"], base, a) for a in anns]
    ok = (entry["delta_weights"] == ",".join(repr(w) for w, _ in pairs)
          and entry["delta_scales"] == ",".join(repr(s) for _, s in pairs))
    return pairs, ok


def announcement(r: redis.Redis, run: str, entry_id: str, archive: dict[str, dict[str, str]] | None = None
                 ) -> dict[str, str]:
    """The fields of deltas-stream entry `entry_id`, from Redis or else from `archive` (KeyError if neither)."""
    found = r.xrange(keys.deltas(run), entry_id, entry_id)
    if found:
        return found[0][1]
    return (archive or {})[entry_id]

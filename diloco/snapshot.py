"""Snapshots of a run's Redis state in the object store, and `diloco recover` from them.

After each commit the aggregator writes `runs/{run}/state/v{n}.msgpack`: the config, the head,
the dataset registrations, the units meta and every open epoch's `done` bitmap, the fencing-token
counter and the latest version entries. A wiped Redis is rebuilt from the newest snapshot whose
weights are intact; units that were leased but not committed are simply free again, so no
committed unit is lost or repeated. A commit whose snapshot was never written is lost with the
wipe, consistently: its weights are not restored and its units are trained again.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgpack
import redis

from diloco import keys
from diloco.errors import BadInput, ConfigError, ObjectMissing, RunNotFound
from diloco.store import ObjectStore

log = logging.getLogger(__name__)

FORMAT = "diloco-state/1"
MAX_VERSION_ENTRIES = 1000
_TOKEN = re.compile(r"-t(\d+)\.safetensors$")


def _text(d: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in d.items()}


def take(raw: redis.Redis, run: str) -> dict[str, Any]:
    """The run's state now, read in one transaction; `raw` is a client without response decoding.

    A first read learns the datasets and their open epochs; the transaction then reads everything,
    so a wipe (or a commit) in between can never yield a snapshot that mixes two states. If the
    open epochs moved past what the first read covered, it reads again.
    """
    for _ in range(5):
        ranges = _epoch_ranges(raw, run)
        pipe = raw.pipeline(transaction=True)
        pipe.hgetall(keys.config(run))
        pipe.hgetall(keys.head(run))
        pipe.hgetall(keys.datasets(run))
        pipe.get(keys.lock_token(run))
        pipe.xrevrange(keys.versions(run), count=MAX_VERSION_ENTRIES)
        for ds, epochs in ranges.items():
            pipe.hgetall(keys.units_meta(run, ds))
            for e in epochs:
                pipe.get(keys.units_done(run, ds, e))
        config, head, datasets, token, recent, *rest = pipe.execute()
        config, head, datasets = _text(config), _text(head), _text(datasets)
        if not config or not head:
            raise RunNotFound(f"run {run!r} is gone from Redis; no snapshot taken")
        if set(datasets) != set(ranges):  # registered or wiped between the two reads: read again
            continue
        units, answers, covered = {}, iter(rest), True
        for ds, epochs in ranges.items():
            meta = _text(next(answers))
            done = {e: next(answers) or b"" for e in epochs}
            if not meta:
                raise RunNotFound(f"run {run!r} has no work units for dataset {ds} in Redis; no snapshot taken")
            covered &= set(range(int(meta["epoch_lo"]), int(meta["epoch_hi"]) + 1)) <= set(epochs)
            units[ds] = {"meta": meta, "done": {e: b for e, b in done.items() if e >= int(meta["epoch_lo"])}}
        if covered:
            versions = [[i.decode(), _text(f)] for i, f in reversed(recent)]
            return {"format": FORMAT, "run": run, "version": int(head["version"]), "config": config, "head": head,
                    "datasets": datasets, "units": units, "lock_token": int(token or 0), "versions": versions}
    raise RunNotFound(f"run {run!r}: its open epochs kept moving while the snapshot was read; no snapshot taken")


def _epoch_ranges(raw: redis.Redis, run: str) -> dict[str, list[int]]:
    """Each registered dataset's open epochs, with one epoch of slack for a claim that opens the next."""
    ranges = {}
    for ds in _text(raw.hgetall(keys.datasets(run))):
        meta = _text(raw.hgetall(keys.units_meta(run, ds)))
        lo, hi = (int(meta["epoch_lo"]), int(meta["epoch_hi"])) if meta else (0, 0)
        ranges[ds] = list(range(lo, hi + 2))
    return ranges


def write(store: ObjectStore, raw: redis.Redis, run: str) -> str:
    snap = take(raw, run)
    key = keys.snapshot_object(run, snap["version"])
    store.put(key, msgpack.packb(snap, use_bin_type=True))
    return key


def load(store: ObjectStore, key: str) -> dict[str, Any]:
    try:
        snap = msgpack.unpackb(store.get(key, max_bytes=1 << 30), raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise BadInput(f"snapshot {key} is not valid msgpack: {e}") from None
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise BadInput(f"snapshot {key} is not a {FORMAT} snapshot")
    return snap


def newest_usable(store: ObjectStore, run: str) -> dict[str, Any]:
    """The newest snapshot whose weights and momentum exist with the recorded checksums."""
    for key in reversed(store.list(keys.snapshot_prefix(run))):
        try:
            snap = load(store, key)
            head = snap["head"]
            store.get(head["weights"], sha256=head["weights_sha256"])
            store.get(head["momentum"], sha256=head["momentum_sha256"])
            return snap
        except (BadInput, ObjectMissing, KeyError) as e:
            log.warning("skipping snapshot %s: %s", key, e)
    raise RunNotFound(f"no usable snapshot of run {run!r} under {store.url}/{keys.snapshot_prefix(run)}")


def _max_token(store: ObjectStore, run: str) -> int:
    """Highest fencing token used in any weights object, orphans included: new keys must not collide."""
    tokens = [int(m.group(1)) for k in store.list(keys.weights_prefix(run)) if (m := _TOKEN.search(k))]
    return max(tokens, default=0)


def recover(r: redis.Redis, store: ObjectStore, run: str, *, force: bool = False) -> int:
    """Rebuild run `run` in Redis from its newest usable snapshot; returns the restored version."""
    if r.exists(keys.config(run)) and not force:
        raise ConfigError(
            f"run {run!r} exists in this Redis; recover rebuilds a wiped Redis. Pass --force to replace "
            "the run's keys with the snapshot"
        )
    if store.list(keys.snapshot_prefix(keys.lane(run, 0))):
        raise ConfigError(f"run {run!r} syncs in fragments (its snapshots are under "
                          f"{store.url}/{keys.run_prefix(keys.lane(run, 0))}...): recover restores runs without "
                          "fragments only, so a streaming run lost with Redis cannot be resumed yet; its fragments' "
                          "weights objects stay in the store")
    snap = newest_usable(store, run)
    run_keys = list(r.scan_iter(match=f"diloco:{{{run}}}:*", count=1000))
    pipe = r.pipeline(transaction=True)
    if run_keys:
        pipe.delete(*run_keys)
    pipe.hset(keys.config(run), mapping=snap["config"])
    pipe.hset(keys.head(run), mapping={**snap["head"], "deltas_since": "0-0"})
    if snap["datasets"]:
        pipe.hset(keys.datasets(run), mapping=snap["datasets"])
    for ds, u in snap["units"].items():
        pipe.hset(keys.units_meta(run, ds), mapping=u["meta"])
        for epoch, bitmap in u["done"].items():
            if bitmap:
                # Leases died with Redis: only done units stay claimed, the rest are issued again.
                pipe.set(keys.units_done(run, ds, int(epoch)), bitmap)
                pipe.set(keys.units_claimed(run, ds, int(epoch)), bitmap)
    for entry_id, fields in snap["versions"]:
        pipe.xadd(keys.versions(run), fields, id=entry_id)
    pipe.set(keys.lock_token(run), max(snap["lock_token"], _max_token(store, run)))
    pipe.execute()
    log.info("recovered run %s at version %d", run, snap["version"])
    return int(snap["version"])

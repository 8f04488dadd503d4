"""Snapshots of a run's Redis state in the object store, and `diloco recover` from them.

After each commit the aggregator writes `runs/{run}/state/v{n}.msgpack`: the config, the head,
the dataset registrations, the units meta and every open epoch's `done` bitmap, the fencing-token
counter and the latest version entries. A wiped Redis is rebuilt from the newest snapshot whose
weights are intact; units that were leased but not committed are simply free again, so no
committed unit is lost or repeated. A commit whose snapshot was never written is lost with the
wipe, consistently: its weights are not restored and its units are trained again.

With streaming fragments a fragment's commit writes `runs/{run}/f{i}/state/v{n}.msgpack`, and it
holds every fragment's head, versions and token (`lanes`), read in the same transaction as the
run-wide bitmaps: one consistent cut of the whole run. Restoring each fragment from its own newest
snapshot instead would keep done the units of another fragment's commit that no restored snapshot
holds. Recover takes the usable cut with the most fragment versions in all.
"""

from __future__ import annotations

import heapq
import logging
import re
import secrets
from typing import Any

import msgpack
import redis

from diloco import keys
from diloco.errors import BadInput, ConfigError, ObjectMissing, RunNotFound
from diloco.messages import recorded_digest
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
    lanes = _lanes(raw, run)
    for _ in range(5):
        ranges = _epoch_ranges(raw, run)
        pipe = raw.pipeline(transaction=True)
        pipe.hgetall(keys.config(run))
        pipe.hgetall(keys.datasets(run))
        for lane in lanes:
            pipe.hgetall(keys.head(lane))
            pipe.get(keys.lock_token(lane))
            pipe.xrevrange(keys.versions(lane), count=MAX_VERSION_ENTRIES)
        for ds, epochs in ranges.items():
            pipe.hgetall(keys.units_meta(run, ds))
            for e in epochs:
                pipe.get(keys.units_done(run, ds, e))
        config, datasets, *rest = pipe.execute()
        config, datasets = _text(config), _text(datasets)
        states = {lane: {"head": _text(rest[3 * i]), "lock_token": int(rest[3 * i + 1] or 0),
                         "versions": [[eid.decode(), _text(f)] for eid, f in reversed(rest[3 * i + 2])]}
                  for i, lane in enumerate(lanes)}
        rest = rest[3 * len(lanes):]
        if not config or not all(st["head"] for st in states.values()):
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
            own = states[run]
            snap = {"format": FORMAT, "run": run, "version": int(own["head"]["version"]), "config": config,
                    "datasets": datasets, "units": units, **own}
            if len(lanes) > 1:
                snap["lanes"] = states
            return snap
    raise RunNotFound(f"run {run!r}: its open epochs kept moving while the snapshot was read; no snapshot taken")


def _lanes(raw: redis.Redis, lane: str) -> list[str]:
    """The lanes a snapshot of `lane` holds: `lane` itself first, then the run's other fragments."""
    run, fragment = keys.split_lane(lane)
    if fragment is None:
        return [lane]
    n = int(raw.hget(keys.config(run), "num_fragments") or 0)
    if n < 1:
        raise RunNotFound(f"run {run!r} is gone from Redis; no snapshot taken")
    return [lane] + [keys.lane(run, f) for f in range(n) if f != fragment]


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


def _lanes_of(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lane -> its head, lock_token and versions: every fragment's in a streaming snapshot, else the run's."""
    return snap.get("lanes") or {snap["run"]: snap}


def _check_objects(store: ObjectStore, snap: dict[str, Any]) -> None:
    """Every lane's weights and momentum exist with the recorded checksums (ObjectMissing, BadInput)."""
    for state in _lanes_of(snap).values():
        head = state["head"]
        store.get(head["weights"], digest=recorded_digest(head, "weights"))
        store.get(head["momentum"], digest=recorded_digest(head, "momentum"))


def newest_usable(store: ObjectStore, run: str) -> dict[str, Any]:
    """The newest snapshot whose weights and momentum exist with the recorded checksums."""
    for key in reversed(store.list(keys.snapshot_prefix(run))):
        try:
            snap = load(store, key)
            _check_objects(store, snap)
            return snap
        except (BadInput, ObjectMissing, KeyError) as e:
            log.warning("skipping snapshot %s: %s", key, e)
    raise RunNotFound(f"no usable snapshot of run {run!r} under {store.url}/{keys.snapshot_prefix(run)}")


def newest_cut(store: ObjectStore, run: str) -> dict[str, Any]:
    """A streaming run's usable snapshot (every fragment's objects intact) with the most fragment
    versions in all. A later cut holds at least every fragment version an earlier one does, so the
    fragments' snapshot lists, newest first, are merged by that sum, and a snapshot is read only when
    its turn comes: the newest few, not every one retention kept."""
    lanes = [keys.lane(run, f) for f in range(_num_fragments(store, run))]
    queues = [store.list(keys.snapshot_prefix(lane)) for lane in lanes]   # oldest first
    heap: list[tuple[int, str, int, dict[str, Any]]] = []

    def push(i: int) -> None:
        """The newest snapshot of fragment i not tried yet that holds every fragment, onto the heap."""
        while queues[i]:
            key = queues[i].pop()
            try:
                snap = load(store, key)
                if set(snap["lanes"]) != set(lanes):
                    raise BadInput("it does not hold every fragment (written by an older diloco?)")
                total = sum(int(st["head"]["version"]) for st in snap["lanes"].values())
            except (BadInput, KeyError, ValueError, TypeError) as e:
                log.warning("skipping snapshot %s: %s", key, e)
                continue
            heapq.heappush(heap, (-total, key, i, snap))
            return

    for i in range(len(lanes)):
        push(i)
    while heap:
        _, key, i, snap = heapq.heappop(heap)
        try:
            _check_objects(store, snap)
            return snap
        except (BadInput, ObjectMissing, KeyError) as e:
            log.warning("skipping snapshot %s: %s", key, e)
            push(i)
    raise RunNotFound(f"no usable snapshot of streaming run {run!r} under {store.url}/{keys.run_prefix(run)}"
                      "f*/state/ that holds every fragment")


def _num_fragments(store: ObjectStore, run: str) -> int:
    for key in reversed(store.list(keys.snapshot_prefix(keys.lane(run, 0)))):
        try:
            return int(load(store, key)["config"]["num_fragments"])
        except (BadInput, KeyError, ValueError) as e:
            log.warning("skipping snapshot %s: %s", key, e)
    raise RunNotFound(f"no readable snapshot of run {run!r}'s fragment 0 under {store.url}")


def _max_token(store: ObjectStore, run: str) -> int:
    """Highest fencing token used in any weights object, orphans included: new keys must not collide."""
    tokens = [int(m.group(1)) for k in store.list(keys.weights_prefix(run)) if (m := _TOKEN.search(k))]
    return max(tokens, default=0)


def recover(r: redis.Redis, store: ObjectStore, run: str, *, force: bool = False) -> int:
    """Rebuild run `run` in Redis from its newest usable snapshot; returns the restored version (with
    fragments, the least advanced fragment's)."""
    if r.exists(keys.config(run)) and not force:
        raise ConfigError(
            f"run {run!r} exists in this Redis; recover rebuilds a wiped Redis. Pass --force to replace "
            "the run's keys with the snapshot"
        )
    streaming = bool(store.list(keys.snapshot_prefix(keys.lane(run, 0))))
    snap = newest_cut(store, run) if streaming else newest_usable(store, run)
    lanes = _lanes_of(snap)
    run_keys = list(r.scan_iter(match=f"diloco:{{{run}}}:*", count=1000))
    pipe = r.pipeline(transaction=True)
    if run_keys:
        pipe.delete(*run_keys)
    pipe.hset(keys.config(run), mapping=snap["config"])
    if snap["datasets"]:
        pipe.hset(keys.datasets(run), mapping=snap["datasets"])
    for ds, u in snap["units"].items():
        pipe.hset(keys.units_meta(run, ds), mapping=u["meta"])
        for epoch, bitmap in u["done"].items():
            if bitmap:
                # Leases died with Redis: only done units stay claimed, the rest are issued again.
                pipe.set(keys.units_done(run, ds, int(epoch)), bitmap)
                pipe.set(keys.units_claimed(run, ds, int(epoch)), bitmap)
    for lane, state in lanes.items():
        pipe.hset(keys.head(lane), mapping={**state["head"], "deltas_since": "0-0"})
        for entry_id, fields in state["versions"]:
            pipe.xadd(keys.versions(lane), fields, id=entry_id)
        pipe.set(keys.lock_token(lane), max(state["lock_token"], _max_token(store, lane)))
    pipe.set(keys.recovered(run), secrets.token_hex(8))   # running streaming workers reload every fragment
    pipe.execute()
    versions = {lane: int(state["head"]["version"]) for lane, state in lanes.items()}
    log.info("recovered run %s at version%s %s", run, "s" if len(versions) > 1 else "",
             ", ".join(f"{lane} {v}" for lane, v in versions.items()))
    return min(versions.values())

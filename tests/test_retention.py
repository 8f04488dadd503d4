"""Storage retention: the pure decision on synthetic listings, then `diloco gc` and the aggregator's
automatic pass on real runs (real redis-server, file store and S3), and recover from what remains."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from diloco import keys, retention, runs
from diloco.cli import main as cli_main
from diloco.config import RunConfig
from diloco.errors import ConfigError
from diloco.messages import Head
from diloco.retention import Committed, Policy
from diloco.store import open_store
from tests import harness

RUN = "t"
SEC = 1000


def _head(version: int, token: int = 1, committed_ms: int = 100 * SEC) -> Head:
    return Head(version=version, weights=keys.weights_object(RUN, version, token), weights_digest="0" * 64,
                momentum=keys.momentum_object(RUN, version, token), momentum_digest="1" * 64, token=token,
                committed_ms=committed_ms, deltas_since="0-0")


def _committed(head: int, token: int = 1, step_ms: int = 10 * SEC) -> dict[int, Committed]:
    """Versions 1..head committed with `token`, v(n) at n * step_ms; v0 as init writes it."""
    out = {0: Committed(keys.weights_object(RUN, 0, 0), keys.momentum_object(RUN, 0, 0), None)}
    for v in range(1, head + 1):
        out[v] = Committed(keys.weights_object(RUN, v, token), keys.momentum_object(RUN, v, token), v * step_ms)
    return out


def _objects(version: int, token: int) -> list[str]:
    return [keys.weights_object(RUN, version, token), keys.momentum_object(RUN, version, token)]


def _listing(head: int, token: int = 1) -> list[str]:
    out = _objects(0, 0)
    for v in range(1, head + 1):
        out += [*_objects(v, token), keys.snapshot_object(RUN, v)]
    return out


def _doomed(head_v: int, listing: list[str], policy: Policy, *, now_ms: int = 10**9,
            committed: dict[int, Committed] | None = None) -> dict[str, str]:
    committed = _committed(head_v) if committed is None else committed
    head = _head(head_v, committed_ms=committed[head_v].committed_ms or 0)
    return dict(retention.decide(RUN, head, committed, listing, policy, now_ms))


def _versions_in(keys_: list[str] | set[str]) -> set[int]:
    return {int(m.group(1)) for k in keys_ if (m := re.search(r"/v(\d{8})", k))}


# --- the decision ------------------------------------------------------------------------------

def test_keeps_v0_the_last_k_every_mth_and_the_future():
    listing = [*_listing(9), *_objects(10, 5), *_objects(11, 5)]   # 10, 11: above the head
    doomed = _doomed(9, listing, Policy(keep_last=3, keep_every=4, delta_grace_s=0))
    assert _versions_in(doomed) == {1, 2, 3, 5, 6}
    for v in (1, 2, 3, 5, 6):  # weights, momentum and snapshot go together
        assert {*_objects(v, 1), keys.snapshot_object(RUN, v)} <= set(doomed)
    assert all("not kept" in reason for reason in doomed.values())
    kept = set(listing) - set(doomed)
    assert _versions_in(kept) == {0, 4, 7, 8, 9, 10, 11}


def test_keep_every_zero_and_keep_last_one_keep_only_v0_and_the_head():
    doomed = _doomed(6, _listing(6), Policy(keep_last=1, keep_every=0, delta_grace_s=0))
    assert _versions_in(set(_listing(6)) - set(doomed)) == {0, 6}


def test_orphans_of_committed_versions_go_and_unknown_ones_stay():
    committed = _committed(8)
    del committed[7]   # the stream no longer holds v7: which of its objects is committed is unknown
    listing = [*_listing(8), *_objects(8, 9), *_objects(7, 9), *_objects(6, 9), *_objects(0, 9),
               *_objects(2, 9), *_objects(9, 9)]
    doomed = _doomed(8, listing, Policy(keep_last=3, keep_every=0, delta_grace_s=0), committed=committed)
    for v in (8, 6, 0):  # kept versions: only the lock loser's objects go
        assert all("orphan" in doomed[k] for k in _objects(v, 9))
        assert not set(_objects(v, 1 if v else 0)) & set(doomed)
    assert set(_objects(2, 9)) <= set(doomed)        # a version not kept: everything goes
    assert not set(_objects(7, 9)) & set(doomed)     # unknown committed key: keep both
    assert not set(_objects(9, 9)) & set(doomed)     # above the head: may be being written


def test_the_newest_snapshot_is_kept_when_the_heads_was_never_written():
    listing = [k for k in _listing(8) if k != keys.snapshot_object(RUN, 8)]
    listing.remove(keys.snapshot_object(RUN, 7))
    doomed = _doomed(8, listing, Policy(keep_last=1, keep_every=0, delta_grace_s=0))
    assert _versions_in(set(listing) - set(doomed)) == {0, 6, 8}


def test_deltas_go_once_the_consuming_version_is_older_than_the_grace():
    shards = {b: keys.delta_shard(RUN, b, "w1", "n1", 0) for b in range(9)}
    policy = Policy(keep_last=100, keep_every=0, delta_grace_s=30)
    # v(n) committed at n * 10 s; head 8. At 80 s + 1 ms, v(b+1) is older than 30 s for b + 1 <= 5.
    doomed = _doomed(8, list(shards.values()), policy, now_ms=80 * SEC + 1)
    assert _versions_in(doomed) == {0, 1, 2, 3, 4}
    assert "grace 30s" in doomed[shards[4]]
    # v5 exactly as old as the grace: not yet
    assert _versions_in(_doomed(8, list(shards.values()), policy, now_ms=80 * SEC)) == {0, 1, 2, 3}
    # the open round (base 8 = head) and later bases stay even with no grace at all
    extra = [keys.delta_shard(RUN, 9, "w1", "n1", 0)]
    doomed = _doomed(8, [*shards.values(), *extra], Policy(100, 0, 0), now_ms=10**9)
    assert _versions_in(doomed) == set(range(8))


def test_deltas_of_versions_missing_from_the_stream_use_the_next_known_commit_time():
    committed = _committed(8)
    for v in (3, 4, 5):
        del committed[v]
    shards = [keys.delta_shard(RUN, b, "w1", "n1", 0) for b in range(8)]
    # v6 (the next known after v3..v5) committed at 60 s: bases 2..5 are as old as that bound.
    doomed = _doomed(8, shards, Policy(100, 0, 15), now_ms=75 * SEC + 1, committed=committed)
    assert _versions_in(doomed) == {0, 1, 2, 3, 4, 5}
    doomed = _doomed(8, shards, Policy(100, 0, 15), now_ms=75 * SEC, committed=committed)
    assert _versions_in(doomed) == {0, 1}


def test_keys_it_does_not_recognise_are_left_alone():
    odd = [f"runs/{RUN}/weights/readme.txt", f"runs/{RUN}/deltas/latest/x", f"runs/{RUN}/state/v1.msgpack",
           f"runs/{RUN}/weights/v00000001-t1.safetensors.bak", f"runs/{RUN}/other/v00000001.msgpack",
           "runs/other/weights/v00000001-t1.safetensors", f"runs/{RUN}/deltas/v00000001"]
    assert _doomed(8, odd, Policy(1, 0, 0)) == {}


def test_kind_of():
    assert retention.kind_of(keys.snapshot_object(RUN, 3)) == "snapshots"
    assert retention.kind_of(keys.delta_shard(RUN, 3, "w", "n", 1)) == "deltas"
    assert retention.kind_of(keys.momentum_object(RUN, 3, 1)) == "momentum"
    with pytest.raises(ValueError):
        retention.kind_of("runs/t/other/x")


def test_settings_are_tunable_and_validated():
    cfg = RunConfig(run="r1")
    assert (cfg.keep_last, cfg.keep_every, cfg.delta_grace_s, cfg.retention_every) == (5, 100, 3600.0, 10)
    assert {"keep_last", "keep_every", "delta_grace_s", "retention_every"} <= RunConfig.TUNABLE
    assert RunConfig.from_fields(cfg.replace(keep_last=2, delta_grace_s=0.5).to_fields()).keep_last == 2
    for bad in ({"keep_last": 0}, {"keep_every": -1}, {"delta_grace_s": -1.0}, {"delta_grace_s": float("inf")},
                {"retention_every": -2}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RunConfig(run="r1", **bad)


# --- on real runs ------------------------------------------------------------------------------

def _run(redis_url: str, store_url: str, versions: int, n_workers: int = 2) -> None:
    agg = harness.aggregator(redis_url, store_url, max_rounds=versions)
    ws = [harness.worker(redis_url, store_url, f"w{i}", max_rounds=versions) for i in range(n_workers)]
    assert agg.result() == versions
    for w in ws:
        assert w.result() == versions


def _by_kind(store, run: str = RUN) -> dict[str, set[str]]:
    return {d: set(store.list(f"{keys.run_prefix(run)}{d}/")) for d in ("weights", "momentum", "state", "deltas")}


def _gc(redis_url: str, store_url: str, *extra: str) -> int:
    return cli_main(["gc", "--run", RUN, "--redis-url", redis_url, "--store", store_url, *extra])


def test_gc_keeps_the_right_versions_and_recover_works_from_what_remains(redis_url, store_url, r, capsys):
    harness.init(redis_url, store_url, min_workers=2, keep_last=3, keep_every=4, retention_every=0)
    _run(redis_url, store_url, 8)
    store = open_store(store_url)
    entries = {int(f["version"]): f for _, f in r.xrange(keys.versions(RUN))}
    assert sorted(entries) == list(range(1, 9))
    head = runs.read_head(r, RUN)
    # An orphan of a committed version (a commit that lost its lock), objects of a version not
    # committed yet, and a shard a late worker uploads for the open round.
    orphans = [keys.weights_object(RUN, 7, 99), keys.momentum_object(RUN, 7, 99)]
    future = [keys.weights_object(RUN, 9, 99), keys.momentum_object(RUN, 9, 99)]
    late = keys.delta_shard(RUN, 8, "w0", "late", 0)
    for key in [*orphans, *future, late]:
        store.put(key, b"not really tensors")
    before = _by_kind(store)
    assert _versions_in(before["deltas"]) == set(range(9))

    assert _gc(redis_url, store_url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would delete" in out and re.search(r"weights +5 objects", out), out  # 1, 2, 3, 5 and the orphan
    assert _by_kind(store) == before, "--dry-run deletes nothing"

    assert _gc(redis_url, store_url, "--verbose") == 0
    out = capsys.readouterr().out
    assert "deleted" in out and re.search(r"snapshots +4 objects", out) and "orphan weights of v7" in out, out
    after = _by_kind(store)
    kept = {0, 4, 6, 7, 8}
    committed_w = {keys.weights_object(RUN, 0, 0)} | {entries[v]["weights"] for v in kept - {0}}
    committed_m = {keys.momentum_object(RUN, 0, 0)} | {entries[v]["momentum"] for v in kept - {0}}
    assert after["weights"] == committed_w | {future[0]}
    assert after["momentum"] == committed_m | {future[1]}
    assert after["state"] == {keys.snapshot_object(RUN, v) for v in kept - {0}}
    assert after["deltas"] == before["deltas"], "every delta is younger than the default grace of an hour"
    assert runs.load_weights(store, head) and runs.load_momentum(store, head)

    r.hset(keys.config(RUN), "delta_grace_s", "0")
    assert _gc(redis_url, store_url) == 0
    capsys.readouterr()
    assert _by_kind(store)["deltas"] == {late}, "only the open round's shard is left"
    assert _gc(redis_url, store_url) == 0 and re.search(r"total +0 objects", capsys.readouterr().out)

    # Redis wiped: recover restores the head from its snapshot, and the run goes on.
    r.flushall()
    assert cli_main(["recover", "--run", RUN, "--redis-url", redis_url, "--store", store_url]) == 0
    assert "recovered at version 8" in capsys.readouterr().out
    assert runs.read_head(r, RUN) == dataclasses.replace(head, deltas_since="0-0")
    _run(redis_url, store_url, 1)
    v9 = runs.read_head(r, RUN)
    assert v9.version == 9 and v9.token > 99, "recover counts the fencing tokens left in the store"
    assert _gc(redis_url, store_url) == 0
    after = _by_kind(store)
    assert not set(future) & (after["weights"] | after["momentum"]), "v9 is committed: the t99 objects are orphans"
    assert _versions_in(after["weights"]) == _versions_in(after["momentum"]) == {0, 4, 7, 8, 9}
    assert v9.weights in after["weights"] and _versions_in(after["state"]) == {4, 7, 8, 9}


def test_the_aggregator_applies_retention_every_n_commits(redis_url, file_url, r, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.aggregator")
    harness.init(redis_url, file_url, min_workers=2, keep_last=2, keep_every=0, delta_grace_s=0.0,
                 retention_every=2)
    _run(redis_url, file_url, 5)
    # each pass says what it deleted, counted by kind, no sizes measured (kills Aggregator._retention
    # 19, 21-29: the summary measured, or the line's text and arguments changed)
    said = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("retention after version")]
    assert len(said) == 2 and all(re.fullmatch(rf"retention after version {v} deleted (\d+ \w+(, )?)+", m)
                                  for v, m in zip((2, 4), said, strict=True)), said
    store = open_store(file_url)
    objs = _by_kind(store)
    # Retention ran after v2 and v4 (keeping v0, v3, v4 and deltas of base >= 4), not after v5.
    assert _versions_in(objs["weights"]) == _versions_in(objs["momentum"]) == {0, 3, 4, 5}
    assert _versions_in(objs["state"]) == {3, 4, 5}
    assert _versions_in(objs["deltas"]) == {4}
    entries = [f for _, f in r.xrange(keys.versions(RUN))]
    assert [int(f["version"]) for f in entries] == [1, 2, 3, 4, 5]
    assert all(f["participants"] == "w0,w1" for f in entries), "no delta was lost to retention"
    assert r.xlen(keys.rejections(RUN)) == 0

"""Compressed download: workers reach each version by applying its published update, bit for bit.

The aggregator publishes `theta(v+1) - theta(v)` encoded with the run's download codec, and the
decoded update is the truth: the full weights object of v+1 holds the base plus the decoded
update. A worker holding v applies the update; a worker further behind, or finding the update
missing or corrupt, downloads the full weights (and says so in its stats and log).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diloco import keys, model, runs, update
from diloco.config import WorkerSettings
from diloco.errors import ConfigError
from diloco.replay import replay
from diloco.store import digest_of, open_store
from tests import harness
from workers.worker import Worker

RUN = "t"
SAMPLES = {"num_samples": 400}


def _sha(data: bytes) -> str:
    return digest_of(data)


def _split(value: str) -> tuple[str, ...]:
    return tuple(value.split(",")) if value else ()


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_a_worker_applying_20_published_updates_holds_the_full_weights_bit_for_bit(redis_url, file_url, r, codec):
    cfg = harness.init(redis_url, file_url, codec=codec, task_options=SAMPLES)
    agg = harness.aggregator(redis_url, file_url, max_rounds=20)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=20)
    assert agg.result() == 20 and w0.result() == 20
    worker = w0.service
    # Version 0 has no update; every later version the worker trained on came as an update.
    assert (worker.full_downloads, worker.updates_applied, worker.update_fallbacks) == (1, 19, 0)

    # Independently of the worker: v0's full weights plus each version's update, in order, give every
    # committed weights object byte for byte, and each update is no larger than the delta sent up.
    store = open_store(file_url)
    weights = model.from_bytes(store.get(keys.weights_object(RUN, 0, 0)), "v0")
    codec_obj = update.download_codec(cfg)
    assert codec_obj is not None and codec_obj.name == {"int8": "int8", "topk": "int4"}[codec]
    for _, entry in r.xrange(keys.versions(RUN)):
        names, shas = _split(entry["update"]), _split(entry["update_digest"])
        assert names and len(names) == len(shas)
        shards = update.fetch(store, names, shas, cfg.shard_bytes)
        weights = update.apply(weights, update.decode(shards, weights, codec_obj))
        data = model.to_bytes(weights, run=RUN, version=entry["version"])
        assert _sha(data) == entry["weights_digest"], f"version {entry['version']}"
        down = sum(len(s) for s in shards)
        if codec == "topk":  # int4 down (topk up is far smaller): this tiny model's headers leave it at 1/4
            assert down < store.size(keys.weights_object(RUN, 0, 0)) / 3
        else:
            assert down <= int(entry["bytes"]), "bytes down <= bytes up"
    assert replay(r, store, RUN).mismatched == []


def test_an_fp32_download_publishes_no_update_and_workers_read_full_weights(redis_url, file_url, r):
    harness.init(redis_url, file_url, codec="int8", download_codec="fp32", task_options=SAMPLES)
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=3)
    assert agg.result() == 3 and w0.result() == 3
    assert [f["update"] for _, f in r.xrange(keys.versions(RUN))] == ["", "", ""]
    assert (w0.service.full_downloads, w0.service.updates_applied) == (3, 0)
    assert open_store(file_url).list("runs/t/updates/") == []
    assert replay(r, open_store(file_url), RUN).mismatched == []


def test_a_download_codec_that_does_not_exist_is_refused_by_name(redis_url, file_url):
    with pytest.raises(ConfigError, match="unknown codec 'int3'"):
        harness.init(redis_url, file_url, codec="int8", download_codec="int3")


def _idle_worker(redis_url: str, store_url: str, worker_id: str) -> Worker:
    """A worker object that is not running: the test moves it from version to version itself."""
    return Worker(WorkerSettings(redis_url, store_url, RUN, worker_id, heartbeat_interval_s=0.5, block_ms=200))


def _commit_versions(redis_url: str, file_url: str, n: int, worker_id: str) -> None:
    agg = harness.aggregator(redis_url, file_url, max_rounds=n)
    w = harness.worker(redis_url, file_url, worker_id, max_rounds=n)
    assert agg.result() == n and w.result() == n


def _holds(worker: Worker, store, head) -> bool:
    full = runs.load_weights(store, head)
    local = worker.model.state_dict()
    return all(torch.equal(local[n], t) for n, t in full.items())


def test_a_worker_that_missed_a_version_downloads_the_full_weights(redis_url, file_url, r):
    harness.init(redis_url, file_url, codec="int8", task_options=SAMPLES)
    store = open_store(file_url)
    idle = _idle_worker(redis_url, file_url, "idle")
    idle._sync_to(runs.read_head(r, RUN))
    assert (idle.full_downloads, idle.updates_applied) == (1, 0)

    _commit_versions(redis_url, file_url, 2, "w0")   # versions 1 and 2: idle holds 0, two behind
    head = runs.read_head(r, RUN)
    assert head.version == 2 and head.update
    idle._sync_to(head)
    assert (idle.full_downloads, idle.updates_applied, idle.update_fallbacks) == (2, 0, 0)
    assert _holds(idle, store, head)

    _commit_versions(redis_url, file_url, 1, "w1")   # version 3: one behind, so the update applies
    head = runs.read_head(r, RUN)
    idle._sync_to(head)
    assert (idle.full_downloads, idle.updates_applied) == (2, 1)
    assert _holds(idle, store, head)


@pytest.mark.parametrize("damage", ["truncated", "missing", "valid object, wrong content"])
def test_an_unusable_update_is_reported_and_the_worker_downloads_the_full_weights(redis_url, file_url, r, tmp_path,
                                                                                    caplog, damage):
    harness.init(redis_url, file_url, codec="int8", task_options=SAMPLES)
    store = open_store(file_url)
    idle = _idle_worker(redis_url, file_url, "idle")
    idle._sync_to(runs.read_head(r, RUN))
    _commit_versions(redis_url, file_url, 1, "w0")
    head = runs.read_head(r, RUN)
    root = Path(file_url.removeprefix("file://"))
    first = root / head.update[0]
    if damage == "truncated":
        first.write_bytes(first.read_bytes()[:100])
    elif damage == "missing":
        first.unlink()
    else:  # a well-formed update of other values, its digest in the head: only decoding can tell
        other = {n: torch.ones_like(t) for n, t in update.floats(idle.global_full).items()}
        shards, _ = update.encode(idle.global_full, update.apply(idle.global_full, other), {},
                                  update.download_codec(idle.cfg), idle.cfg.shard_bytes)
        key = keys.update_shard(RUN, head.version, 99, 0)
        sha = store.put(key, shards[0])
        r.hset(keys.head(RUN), mapping={"update": key, "update_digest": sha})
        head = runs.read_head(r, RUN)

    with caplog.at_level("WARNING", logger="workers.worker"):
        idle._sync_to(head)
    assert (idle.full_downloads, idle.updates_applied, idle.update_fallbacks) == (2, 0, 1)
    assert idle.heartbeat.stats["update_fallbacks"] == 1
    assert f"the update to version {head.version} is unusable" in caplog.text
    assert _holds(idle, store, head)


def test_download_codec_options_set_the_published_updates_density(redis_url, file_url, r):
    """topk uploads at its default density (1.5%), the updates go down at 20%: more bytes than up."""
    cfg = harness.init(redis_url, file_url, codec="topk", download_codec="topk",
                       download_codec_options={"density": 0.2}, task_options=SAMPLES)
    assert update.download_codec(cfg).density == 0.2
    _commit_versions(redis_url, file_url, 2, "w0")
    store = open_store(file_url)
    for _, entry in r.xrange(keys.versions(RUN)):
        down = sum(store.size(k) for k in _split(entry["update"]))
        assert down > int(entry["bytes"]), (down, entry["bytes"])  # at the upload density they are equal
    assert replay(r, store, RUN).mismatched == []


def test_a_download_codec_option_the_codec_does_not_have_is_refused_by_name(redis_url, file_url):
    with pytest.raises(ConfigError, match="unknown option 'bogus' for codec 'int8'"):
        harness.init(redis_url, file_url, codec="topk", download_codec="int8", download_codec_options={"bogus": 1})

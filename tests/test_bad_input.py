"""Bad input gets a clear error naming the problem, and never crashes a service."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from diloco import keys, runs, units
from diloco.config import WorkerSettings
from diloco.errors import ConfigError, DuplicateWorker, ModelMismatch, RunNotFound, Unreachable
from diloco.localserver import free_port
from diloco.messages import Announcement
from diloco.store import digest_of, open_store
from tests import harness
from workers.worker import Worker


def test_missing_run_is_a_clear_error(redis_url, file_url):
    with pytest.raises(RunNotFound, match=r"run 'nope' does not exist.*diloco init --run nope"):
        Worker(WorkerSettings(redis_url, file_url, "nope", "w0"))


def test_missing_run_from_the_cli_exits_with_a_message(redis_url, file_url):
    out = subprocess.run([sys.executable, "-m", "diloco", "worker", "--run", "nope", "--redis-url", redis_url,
                          "--store", file_url, "--worker-id", "w0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "run 'nope' does not exist" in out.stderr and "Traceback" not in out.stderr


def test_model_mismatch_names_the_parameters(redis_url, file_url, monkeypatch):
    harness.init(redis_url, file_url, task="tests.usertask:make_task", task_options={})
    monkeypatch.setenv("USERTASK_EXTRA", "1")  # this "machine" runs other model code
    with pytest.raises(ModelMismatch) as e:
        Worker(WorkerSettings(redis_url, file_url, "t", "w0"))
    msg = str(e.value)
    assert "does not match run 't'" in msg
    assert "0.weight: run has [32, 8] float32, local model has [33, 8] float32" in msg


def test_duplicate_worker_id_is_refused(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    first = harness.worker(redis_url, file_url, "w0")  # trains, announces, then waits: alive
    harness.wait_for_key(r, keys.worker_alive("t", "w0"))
    second = harness.worker(redis_url, file_url, "w0", start=False)
    with pytest.raises(DuplicateWorker, match="worker id 'w0' is already used by a live worker"):
        second.service.run(max_rounds=1)
    assert first.is_alive(), "the first worker is not disturbed"
    first.stop()
    assert r.get(keys.worker_alive("t", "w0")) is None


def test_init_with_changed_settings_is_refused(redis_url, file_url):
    cfg = harness.init(redis_url, file_url)
    assert harness.init(redis_url, file_url) == cfg  # idempotent with the same settings
    with pytest.raises(ConfigError, match=r"already exists with other settings \(sync_every: 5 -> 7"):
        harness.init(redis_url, file_url, sync_every=7)
    with pytest.raises(ConfigError, match="task_options"):
        harness.init(redis_url, file_url, task_options={"hidden": 16})


def test_unreachable_redis_names_the_url(file_url):
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(Unreachable, match=r"cannot reach Redis at redis://:\*\*\*@127.0.0.1:\d+/0") as e:
        Worker(WorkerSettings(url, file_url, "t", "w0"))
    assert "secret" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "diloco", "status", "--run", "t", "--redis-url", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach Redis at" in out.stderr and "secret" not in out.stderr


def test_unreachable_store_names_the_endpoint(redis_url, s3_url, monkeypatch):
    harness.init(redis_url, s3_url)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DILOCO_S3_ENDPOINT", endpoint)
    with pytest.raises(Unreachable, match=endpoint.replace(".", r"\.")):
        Worker(WorkerSettings(redis_url, s3_url, "t", "w0"))


def _evil_announcement(r, store, payload: bytes, claimed_sha: str) -> Announcement:
    """A well-formed announcement from 'evil', with real leases on its units, carrying `payload`."""
    cfg = runs.load_config(r, "t")
    leases = units.Leases(r, "t", units.plan_for(r, cfg), "evil", lease_ms=60_000)
    claimed = leases.claim(units.units_per_round(cfg), threading.Event())
    key = keys.delta_shard("t", 0, "evil", "n1", 0)
    store.put(key, payload)
    return Announcement(run="t", worker="evil", nonce="n1", version=0, codec="fp32", shards=(key,),
                        sizes=(len(payload),), digest=(claimed_sha,), samples=8, tokens=8, inner_steps=5,
                        loss=0.5, units=tuple(claimed))


def test_corrupt_shard_is_rejected_counted_and_the_aggregator_goes_on(redis_url, s3_url, r):
    harness.init(redis_url, s3_url)
    store = open_store(s3_url)
    payload = b"not a safetensors shard"
    bad_sum = _evil_announcement(r, store, payload, digest_of(b"something else"))
    r.xadd(keys.deltas("t"), bad_sum.to_fields())
    r.xadd(keys.deltas("t"), {"kind": "delta", "worker": "garbage"})  # malformed entry
    agg = harness.aggregator(redis_url, s3_url)
    w = harness.worker(redis_url, s3_url, "w1", max_rounds=2)
    assert w.result() == 2
    entries = harness.wait_for_version(r, "t", 2)
    assert entries[0]["participants"] == "w1", "the corrupt delta is not in the average"
    assert agg.is_alive(), "the aggregator keeps running after bad input"
    assert agg.stop() == 2
    reasons = {f["worker"]: f["reason"] for _, f in r.xrange(keys.rejections("t"))}
    assert "ChecksumMismatch" in reasons["evil"] and "digest" in reasons["evil"]
    assert reasons["garbage"].startswith("malformed announcement: field 'run' is missing")
    assert r.hgetall(keys.rejected_counts("t")) == {"evil": "1", "garbage": "1"}


def test_undecodable_shard_with_valid_checksum_is_rejected(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    store = open_store(file_url)
    payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"
    r.xadd(keys.deltas("t"), _evil_announcement(r, store, payload, digest_of(payload)).to_fields())
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w = harness.worker(redis_url, file_url, "w1", max_rounds=1)
    assert agg.result() == 1 and w.result() == 1
    (_, rej), = r.xrange(keys.rejections("t"))
    assert rej["worker"] == "evil" and "BadShard" in rej["reason"]

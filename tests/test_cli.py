"""The command line as operators use it: real processes, real signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
import redis

from diloco import keys
from tests import harness

DILOCO = [sys.executable, "-m", "diloco"]


def test_local_run_commits_versions_with_falling_loss_and_resumes(tmp_path):
    args = [*DILOCO, "run", "--workers", "2", "--task", "tiny", "--sync-every", "20", "--inner-lr", "0.01",
            "--inner-warmup-steps", "0", "--data-dir", str(tmp_path)]
    first = subprocess.run([*args, "--max-versions", "4"], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr + first.stdout
    losses = [float(m) for m in re.findall(r"version +\d+ +loss ([\d.]+)", first.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], first.stdout
    assert "reached version 4" in first.stdout
    # Settings left out are adopted from the run; the same data dir resumes where it stopped.
    second = subprocess.run([*DILOCO, "run", "--workers", "2", "--task", "tiny", "--data-dir", str(tmp_path),
                             "--max-versions", "6"], capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr + second.stdout
    assert "resumed at version 4" in second.stdout
    assert re.findall(r"version +(\d+) +loss", second.stdout) == ["5", "6"]
    port = int(re.search(r"redis-server on\s+redis://127.0.0.1:(\d+)", second.stdout).group(1))
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1).ping()  # redis-server was stopped


def test_local_run_refuses_changed_settings(tmp_path):
    base = [*DILOCO, "run", "--task", "tiny", "--sync-every", "5", "--workers", "1", "--data-dir", str(tmp_path)]
    assert subprocess.run([*base, "--max-versions", "1"], capture_output=True, timeout=240).returncode == 0
    out = subprocess.run([*base, "--max-versions", "2", "--codec", "fp32"], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 2 and "codec: 'bf16' -> 'fp32'" in out.stderr


def test_worker_exits_cleanly_on_sigterm(redis_url, file_url, r):
    # A round long enough that only the signal ends it.
    harness.init(redis_url, file_url, sync_every=10**5, batch_size=2, unit_samples=1000,
                 task_options={"num_samples": 200_000})
    proc = subprocess.Popen([*DILOCO, "worker", "--run", "t", "--redis-url", redis_url, "--store", file_url,
                             "--worker-id", "w9", "--heartbeat-interval-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        harness.wait_for_field(r, keys.worker_stats("t", "w9"), "state", "training")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "abandoning the round" in out
    assert r.get(keys.worker_alive("t", "w9")) is None, "deregistered at once, not at TTL expiry"
    assert r.hget(keys.worker_stats("t", "w9"), "state") == "stopped"
    assert r.xlen(keys.deltas("t")) == 0, "an abandoned round announces nothing"


def test_aggregator_exits_cleanly_on_sigterm_and_releases_the_lock(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    proc = subprocess.Popen([*DILOCO, "aggregator", "--run", "t", "--redis-url", redis_url, "--store", file_url,
                             "--id", "a1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        harness.wait_for_key(r, keys.lock("t"))
        assert r.get(keys.lock("t")).endswith(":a1")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert r.get(keys.lock("t")) is None


def test_init_cli_is_idempotent_and_reports_changes(redis_url, file_url):
    base = [*DILOCO, "init", "--run", "c", "--redis-url", redis_url, "--store", file_url, "--task", "tiny"]
    first = subprocess.run([*base, "--sync-every", "9"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "run c created" in first.stdout
    again = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already exists" in again.stdout and "sync_every 9" in again.stdout
    changed = subprocess.run([*base, "--sync-every", "10"], capture_output=True, text=True, timeout=60)
    assert changed.returncode == 2 and "sync_every: 9 -> 10" in changed.stderr


def test_bad_task_option_is_a_clear_error(redis_url, file_url):
    out = subprocess.run([*DILOCO, "init", "--run", "c", "--redis-url", redis_url, "--store", file_url,
                          "--task", "tiny", "--task-option", "hiddn=3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown option 'hiddn'" in out.stderr and "Traceback" not in out.stderr

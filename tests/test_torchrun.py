"""One worker over several ranks (`torchrun ... -m diloco worker`), against real Redis and S3.

Two CPU ranks (gloo) must commit the same weights as one process training the same samples (each
rank trains half of every micro-batch, so the run's batch_size is the one process's), and a rank that
dies must take the whole worker down, its work units going back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diloco import keys, model, units
from diloco.config import ENV_RUN
from diloco.store import open_store
from tests import harness

ROOT = Path(__file__).resolve().parent.parent
# A small GPT: LayerNorm only, so a rank's share of a batch changes nothing but the batch (BatchNorm would).
GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16, "corpus_mb": 0.1}
SETTINGS = {"task": "gpt", "task_options": GPT, "sync_every": 3, "batch_size": 4, "grad_accum": 2,
            "inner_warmup_steps": 0, "inner_lr": 0.01, "codec": "fp32"}


def torchrun(redis_url: str, store_url: str, run: str, log: Path, *extra: str, nproc: int = 2,
             device: str = "cpu") -> subprocess.Popen:
    # The run comes from DILOCO_RUN: torchrun's own parser takes `--run` for an abbreviation of `--run-path`.
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "diloco", "worker", "--redis-url", redis_url, "--store", store_url,
            "--worker-id", "w0", "--device", device, "--threads", "1", "--heartbeat-interval-s", "0.5", *extra]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", ENV_RUN: run}, start_new_session=True)


def committed_weights(r, store_url: str, run: str) -> list[dict[str, torch.Tensor]]:
    store = open_store(store_url)
    return [model.from_bytes(store.get(f["weights"], digest=f["weights_digest"]), f["weights"])
            for _, f in r.xrange(keys.versions(run))]


def test_two_ranks_commit_what_one_process_does(redis_url, s3_url, r, procs, tmp_path):
    versions = 2
    harness.init(redis_url, s3_url, run="one", **SETTINGS)
    agg = harness.aggregator(redis_url, s3_url, run="one", max_rounds=versions)
    single = harness.worker(redis_url, s3_url, "w0", run="one", max_rounds=versions)
    assert single.result() == versions and agg.result() == versions

    harness.init(redis_url, s3_url, run="two", **SETTINGS)
    agg = harness.aggregator(redis_url, s3_url, run="two", max_rounds=versions)
    log = tmp_path / "torchrun.log"
    proc = torchrun(redis_url, s3_url, "two", log, "--max-rounds", str(versions))
    procs.append(proc)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    assert agg.result() == versions

    # the announcements count the whole worker's samples, not one rank's
    anns = [f for _, f in r.xrange(keys.deltas("two"))]
    assert [int(a["samples"]) for a in anns] == [3 * 2 * 4] * versions
    ones, twos = committed_weights(r, s3_url, "one"), committed_weights(r, s3_url, "two")
    assert len(ones) == len(twos) == versions
    # Summing gradients over two ranks rounds differently from one process. AdamW turns the rounding noise
    # of a gradient that is zero in exact arithmetic (the attention's key bias) into steps of ~lr * 1e-3, so
    # the tolerance is 1e-4 absolute: far below the 3e-2 a round moves the weights, which a wrong split of
    # the samples would change at that scale.
    for v, (a, b) in enumerate(zip(ones, twos, strict=True), 1):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4,
                                       msg=lambda m, v=v, name=name: f"version {v}, {name}: {m}")
    # the losses the two workers announced agree too (rank 0 announces the mean over both ranks)
    one_losses = [float(f["loss"]) for _, f in r.xrange(keys.deltas("one"))]
    assert [float(a["loss"]) for a in anns] == pytest.approx(one_losses, rel=1e-5)


def _ranks_of(proc: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started (its children, read from /proc)."""
    out = {}
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = pid
    return out


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.05)  # conditions in Redis and /proc with no event to block on
    return value


# rank 0's death ends like any dead worker's (TTLs), so CI runs the rank-1 case: `-m slow` runs both
@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_dead_rank_takes_the_worker_down_and_its_units_go_back(redis_url, file_url, r, procs, tmp_path, victim):
    # long rounds, so the kill lands mid-round; a short heartbeat, so leases of a dead rank 0 end soon
    cfg = harness.init(redis_url, file_url, **{**SETTINGS, "sync_every": 400, "batch_size": 2, "grad_accum": 1,
                                               "heartbeat_timeout_s": 3.0})
    log = tmp_path / "torchrun.log"
    proc = torchrun(redis_url, file_url, "t", log)
    procs.append(proc)
    harness.wait_for_field(r, keys.worker_stats("t", "w0"), "state", "training", timeout_s=120)
    ranks = _wait(lambda: (got := _ranks_of(proc)) and len(got) == 2 and got, 30, "two ranks")
    leased = units.report(r, cfg)["epochs"][0]["leased"]
    assert leased and {u["worker"] for u in leased} == {"w0"}

    os.kill(ranks[victim], signal.SIGKILL)
    code = proc.wait(120)
    assert code != 0, "torchrun reports the dead rank"
    assert all(not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
               for pid in ranks.values()), "no rank outlives the worker"
    # The alive key goes (deleted by a rank 0 that saw its peer die, or expired with a dead rank 0),
    # and no unit stays held: released, or its lease ran out (the next claim takes it again).
    _wait(lambda: not r.exists(keys.worker_alive("t", "w0")), 10, "the alive key gone")

    def units_free() -> bool:
        rep = units.report(r, cfg)["epochs"][0]
        return all(u["expires_in_s"] <= 0 for u in rep["leased"])

    _wait(units_free, 10, "w0's units back")
    if victim == 1:  # rank 0 lived to release them at once, and said why it stopped
        assert units.report(r, cfg)["epochs"][0]["leased"] == [], log.read_text()[-3000:]
        assert "rank 0: another rank of this worker is gone" in log.read_text()


def test_sigterm_to_torchrun_stops_every_rank_and_gives_the_units_back(redis_url, file_url, r, procs, tmp_path):
    cfg = harness.init(redis_url, file_url, **{**SETTINGS, "sync_every": 400, "batch_size": 2, "grad_accum": 1})
    log = tmp_path / "torchrun.log"
    proc = torchrun(redis_url, file_url, "t", log)
    procs.append(proc)
    harness.wait_for_field(r, keys.worker_stats("t", "w0"), "state", "training", timeout_s=120)
    assert units.report(r, cfg)["epochs"][0]["leased"]

    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    text = log.read_text()
    assert "stop requested; abandoning the round" in text, text[-3000:]
    assert "rank 1: stopping with the other ranks" in text, text[-3000:]
    # torchrun itself prints the SignalException it stopped on; the ranks fail with nothing
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-3000:]
    # a graceful exit: the alive key and the leases are gone at once, not after heartbeat_timeout_s (10 s)
    assert not r.exists(keys.worker_alive("t", "w0"))
    assert units.report(r, cfg)["epochs"][0]["leased"] == []
    assert r.hget(keys.worker_stats("t", "w0"), "state") == "stopped"
    assert r.xlen(keys.deltas("t")) == 0, "nothing announced for the abandoned round"

"""Liveness of work-unit claims: randomized schedules against the real Lua scripts on a real redis-server.

Hypothesis picks the dataset length, the unit size, the units per round, 1-8 workers and a schedule
of claims, commits, rejections (the worker gives its units back), stalls (a worker's leases run
out while it trains) and kills (a worker vanishes; its leases run out). Time passing is modelled
by moving a lease's expiry into the past, the one thing the scripts read from the clock. Every
schedule must then finish epoch 0 within a bounded number of further rounds, with every unit of
it committed exactly once. Before claims became all-or-nothing (docs/architecture.md, "Work
units"), two workers each holding part of a round waited for each other forever.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diloco import keys, runs
from diloco.connect import connect_redis
from diloco.errors import ConfigError, UnitConflict
from diloco.scripts import Scripts
from diloco.store import open_store
from diloco.tasks.tiny import make_task as make_tiny
from diloco.units import Leases, Unit, UnitPlan, by_epoch

DS = "ds-live"
AGG = "agg"
_runs = itertools.count()


class Cluster:
    """W workers sharing one run's units, and an aggregator that commits what they trained."""

    def __init__(self, r: redis.Redis, length: int, unit_samples: int, per_round: int, workers: int) -> None:
        self.r, self.run = r, f"live{next(_runs)}"
        self.plan = UnitPlan(DS, length, unit_samples, seed=0)
        self.per_round = per_round
        self.scripts = Scripts(r)
        r.hset(keys.units_meta(self.run, DS), mapping=self.plan.meta())
        r.hset(keys.head(self.run), mapping={"version": "0"})
        self.token = self.scripts.acquire_lock(self.run, AGG, 600_000)
        self.leases = {f"w{i}": Leases(r, self.run, self.plan, f"w{i}", lease_ms=600_000) for i in range(workers)}
        self.holding: dict[str, list[Unit]] = {}
        self.committed: Counter[Unit] = Counter()
        self.version = 0

    def claim(self, w: str) -> None:
        if w in self.holding:
            return
        got = self.leases[w].claim(self.per_round, _never())
        assert got is not None and len(got) == self.per_round, f"{w} got {got}, not {self.per_round} units"
        assert len(set(got)) == len(got)
        self.holding[w] = got

    def commit(self, w: str) -> None:
        units = self.holding.pop(w, None)
        if units is None:
            return
        trained = {e: [(b, w) for b in bits] for e, bits in by_epoch(units).items()}
        try:
            self.version = self.scripts.commit(
                self.run, lock_value=f"{self.token}:{AGG}", base_version=self.version, token=self.token,
                weights=("w", "0" * 64), momentum=("m", "0" * 64), stats={"n": "1"}, dataset=DS, units=trained)
        except UnitConflict:  # its lease ran out and another worker took a unit: the delta is dropped
            self.leases[w].release()
            return
        self.committed.update(units)
        self.leases[w].release()  # done units are only forgotten

    def reject(self, w: str) -> None:
        if self.holding.pop(w, None) is not None:
            self.leases[w].release()

    def stall(self, w: str) -> None:
        """The worker's leases run out (it stalled, or it died and nobody renews them)."""
        for e, bits in by_epoch(self.holding.get(w, [])).items():
            leases = keys.units_leases(self.run, DS, e)
            self.r.zadd(leases, {str(b): 0 for b in bits}, xx=True)

    def kill(self, w: str) -> None:
        self.stall(w)
        self.holding.pop(w, None)
        self.leases[w].held = []  # the process is gone: it never releases anything

    def epoch_lo(self) -> int:
        return int(self.r.hget(keys.units_meta(self.run, DS), "epoch_lo"))


def _never():
    import threading

    return threading.Event()


@st.composite
def setups(draw):
    unit_samples = draw(st.integers(1, 8))
    length = draw(st.integers(1, 120))
    num_units = -(-length // unit_samples)
    per_round = draw(st.integers(1, num_units))  # init refuses a round larger than an epoch
    workers = draw(st.integers(1, 8))
    steps = draw(st.lists(st.tuples(st.sampled_from(["claim", "commit", "reject", "stall", "kill"]),
                                    st.integers(0, workers - 1)), max_size=60))
    return length, unit_samples, per_round, workers, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=setups())
def test_every_schedule_finishes_the_epoch_with_every_unit_committed_once(r, setup):
    length, unit_samples, per_round, workers, steps = setup
    c = Cluster(r, length, unit_samples, per_round, workers)
    for action, i in steps:
        getattr(c, action)(f"w{i}")
    # Then every worker keeps training: claim, commit. The epoch must finish in a bounded number of
    # rounds: what is free is claimed oldest first, what a dead worker held comes back once its lease ends.
    bound = 2 * (c.plan.num_units // per_round + workers + 2)
    for _ in range(bound):
        if c.epoch_lo() > 0:
            break
        for w in c.leases:
            c.claim(w)
        for w in list(c.leases):
            c.commit(w)
        for w in c.leases:
            c.claim(w)  # one more claim moves epoch_lo once epoch 0 is all done
            c.reject(w)
    assert c.epoch_lo() > 0, f"epoch 0 not finished after {bound} rounds of every worker"
    epoch0 = {u: n for u, n in c.committed.items() if u[0] == 0}
    assert sorted(epoch0) == [(0, b) for b in range(c.plan.num_units)], "a unit of epoch 0 was never committed"
    assert set(epoch0.values()) == {1}, f"units committed twice: {[u for u, n in epoch0.items() if n > 1]}"
    assert r.bitcount(keys.units_done(c.run, DS, 0)) == c.plan.num_units
    twice = [u for u, n in c.committed.items() if n > 1]
    assert twice == [], f"units committed twice in later epochs: {twice}"


# --- end to end: `diloco run` ----------------------------------------------------------------------

DILOCO = [sys.executable, "-m", "diloco"]


def _run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    out = subprocess.run([*DILOCO, "run", "--data-dir", str(tmp_path), "--no-monitor", *flags],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    return out


def test_a_round_close_to_an_epoch_with_two_workers_reaches_max_versions(tmp_path):
    # 32 units of 16 samples; a round trains on 28 of them, so two workers' rounds span epochs all the
    # time. With claims that waited holding part of a round, both workers ended up `starved` for good.
    out = _run(tmp_path, "--task", "tiny", "--task-option", "num_samples=512", "--sync-every", "28",
               "--workers", "2", "--max-versions", "6")
    assert re.findall(r"version +(\d+) +loss", out.stdout) == [str(v) for v in range(1, 7)], out.stdout
    assert "reached version 6" in out.stdout


def test_the_tiny_task_runs_with_its_own_defaults(tmp_path):
    out = _run(tmp_path, "--task", "tiny", "--max-versions", "2")
    assert "task tiny, H=20" in out.stdout, out.stdout  # the task's default, not the run-wide 500
    assert "reached version 2" in out.stdout


def test_task_defaults_fill_only_what_the_user_left_out(redis_url, file_url):
    r, store = connect_redis(redis_url), open_store(file_url)
    assert runs.init_run(r, store, "d1", {"task": "tiny"}).config.sync_every == 20
    mine = runs.init_run(r, store, "d2", {"task": "tiny", "sync_every": 7, "batch_size": 4}).config
    assert (mine.sync_every, mine.batch_size, mine.unit_samples) == (7, 4, 4)
    with pytest.raises(ConfigError, match="a round trains on 300 work units"):  # a user's setting is still checked
        runs.init_run(r, store, "d3", {"task": "tiny", "sync_every": 300})
    with pytest.raises(ConfigError, match="defaults name warp_factor, which are not run settings"):
        runs.init_run(r, store, "d4", {"task": "tests.test_claims_liveness:task_with_bad_defaults"})


def task_with_bad_defaults(**options):
    task = make_tiny(**options)
    task.defaults = {"sync_every": 5, "warp_factor": 9}
    return task

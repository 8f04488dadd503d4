"""Chaos run: the local pipeline under random faults, then its invariants checked.

Starts its own redis-server (AOF, appendfsync always) and a file:// store in --data-dir, creates a run of
the tiny task, and runs two aggregator processes (one holds the lock, the other is a standby) and
--workers worker processes (with --checkpoint-dir). Until the run has committed --versions versions it
injects one fault every 1 to --fault-every versions, the kinds in shuffled rounds, at a random moment of
the round (seeded by --seed):

* worker: SIGKILL a random worker; it is restarted (same id, same checkpoint) once its heartbeat expired;
* aggregator: SIGKILL the aggregator holding the lock, and start it again at once (the standby takes over);
* redis: SIGKILL redis-server, leave it down 0.5 to 3 s, start it on the same port and data directory;
* wipe: FLUSHALL under the running services, then `diloco recover` 0.5 to 3 s later (the services wait
  through it and carry on by themselves; what the wipe took is kept aside for the checks).

Then it checks, and prints: every version 1..N committed exactly once; replay (diloco.replay): every
committed version equals, bit for bit, a fault-free recomputation from the deltas it included; work
units (diloco.audit): none committed twice, none lost in a finished epoch, the done bitmaps equal the
committed units, no unit left claimed without a lease; and no service exited unless the chaos killed it,
nor failed to stop cleanly on SIGTERM at the end. Exit status 1 on any violation.

    .venv/bin/python bench/chaos.py [--versions 60] [--workers 3] [--seed 0] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/chaos.py` from the root

from bench.common import write_section
from diloco import keys, runs, units
from diloco.audit import audit
from diloco.connect import connect_redis
from diloco.localserver import RedisServer
from diloco.replay import replay
from diloco.store import open_store

RUN = "chaos"
KINDS = ("worker", "aggregator", "redis", "wipe")
ROUND_TIMEOUT_S = 20.0  # bounds a stalled round; the rounds it closes are counted
FAULT_ROWS = {"worker": "worker killed", "aggregator": "aggregator killed", "redis": "redis restarted",
              "wipe": "redis wiped and recovered"}


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    kills: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "diloco", *self.argv], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP connection to 127.0.0.1:`port` (Linux /proc)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split()
        if cols[2].endswith(f":{port:04X}") and cols[3] == "01" and cols[9] in inodes:  # 01: ESTABLISHED
            return True
    return False


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.data = Path(args.data_dir or tempfile.mkdtemp(prefix="diloco-chaos-")).resolve()
        (self.data / "logs").mkdir(parents=True, exist_ok=True)
        self.server = RedisServer(self.data / "redis", appendonly=True)
        self.store_url = (self.data / "store").as_uri()
        self.env = {**os.environ, "DILOCO_LOG_LEVEL": "INFO"}
        self.env.pop("DILOCO_CRASH_AT", None)
        self.faults: Counter = Counter()
        self.violations: list[str] = []
        self.unexpected_exits = 0
        self.pending: list[Service] = []   # killed workers, restarted once their alive key is gone
        self.kinds: list[str] = []
        self.archive: dict[str, dict[str, str]] = {}  # announcements a wipe took from the deltas stream
        self.leased_at_wipes = self.units_of_lost_commits = 0
        self.t0 = time.monotonic()
        # the run's lanes (diloco.keys.lane): the run, or with --fragments each fragment, its own versions and lock
        self.lanes = [RUN] if args.fragments == 1 else [keys.lane(RUN, f) for f in range(args.fragments)]
        self.kinds_all = KINDS
        common = ["--run", RUN, "--redis-url", self.server.url, "--store", self.store_url]
        self.aggregators = [Service(f"agg{i}", ["aggregator", *common, "--id", f"agg{i}", "--lock-ttl-s", "2"],
                                    self.data / "logs" / f"agg{i}.log") for i in range(2)]
        self.workers = [Service(f"w{i}", ["worker", *common, "--worker-id", f"w{i}", "--heartbeat-interval-s", "0.5",
                                          "--threads", "1", "--device", "cpu",
                                          "--checkpoint-dir", str(self.data / "checkpoints")],
                                self.data / "logs" / f"w{i}.log") for i in range(args.workers)]

    @property
    def services(self) -> list[Service]:
        return self.aggregators + self.workers

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # --- the run -------------------------------------------------------------------------------------

    def run(self) -> int:
        self.server.start()
        r = connect_redis(self.server.url)
        try:
            streaming = {"num_fragments": self.args.fragments, "overlap_steps": self.args.overlap_steps,
                         "merge_alpha": 0.5} \
                if self.args.fragments > 1 else {}
            runs.init_run(r, open_store(self.store_url), RUN, {
                "task": "tiny", "task_options": {"num_samples": self.args.samples}, "seed": self.args.seed,
                "sync_every": self.args.sync_every, "batch_size": 8, "unit_samples": self.args.unit_samples,
                "inner_lr": 0.01, "inner_warmup_steps": 0, **streaming,
                "codec": self.args.codec, "heartbeat_timeout_s": 3.0, "round_timeout_s": ROUND_TIMEOUT_S})
            for s in self.services:
                s.start(self.env)
            self.say(f"started redis-server on {self.server.url}, 2 aggregators, {len(self.workers)} workers; "
                     f"data in {self.data}")
            self.loop(r)
            self.settle(r)
            figures = self.check(r, self.stop_all())
        finally:
            for s in self.services:
                if s.alive:
                    s.kill()
            self.server.stop()
        table = self.table(figures)
        print(table)
        for v in self.violations:
            print(f"VIOLATION: {v}")
        if self.args.out:
            section = "Chaos" if self.args.fragments == 1 else "Chaos (streaming)"
            write_section(Path(self.args.out), section, self.report(table))
            print(f"wrote the {section} section of {self.args.out}")
        return 1 if self.violations else 0

    def loop(self, r: redis.Redis) -> None:
        head, last = 0, "0-0"
        next_fault = self.rng.randint(1, self.args.fault_every)
        progress_at = time.monotonic()
        # Past --versions until every kind of fault has happened at least once, so each is checked.
        while head < self.args.versions or len(self.faults) < len(self.kinds_all):
            if time.monotonic() - progress_at > self.args.stall_s:
                self.violations.append(f"stalled: no version committed for {self.args.stall_s:.0f}s after version "
                                       f"{head}; {self.diagnose(r)}")
                self.say(f"stalled at version {head}")
                return
            self.supervise(r)
            if head >= next_fault and self.inject(r):
                next_fault = head + self.rng.randint(1, self.args.fault_every)
            # with fragments, fragment 0's versions: it syncs last in a cycle, so it is the least advanced
            for _, entries in r.xread({keys.versions(self.lanes[0]): last}, block=300) or []:
                for entry_id, fields in entries:
                    last, head, progress_at = entry_id, max(head, int(fields["version"])), time.monotonic()

    def diagnose(self, r: redis.Redis) -> str:
        """What a stalled run waits for: the open round and the work units of the open epochs."""
        rep = units.report(r, runs.load_config(r, RUN))
        epochs = "; ".join(f"epoch {e['epoch']}: {e['claimed']} claimed, {e['done']} done of {e['total']}, leases "
                           + ",".join(f"{x['unit']}:{x['worker']}" for x in e["leased"]) for e in rep["epochs"])
        states = {w.name: r.hget(keys.worker_stats(RUN, w.name), "state") for w in self.workers}
        rounds = {lane: r.hgetall(keys.round_state(lane)) for lane in self.lanes}
        return f"rounds {rounds}; workers {states}; {epochs}"

    def settle(self, r: redis.Redis, timeout_s: float = 120.0) -> None:
        """Let every killed service come back and finish starting, so the stop at the end is a fair test."""
        deadline = time.monotonic() + timeout_s
        while not self.ready(r):
            if time.monotonic() > deadline:
                self.violations.append(f"services not all running {timeout_s:.0f}s after the last fault")
                return
            self.supervise(r)
            time.sleep(0.2)  # start-up has no event to wait on; poll with a deadline

    def supervise(self, r: redis.Redis) -> None:
        """Restart killed workers whose heartbeat expired; any other exit is a violation (then restarted)."""
        for s in self.services:
            if s in self.pending or s.alive:
                continue
            self.unexpected_exits += 1
            self.violations.append(f"{s.name} exited with status {s.proc.returncode} without being killed; "
                                   f"last lines of {s.log}:\n{s.tail()}")
            self.say(f"{s.name} exited by itself with status {s.proc.returncode}")
            self.pending.append(s)
        for s in list(self.pending):
            if s in self.workers and r.exists(keys.worker_alive(RUN, s.name)):
                continue  # a new session under the same id is refused until the old one's heartbeat expired
            s.start(self.env)
            self.pending.remove(s)
            self.say(f"restarted {s.name}")

    def ready(self, r: redis.Redis) -> bool:
        """Every service is past its start-up (which fails fast, by design, if Redis is down)."""
        if self.pending:
            return False
        for s in self.aggregators:
            if not (s.alive and connected_to(s.proc.pid, self.server.port)):
                return False
        return all(self.worker_ready(r, w) for w in self.workers)

    def worker_ready(self, r: redis.Redis, w: Service) -> bool:
        """Registered and beating: REGISTER sets state 'starting', the first heartbeat replaces it."""
        return (w.alive and w not in self.pending and bool(r.exists(keys.worker_alive(RUN, w.name)))
                and r.hget(keys.worker_stats(RUN, w.name), "state") != "starting")

    def inject(self, r: redis.Redis) -> bool:
        """Inject the next fault of the shuffled rounds of kinds; False if it must wait (Redis: start-ups)."""
        if not self.kinds:
            self.kinds = self.rng.sample(self.kinds_all, len(self.kinds_all))
        kind = self.kinds[0]
        if kind in ("redis", "wipe") and not self.ready(r):
            return False
        workers = [w for w in self.workers if self.worker_ready(r, w)]
        if kind == "worker" and not workers:
            return False
        self.kinds.pop(0)
        time.sleep(self.rng.uniform(0, 1.0))  # land at a random moment of the round
        if kind == "worker":
            victim = self.rng.choice(workers)
            victim.kill()
            self.pending.append(victim)
            self.say(f"SIGKILL worker {victim.name}")
        elif kind == "aggregator":
            holder = (r.get(keys.lock(self.rng.choice(self.lanes))) or ":").partition(":")[2]
            victim = next((a for a in self.aggregators if a.name == holder and a.alive), None)
            victim = victim or self.rng.choice([a for a in self.aggregators if a.alive])
            victim.kill()
            victim.start(self.env)
            self.say(f"SIGKILL aggregator {victim.name}{' (lock holder)' if victim.name == holder else ''}; "
                     "started again")
        elif kind == "wipe":
            self.wipe(r)
        else:
            down = self.rng.uniform(0.5, 3.0)
            self.server.kill()
            time.sleep(down)
            self.server.start()
            self.say(f"SIGKILL redis-server; down {down:.1f}s; started again with its AOF")
        self.faults[kind] += 1
        return True

    def wipe(self, r: redis.Redis) -> None:
        """FLUSHALL with the services running, then `diloco recover`, as an operator would."""
        ds = runs.load_config(r, RUN).dataset_id
        lo, hi = (int(x) for x in r.hmget(keys.units_meta(RUN, ds), "epoch_lo", "epoch_hi"))
        pipe = r.pipeline(transaction=True)  # what the wipe takes, read in the same transaction
        for lane in self.lanes:
            pipe.xrange(keys.deltas(lane))
            pipe.xrange(keys.versions(lane))
        for e in range(lo, hi + 2):
            pipe.zcard(keys.units_leases(RUN, ds, e))
        pipe.flushall()
        out = pipe.execute()
        streams = {lane: (out[2 * i], out[2 * i + 1]) for i, lane in enumerate(self.lanes)}
        for deltas, _ in streams.values():
            self.archive.update(dict(deltas))
        self.leased_at_wipes += sum(out[2 * len(self.lanes):-1])
        down = self.rng.uniform(0.5, 3.0)
        at = ", ".join(str(int(v[-1][1]["version"]) if v else 0) for _, v in streams.values())
        self.say(f"FLUSHALL at version{'s' if len(self.lanes) > 1 else ''} {at}; recover in {down:.1f}s")
        time.sleep(down)
        done = subprocess.run([sys.executable, "-m", "diloco", "recover", "--run", RUN, "--redis-url",
                               self.server.url, "--store", self.store_url], env=self.env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            self.violations.append(f"diloco recover failed with {done.returncode}: {done.stderr[-2000:]}")
            return
        recovered = {lane: runs.read_head(r, lane).version for lane in self.lanes}
        # committed, but after the snapshot
        lost = [f for lane, (_, versions) in streams.items() for _, f in versions
                if int(f["version"]) > recovered[lane]]
        self.units_of_lost_commits += sum(
            len(self.archive[e]["units"].split(",")) for f in lost for e in filter(None, f["entries"].split(",")))
        self.say(f"recovered at version{'s' if len(self.lanes) > 1 else ''} "
                 f"{', '.join(map(str, recovered.values()))}; {len(lost)} later commits lost with the wipe")

    def stop_all(self) -> bool:
        for s in self.services:
            if s.alive:
                s.proc.terminate()
        clean = True
        for s in self.services:
            if s.proc is None or s in self.pending:
                continue
            try:
                rc = s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                rc = s.proc.wait()
            if rc != 0:
                clean = False
                self.violations.append(f"{s.name} exited with {rc} on SIGTERM; last lines:\n{s.tail()}")
        return clean

    # --- the checks ----------------------------------------------------------------------------------

    def check(self, r: redis.Redis, stopped_cleanly: bool) -> dict[str, str]:
        entries, gaps, mismatched = [], 0, []
        for lane in self.lanes:   # every lane's versions once each, each equal to a fault-free replay
            lane_entries = r.xrange(keys.versions(lane))
            entries += lane_entries
            versions = [int(f["version"]) for _, f in lane_entries]
            head = runs.read_head(r, lane).version
            lane_gaps = 0 if versions == list(range(1, head + 1)) else \
                len(set(range(1, head + 1)) ^ set(versions)) or 1
            if lane_gaps:
                self.violations.append(f"versions stream of {lane} {versions} is not 1..{head}, each once")
            gaps += lane_gaps
            rep = replay(r, open_store(self.store_url), lane, self.archive)
            if rep.mismatched:
                self.violations.append(f"versions {rep.mismatched} of {lane} differ from a fault-free replay")
            mismatched += rep.mismatched
        cfg = runs.load_config(r, RUN)
        a = audit(r, cfg, self.archive)
        if a.unresolved:
            self.violations.append(f"committed announcements found nowhere: {a.unresolved[:5]}")
        meta = r.hgetall(keys.units_meta(RUN, cfg.dataset_id))
        lo, hi, n = int(meta["epoch_lo"]), int(meta["epoch_hi"]), int(meta["num_units"])
        lost = sum(len(a.lost(e)) for e in range(lo))
        stuck = 0
        for e in range(lo, hi + 1):
            leased = {int(u) for u in r.zrange(keys.units_leases(RUN, cfg.dataset_id, e), 0, -1)}
            pipe = r.pipeline(transaction=False)
            for b in range(n):
                pipe.getbit(keys.units_claimed(RUN, cfg.dataset_id, e), b)
                pipe.getbit(keys.units_done(RUN, cfg.dataset_id, e), b)
            bits = pipe.execute()
            stuck += sum(1 for b in range(n) if bits[2 * b] and not bits[2 * b + 1] and b not in leased)
        for what, count in (("units committed twice", len(a.twice)), ("units lost in finished epochs", lost),
                            ("done bits that disagree with the commits", len(a.mismatched)),
                            ("units claimed without a lease and not done", stuck)):
            if count:
                self.violations.append(f"{count} {what}")
        tokens = {f["token"] for _, f in entries}
        partial = sum(1 for _, f in entries if int(f["n"]) < len(self.workers))
        return {
            "versions committed" + (f" (all {len(self.lanes)} fragments)" if len(self.lanes) > 1 else ""):
                str(len(entries)),
            **{FAULT_ROWS[k]: str(self.faults[k]) for k in KINDS},
            "version gaps or repeats": str(gaps),
            "replay mismatches": str(len(mismatched)),
            "units committed": str(sum(a.committed.values())),
            "units leased at a wipe": str(self.leased_at_wipes),
            "units of commits lost with a wipe (trained again)": str(self.units_of_lost_commits),
            "finished epochs": str(lo),
            "units lost": str(lost),
            "units committed twice": str(len(a.twice)),
            "done bitmap mismatches": str(len(a.mismatched)),
            "units stuck": str(stuck),
            "unexpected exits": str(self.unexpected_exits),
            "unclean stops": "0" if stopped_cleanly else "1",
            "aggregator tokens used": str(len(tokens)),
            "versions without every worker": str(partial),
            # Version 1's round also spans the start-up of every process, so it is left out.
            "rounds closed at the deadline": str(sum(1 for _, f in entries[1:]
                                                     if float(f["duration_s"]) >= ROUND_TIMEOUT_S)),
            "rejected announcements": str(sum(r.xlen(keys.rejections(lane)) for lane in self.lanes)),
            "wall time (s)": f"{time.monotonic() - self.t0:.0f}",
        }

    def table(self, figures: dict[str, str]) -> str:
        width = max(map(len, figures))
        rows = [f"| {'figure':<{width}} | {'value':>8} |", f"|{'-' * (width + 2)}|{'-' * 9}:|"]
        rows += [f"| {k:<{width}} | {v:>8} |" for k, v in figures.items()]
        return "\n".join(rows)

    def report(self, table: str) -> str:
        a = self.args
        streaming = ["--fragments", str(a.fragments), "--overlap-steps", str(a.overlap_steps), "--sync-every",
                     str(a.sync_every), "--unit-samples", str(a.unit_samples)] if a.fragments > 1 else []
        command = shlex.join([".venv/bin/python", "bench/chaos.py", "--versions", str(a.versions), "--workers",
                              str(a.workers), "--seed", str(a.seed), *streaming, *(["--out", a.out] if a.out else [])])
        if a.fragments > 1:
            return f"""\
The chaos run (section [Chaos](#chaos) describes it) on a streaming run: `num_fragments`
{a.fragments}, `overlap_steps` {a.overlap_steps}, `merge_alpha` 0.5, `sync_every` {a.sync_every}, units of
{a.unit_samples} samples, two aggregator processes (each serving every fragment: one thread per
fragment holds its lock or stands by for it), {a.workers} workers. The faults are worker, aggregator
(the holder of a random fragment's lock) and redis-server kills, and wipes followed by `diloco recover`
(which restores one consistent cut of every fragment). The checks are per fragment: every
fragment's versions committed exactly once and equal to a fault-free replay; and for the run: no
work unit lost or committed twice (each unit is committed by the fragment that synced after it was
trained), the done bitmaps equal the commits, no unit stuck, no unexpected exit, a clean stop.
`--versions` counts fragment 0's.

    {command}

{len(self.workers)} workers, {os.cpu_count()} cores, Python {platform.python_version()}, load average
{" ".join(f"{x:.1f}" for x in os.getloadavg())} at the end.

{table}
"""
        cpu = platform.processor() or platform.machine()
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        return f"""\
`bench/chaos.py` runs the pipeline on one machine (its own redis-server with AOF and `appendfsync
always`, a `file://` store, the tiny task, {a.workers} worker processes with `--checkpoint-dir`, two
aggregator processes with `--lock-ttl-s 2`, `heartbeat_timeout_s` 3, codec {a.codec}, `sync_every`
{a.sync_every}, {a.samples} samples) and, every 1 to {a.fault_every} committed versions, injects one fault,
the kinds in shuffled rounds: SIGKILL a worker (restarted with its checkpoint once its heartbeat
expired), SIGKILL the aggregator holding the lock (started again at once; the standby takes over), or
SIGKILL redis-server (down 0.5 to 3 s, then started on the same port and data directory), or FLUSHALL
under the running services followed by `diloco recover` 0.5 to 3 s later (nothing is restarted; the
units leased at the wipe are free again after the recovery, and a delta trained on them is accepted if
nobody else took them; the commits made after the newest snapshot are lost with the wipe and their
units trained again: the table counts both). Afterwards
it checks that every version was committed exactly once, that every committed version equals a
fault-free replay of the deltas it included (`diloco.replay`), that no work unit was committed twice
or lost in a finished epoch and the done bitmaps equal the commits (`diloco.audit`), that no unit is
left claimed without a lease, and that no service exited unless killed or failed to stop on SIGTERM.
Any violation exits non-zero. The services keep their default `--outage-limit-s` (600 s). A short run
(`--versions 4 --workers 2 --sync-every 100`, smaller units) is `tests/test_faults.py::test_chaos_short`;
the run below is `test_chaos_full`, left out of the default test command (`pytest -m slow`). No test
is marked xfail: a fault the pipeline does not survive fails its test.

    {command}

{len(self.workers)} workers, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load average
{load} at the end (the machine was shared; the wall time depends on it).

{table}
"""


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: children and redis-server are stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=60, help="stop once this many versions are committed")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seeds the faults, their timing and the run")
    ap.add_argument("--fault-every", type=int, default=2, help="a fault every 1 to this many versions")
    ap.add_argument("--sync-every", type=int, default=1000,
                    help="inner steps per round (batch 8): a round of about a second, so faults land in rounds")
    ap.add_argument("--unit-samples", type=int, default=800, help="samples per work unit (10 a round by default)")
    ap.add_argument("--samples", type=int, default=80_000, help="tiny task samples (100 units): epochs finish")
    ap.add_argument("--codec", default="bf16")
    ap.add_argument("--fragments", type=int, default=1,
                    help="streaming: num_fragments (each fragment its own versions and lock)")
    ap.add_argument("--overlap-steps", type=int, default=1, help="streaming: overlap_steps (with --fragments > 1)")
    ap.add_argument("--stall-s", type=float, default=120.0,
                    help="a violation (and the end of the run) if no version commits for this long")
    ap.add_argument("--data-dir", help="Redis data, objects, checkpoints and logs (default: a new temp dir)")
    ap.add_argument("--out", help="write the Chaos section (figures and command) of this markdown file")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.versions < 1 or args.fault_every < 1:
        ap.error("--workers, --versions and --fault-every must be at least 1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return Chaos(args).run()


if __name__ == "__main__":
    sys.exit(main())

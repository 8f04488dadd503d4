"""Benchmark of work units: claim throughput under contention, and exactly-once under random worker kills.

(a) claims: 16 client processes (default) call the CLAIM_UNITS script against one local redis-server
    (`diloco.localserver.RedisServer`) on a dataset of 1M units, claiming 1 unit per call and then 64 per
    call, `--calls` calls per client. Reports calls/s, units/s and the per-call latency p50/p99, once with
    the AOF fsynced on every write (how `diloco run` and compose start Redis) and once without
    persistence (the scripts' own cost).
(b) chaos: a local redis-server + file store, a tiny run on a small dataset (several epochs pass), one
    aggregator and 3 worker processes; every few versions a random worker is SIGKILLed and restarted.
    At the end `diloco.audit` counts the units committed twice and the units of finished epochs that no
    committed delta trained on; the script exits non-zero if either is not 0.

    .venv/bin/python bench/units.py [--clients 16] [--calls 1000] [--versions 150] [--seed 0] [--out FILE]
    .venv/bin/python bench/units.py --only claims|chaos

`--out FILE` appends the tables, under the exact command, to the "Work units" section of FILE
(docs/benchmarks.md), creating the section (or the file) if missing; other sections are left as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diloco import keys  # noqa: E402 (after the path fix, so the script runs from a checkout)
from diloco.localserver import RedisServer  # noqa: E402
from diloco.scripts import CLAIM_UNITS, Scripts  # noqa: E402

SECTION = "Work units"
RUN = "bench"
DATASET = "bench-ds"
LEASE_MS = 3_600_000   # nothing expires during the claim benchmark


# --- (a) claims ------------------------------------------------------------------------------------

def _claimer(url: str, worker: str, want: int, calls: int, barrier, results) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    scripts = Scripts(r)
    meta = keys.units_meta(RUN, DATASET)
    lat: list[float] = []
    units = retries = 0
    barrier.wait()
    start = time.monotonic()
    lo, hi = (int(x) for x in r.hmget(meta, "epoch_lo", "epoch_hi"))
    for _ in range(calls):
        t0 = time.perf_counter()
        got = scripts.claim_units(RUN, DATASET, lo, hi, want, worker, LEASE_MS)
        lat.append(time.perf_counter() - t0)
        if got is None:  # epoch_lo or epoch_hi moved: read them again, as Leases.claim does
            retries += 1
            lo, hi = (int(x) for x in r.hmget(meta, "epoch_lo", "epoch_hi"))
            continue
        units += len(got)
    results.put({"start": start, "end": time.monotonic(), "lat": lat, "units": units, "retries": retries})


def claims(clients: int, calls: int, num_units: int, want: int, appendonly: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-units-") as tmp:
        server = RedisServer(Path(tmp), appendonly=appendonly).start()
        try:
            r = redis.Redis.from_url(server.url, decode_responses=True)
            r.hset(keys.units_meta(RUN, DATASET), mapping={
                "num_units": str(num_units), "unit_samples": "8", "length": str(8 * num_units),
                "epoch_lo": "0", "epoch_hi": "0"})
            for e in (0, 1):  # an epoch in progress has a full-length done bitmap: each claim counts it
                r.setbit(keys.units_done(RUN, DATASET, e), num_units - 1, 0)
            r.script_load(CLAIM_UNITS)
            ctx = mp.get_context("spawn")
            barrier, results = ctx.Barrier(clients), ctx.Queue()
            procs = [ctx.Process(target=_claimer, args=(server.url, f"c{i}", want, calls, barrier, results))
                     for i in range(clients)]
            for p in procs:
                p.start()
            out = [results.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
            server_us = float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
            claimed = [r.bitcount(keys.units_claimed(RUN, DATASET, e)) for e in (0, 1)]
            owners = sum(r.hlen(keys.units_owners(RUN, DATASET, e)) for e in (0, 1))
        finally:
            server.kill()
    lat = sorted(x for o in out for x in o["lat"])
    wall = max(o["end"] for o in out) - min(o["start"] for o in out)
    units = sum(o["units"] for o in out)
    if sum(claimed) != units or owners != units:
        raise SystemExit(f"claim accounting is off: {units} units returned, {claimed} bits set, {owners} owners")
    return {"clients": clients, "want": want, "aof": appendonly, "server_us": server_us, "calls": len(lat),
            "units": units, "wall_s": wall,
            "calls_per_s": len(lat) / wall, "units_per_s": units / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_ms": 1000 * lat[-1], "fill": units / num_units}


def claims_table(rows: list[dict], num_units: int) -> str:
    lines = [f"Claims against one redis-server on a dataset of {num_units:,} units: each client process calls "
             "`CLAIM_UNITS` in a loop; units/s counts units handed out; latency is per call at the client; "
             "server us is Redis' own time per script call (INFO commandstats). The done bitmaps are full length "
             "(nothing done yet), as in an epoch in progress.", "",
             "| persistence | clients | units per call | calls | units | calls/s | units/s | p50 ms | p99 ms | "
             "max ms | server us/call |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {'AOF, fsync always' if row['aof'] else 'none'} | {row['clients']} | {row['want']} | "
                     f"{row['calls']:,} | {row['units']:,} | {row['calls_per_s']:,.0f} | {row['units_per_s']:,.0f} | "
                     f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.1f} | {row['server_us']:.0f} |")
    return "\n".join(lines)


# --- (b) chaos ---------------------------------------------------------------------------------------

def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "diloco", *args], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)


def chaos(versions: int, seed: int, workers: int = 3, kill_every: tuple[int, int] = (2, 5)) -> dict:
    from diloco import runs
    from diloco.audit import audit
    from diloco.store import open_store

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        d = Path(tmp)
        server = RedisServer(d / "redis", appendonly=True).start()
        store_url = (d / "store").as_uri()
        procs: dict[str, subprocess.Popen] = {}
        try:
            r = redis.Redis.from_url(server.url, decode_responses=True)
            settings = {"task": "tiny", "task_options": {"num_samples": 240}, "sync_every": 5, "batch_size": 8,
                        "inner_lr": 0.01, "inner_warmup_steps": 0, "codec": "fp32", "heartbeat_timeout_s": 2.0,
                        "round_timeout_s": 2.0}
            cfg = runs.init_run(r, open_store(store_url), RUN, settings).config
            common = ["--run", RUN, "--redis-url", server.url, "--store", store_url]

            def start_worker(w: str) -> None:
                procs[w] = _spawn(["worker", *common, "--worker-id", w, "--heartbeat-interval-s", "0.5",
                                   "--threads", "1"], d / f"{w}.log")

            procs["aggregator"] = _spawn(["aggregator", *common, "--id", "agg"], d / "aggregator.log")
            ids = [f"w{i}" for i in range(workers)]
            for w in ids:
                start_worker(w)
            t0 = time.monotonic()
            kills, restarts, orphaned, last_id, version, progress = 0, 0, 0, "0-0", 0, t0
            next_kill = rng.randint(*kill_every)
            pending: list[str] = []      # killed, to restart once their alive key has expired
            while version < versions:
                for name, p in procs.items():
                    if p.poll() is not None and name not in pending:
                        tail = (d / f"{name}.log").read_text(errors="replace")[-3000:]
                        raise SystemExit(f"{name} exited with {p.returncode}:\n{tail}")
                for w in list(pending):
                    if not r.exists(keys.worker_alive(RUN, w)):  # else the new session would be refused
                        start_worker(w)
                        pending.remove(w)
                        restarts += 1
                for _, entries in r.xread({keys.versions(RUN): last_id}, block=200) or []:
                    for entry_id, fields in entries:
                        last_id, version = entry_id, int(fields["version"])
                        progress = time.monotonic()
                if time.monotonic() - progress > 120:
                    raise SystemExit(f"no version committed for 120 s (at version {version}); logs in {d}")
                up = [w for w in ids if w not in pending and r.exists(keys.worker_alive(RUN, w))]
                if version >= next_kill and len(pending) < workers - 1 and up:
                    victim = rng.choice(up)  # a worker that has started (not one still importing torch)
                    time.sleep(rng.uniform(0, 0.3))  # land anywhere in the round: claiming, training, waiting
                    procs[victim].send_signal(signal.SIGKILL)
                    procs[victim].wait()
                    lo, hi = (int(x) for x in r.hmget(keys.units_meta(RUN, cfg.dataset_id), "epoch_lo", "epoch_hi"))
                    for e in range(lo, hi + 1):
                        owners = r.hgetall(keys.units_owners(RUN, cfg.dataset_id, e))
                        orphaned += sum(1 for w in owners.values() if w == victim)
                    pending.append(victim)
                    kills += 1
                    next_kill = version + rng.randint(*kill_every)
            elapsed = time.monotonic() - t0
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            a = audit(r, cfg)
            meta = r.hgetall(keys.units_meta(RUN, cfg.dataset_id))
            finished = [e for e in range(int(meta["epoch_hi"]) + 1)
                        if r.bitcount(keys.units_done(RUN, cfg.dataset_id, e)) == a.num_units]
            lost = sum(len(a.lost(e)) for e in finished)
            rejected = [f["reason"] for _, f in r.xrange(keys.rejections(RUN))]
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            server.kill()
    return {"versions": a.versions, "elapsed_s": elapsed, "kills": kills, "restarts": restarts, "orphaned": orphaned,
            "num_units": a.num_units, "epochs": len(finished), "units_committed": sum(a.committed.values()),
            "lost": lost, "twice": len(a.twice), "mismatched": len(a.mismatched),
            "late": sum(1 for x in rejected if x.startswith("late")),
            "unit_rejections": sum(1 for x in rejected if "work unit" in x), "rejections": len(rejected)}


def chaos_table(c: dict) -> str:
    return "\n".join([
        f"Exactly-once under random worker kills: tiny task, {c['num_units']} units per epoch (5 per round), "
        "1 aggregator + 3 worker processes, heartbeat/lease timeout 2 s, round timeout 2 s; a random worker "
        "SIGKILLed every 2-5 versions and restarted once its alive key expired; audit by `diloco.audit`.", "",
        "| versions | wall s | kills | units leased by the killed | restarts | epochs completed | units committed | "
        "late deltas | unit-check rejections | units lost | units committed twice | done bits mismatched |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {c['versions']} | {c['elapsed_s']:.0f} | {c['kills']} | {c['orphaned']} | {c['restarts']} | "
        f"{c['epochs']} | {c['units_committed']:,} | {c['late']} | {c['unit_rejections']} | **{c['lost']}** | "
        f"**{c['twice']}** | {c['mismatched']} |"])


# --- output ------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    server = subprocess.run([RedisServer(Path(tempfile.gettempdir())).binary, "--version"], capture_output=True,
                            text=True).stdout.split()
    version = next((w for w in server if w.startswith("v=")), "v=?")[2:]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), redis-server {version}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; load average at the start {load} (a shared machine)")


def append_to_section(path: Path, body: str) -> None:
    """Append `body` at the end of the `## Work units` section (made if missing); other text stays as it is."""
    intro = "# Benchmarks\n\nMeasured numbers, each under the command that produced it.\n"
    text = path.read_text() if path.exists() else intro
    heading = f"## {SECTION}"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{body.strip()}\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "".join(lines[:end]).rstrip("\n")
        after = "".join(lines[end:])
        text = before + f"\n\n{body.strip()}\n" + ("\n" + after if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["claims", "chaos"], help="run one part only")
    ap.add_argument("--clients", type=int, default=16, help="claiming processes (default %(default)s)")
    ap.add_argument("--calls", type=int, default=1000, help="claim calls per client and mode (default %(default)s)")
    ap.add_argument("--units", type=int, default=1_000_000, help="units in the claim benchmark's dataset")
    ap.add_argument("--versions", type=int, default=150, help="versions the chaos run commits (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    ap.add_argument("--out", type=Path, help="append the tables to the 'Work units' section of this file")
    args = ap.parse_args(argv)
    parts = [f"Machine: {machine()}."]
    failed = False
    if args.only in (None, "claims"):
        rows = [claims(clients, args.calls, args.units, want, aof)
                for aof in (True, False) for want in (1, 64) for clients in (1, args.clients)]
        parts.append(claims_table(rows, args.units))
        print(parts[-1] + "\n", flush=True)
    if args.only in (None, "chaos"):
        c = chaos(args.versions, args.seed)
        parts.append(chaos_table(c))
        print(parts[-1] + "\n", flush=True)
        failed = bool(c["lost"] or c["twice"] or c["mismatched"])
        if failed:
            print(f"FAILED: {c['lost']} units lost, {c['twice']} committed twice, {c['mismatched']} mismatched",
                  file=sys.stderr)
    if args.out:
        command = shlex.join(["python", "bench/units.py", *(sys.argv[1:] if argv is None else argv)])
        append_to_section(args.out, f"```\n$ {command}\n```\n\n" + "\n\n".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

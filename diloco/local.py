"""`diloco run`: the whole pipeline on one machine, no Docker.

Starts a redis-server (AOF on, in the data directory), uses a `file://` store in the same
directory, creates or resumes the run, starts one aggregator and N worker processes, and prints a
line per committed version until the run reaches --max-versions, Ctrl-C or SIGTERM. Everything is
stopped on the way out, in order (workers and the evaluator, then the aggregator, then
redis-server) within --stop-grace-s; running it again with the same --data-dir resumes the run.
Its children stop by themselves if it dies without stopping them (diloco.stopping.tie_to_parent).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from diloco import config as C
from diloco import keys, runs
from diloco.connect import connect_redis
from diloco.datadir import DataDir
from diloco.errors import ConfigError
from diloco.localserver import RedisServer
from diloco.stopping import ENV_STOP_GRACE, GracefulStop, Interrupted, check_grace, child_env, signal_exit_code
from diloco.store import open_store

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_phase: int  # stopped in increasing order: 0 workers and evaluator, 1 the aggregator


def _spawn(children: list[Child], name: str, argv: list[str], env: dict[str, str], data: DataDir,
           stop_phase: int = 0) -> None:
    """Start `diloco <argv>` logging to logs/<name>.log; it joins `children` (and processes.json) at once,
    so a signal right after cannot leave it out of the stop."""
    log = data.path / "logs" / f"{name}.log"
    # A session of its own keeps the terminal's Ctrl-C away from the child: this process decides
    # when and in which order children stop. child_env ties it to this process's life instead.
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "diloco", *argv], env=child_env(env), stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    children.append(Child(name, proc, log, stop_phase))
    data.record(name, proc.pid)


def _stop_all(children: list[Child], server: RedisServer, grace_s: float, hurry: threading.Event) -> None:
    """Workers and evaluator, then the aggregator, each group SIGTERMed and waited for until one
    deadline `grace_s` from now (SIGKILL after it, or at once when `hurry` is set); redis-server last,
    with SHUTDOWN, so the services still reach it while they clean up."""
    deadline = time.monotonic() + grace_s
    for phase in sorted({c.stop_phase for c in children}):
        _stop_group([c for c in children if c.stop_phase == phase], deadline, hurry)
    server.stop(timeout_s=5.0)


def _stop_group(group: list[Child], deadline: float, hurry: threading.Event) -> None:
    for c in group:
        if c.proc.poll() is None:
            c.proc.terminate()
    while any(c.proc.poll() is None for c in group) and time.monotonic() < deadline and not hurry.is_set():
        hurry.wait(0.05)  # several children, one deadline and a second signal: poll them all
    for c in group:
        if c.proc.poll() is None:
            why = "second signal" if hurry.is_set() else "did not stop within the grace"
            console.print(f"[red]{c.name}: {why}; killed[/]")
            c.proc.kill()
        c.proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _clear_stale(r: redis.Redis, run: str, worker_ids: list[str]) -> None:
    """This process owns the local Redis, so any lock or alive key in it is left by a dead process."""
    r.delete(keys.lock(run), *(keys.worker_alive(run, w) for w in worker_ids))


def _progress_line(fields: dict[str, str]) -> str:
    mb = int(fields.get("bytes", 0)) / 1e6
    return (f"version {fields['version']:>4}  loss {float(fields.get('loss', 'nan')):.4f}  "
            f"workers {fields.get('n')}  round {float(fields.get('duration_s', 0)):.1f}s  "
            f"sent {mb:.2f} MB")


def run_local(args: argparse.Namespace, given: dict[str, Any]) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    grace = check_grace(args.stop_grace_s)
    data = DataDir(Path(args.data_dir).resolve())
    log_dir = data.path / "logs"
    init = runs.read_init_weights(args.init_weights) if args.init_weights else None  # bad file: fail first
    server = RedisServer(data.path / "redis", appendonly=True, die_with_parent=True)
    data.lock()
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    hurry = threading.Event()
    # From here on SIGTERM unwinds like Ctrl-C; a signal while stopping kills what is left at once.
    signals = GracefulStop(_interrupt, grace_s=None, on_again=lambda _s: hurry.set()).install()
    # Before the try: if they cannot be cleared, processes.json must stay to name them next time.
    data.clear_left_over(grace, say=lambda line: console.print(f"[yellow]{line}[/]"))
    try:
        console.print(f"[dim]data in {data.path}; redis-server on {server.url}; logs in {log_dir}[/]")
        server.start()
        data.record("redis-server", server.proc.pid)
        return _run(args, given, init, data, server, children, grace)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        console.print(f"\n[yellow]{signal.Signals(signum).name}: stopping workers, evaluator, aggregator and "
                      f"redis-server (at most {grace:g}s; a second signal kills them at once)[/]")
        return signal_exit_code(signum)
    finally:
        signals.begin()
        _stop_all(children, server, grace, hurry)
        data.forget()


def _interrupt(signum: int) -> None:
    raise Interrupted(signum)


def _run(args: argparse.Namespace, given: dict[str, Any], init: Any, data: DataDir, server: RedisServer,
         children: list[Child], grace: float) -> int:
    """Create or resume the run, start its services into `children` and follow it to --max-versions."""
    r = connect_redis(server.url)
    store_url = (data.path / "store").as_uri()
    store = open_store(store_url)
    store.check()
    result = runs.init_run(r, store, args.run, given, init)
    cfg = result.config
    head = runs.read_head(r, cfg.lanes[0])   # with fragments, fragment 0's: it syncs last in each cycle
    what = "created" if result.created else f"resumed at version {head.version}"
    console.print(f"run [bold]{args.run}[/] {what}: task {cfg.task}, H={cfg.sync_every}, "
                  f"codec {cfg.codec}, {args.workers} workers")
    if head.version >= args.max_versions:
        console.print(f"run {args.run} is already at version {head.version} >= --max-versions "
                      f"{args.max_versions}; pass a larger --max-versions to train further")
        return 0
    worker_ids = [f"w{i}" for i in range(args.workers)]
    _clear_stale(r, args.run, worker_ids)
    env = {**os.environ, C.ENV_REDIS_URL: server.url, C.ENV_STORE: store_url, C.ENV_RUN: args.run,
           ENV_STOP_GRACE: str(grace)}
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    # The aggregator stops by itself after the last version, so the run never overshoots it.
    # With fragments the run stops itself (max_versions counts the least advanced fragment's versions).
    rounds = ["--max-rounds", str(args.max_versions - head.version)] if not cfg.is_streaming else []
    _spawn(children, "aggregator", ["aggregator", "--id", "local-aggregator", *rounds], env, data, stop_phase=1)
    _spawn(children, "evaluator", ["eval", "--max-samples", "256"], env, data)
    for w in worker_ids:
        _spawn(children, w, ["worker", "--worker-id", w, "--device", "cpu", "--threads", str(threads),
                             "--checkpoint-dir", str(data.path / "checkpoints")], env, data)
    if sys.stdout.isatty() and not getattr(args, "no_monitor", False):
        from diloco.monitor import alongside  # _follow's lines are held back until the dashboard closes

        return alongside(lambda: _follow(r, cfg.lanes[0], head.version, args.max_versions, children),
                         server.url, args.run, console)
    return _follow(r, cfg.lanes[0], head.version, args.max_versions, children)


def _follow(r: redis.Redis, run: str, version: int, max_versions: int, children: list[Child]) -> int:
    """Print each committed version (of lane `run`: the run, or its fragment 0) and its eval loss until
    max_versions; fail fast if a service dies."""
    last, shown = "0-0", set(r.hkeys(keys.eval_losses(run)))
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        for c in children:
            if c.proc.poll() not in (None, 0):
                console.print(f"[red]{c.name} exited with status {c.proc.returncode}[/]; last lines of {c.log}:")
                console.print(_tail(c.log), markup=False)
                return 1
        for _, entries in r.xread({keys.versions(run): last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                v = int(fields["version"])
                if version < v <= max_versions:
                    version = v
                    console.print(_progress_line(fields))
        evals = r.hgetall(keys.eval_losses(run))
        for v in sorted((k for k in evals if k not in shown), key=int):
            shown.add(v)
            console.print(f"version {v:>4}  [bold]eval loss {float(evals[v]):.4f}[/] (held-out)")
        if str(max_versions) in shown:
            break
        if version >= max_versions and deadline is None:
            deadline = time.monotonic() + 60  # give the evaluator a minute for the last version
    console.print(f"[green]reached version {version}[/]; stopping. Resume with the same command and a "
                  "larger --max-versions.")
    return 0

"""`diloco run`: the whole pipeline on one machine, no Docker.

Starts a redis-server (AOF on, in the data directory), uses a `file://` store in the same
directory, creates or resumes the run, starts one aggregator and N worker processes, and prints a
line per committed version until the run reaches --max-versions or Ctrl-C. Everything is stopped
cleanly on the way out; running it again with the same --data-dir resumes the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from diloco import config as C
from diloco import keys, runs
from diloco.connect import connect_redis
from diloco.errors import ConfigError
from diloco.localserver import RedisServer
from diloco.store import open_store

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


def _spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Child:
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "diloco", *argv], env=env, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Child(name, proc, log)


def _stop_all(children: list[Child], timeout_s: float = 30.0) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    for c in children:
        try:
            c.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
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
    data = Path(args.data_dir).resolve()
    log_dir = data / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    init = runs.read_init_weights(args.init_weights) if args.init_weights else None  # bad file: fail first
    server = RedisServer(data / "redis", appendonly=True)
    store_url = (data / "store").as_uri()
    console.print(f"[dim]data in {data}; redis-server on {server.url}; logs in {log_dir}[/]")
    server.start()
    children: list[Child] = []
    try:
        r = connect_redis(server.url)
        store = open_store(store_url)
        store.check()
        result = runs.init_run(r, store, args.run, given, init)
        cfg = result.config
        head = runs.read_head(r, args.run)
        what = "created" if result.created else f"resumed at version {head.version}"
        console.print(f"run [bold]{args.run}[/] {what}: task {cfg.task}, H={cfg.sync_every}, "
                      f"codec {cfg.codec}, {args.workers} workers")
        if head.version >= args.max_versions:
            console.print(f"run {args.run} is already at version {head.version} >= --max-versions "
                          f"{args.max_versions}; pass a larger --max-versions to train further")
            return 0
        worker_ids = [f"w{i}" for i in range(args.workers)]
        _clear_stale(r, args.run, worker_ids)
        env = {**os.environ, C.ENV_REDIS_URL: server.url, C.ENV_STORE: store_url, C.ENV_RUN: args.run}
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        # The aggregator stops by itself after the last version, so the run never overshoots it.
        children.append(_spawn("aggregator", ["aggregator", "--id", "local-aggregator",
                                              "--max-rounds", str(args.max_versions - head.version)], env, log_dir))
        children.append(_spawn("evaluator", ["eval", "--max-samples", "256"], env, log_dir))
        for w in worker_ids:
            children.append(_spawn(w, ["worker", "--worker-id", w, "--device", "cpu", "--threads", str(threads),
                                       "--checkpoint-dir", str(data / "checkpoints")], env, log_dir))
        if sys.stdout.isatty() and not getattr(args, "no_monitor", False):
            from diloco.monitor import alongside  # _follow's lines are held back until the dashboard closes

            return alongside(lambda: _follow(r, args.run, head.version, args.max_versions, children),
                             server.url, args.run, console)
        return _follow(r, args.run, head.version, args.max_versions, children)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping workers, aggregator and redis-server[/]")
        return 130
    finally:
        _stop_all(children)
        server.stop()


def _follow(r: redis.Redis, run: str, version: int, max_versions: int, children: list[Child]) -> int:
    """Print each committed version and its eval loss until max_versions; fail fast if a service dies."""
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

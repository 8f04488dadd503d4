"""The `diloco` command: thin entry points over the library and the two services.

    diloco run         the whole pipeline on this machine (local redis-server + file store)
    diloco init        create a run (idempotent; refuses changed settings)
    diloco worker      the worker service
    diloco aggregator  the aggregator service
    diloco status      a run's state, as a table or --json
    diloco monitor     the same, live, full screen
    diloco units       work-unit progress per epoch
    diloco eval        the evaluator service (held-out loss per version)
    diloco control     stop, pause, resume, kick, set a tunable setting
    diloco export      the weights of a version as a safetensors file
    diloco gc          retention: delete what the run no longer needs
    diloco recover     rebuild a wiped Redis from the newest snapshot
    diloco acl         Redis users per role

User mistakes and unreachable services exit with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from typing import Any

from diloco import config as C
from diloco import stopping
from diloco.errors import ConfigError, DilocoError

_NOT_FLAGS = {"run", "task_options", "codec_options", "model_hash", "dataset_id", "schema_version", "num_fragments",
              "init_weights"}
EXIT_USAGE, EXIT_FAILURE = 2, 1


def _setting_flags(p: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    """One flag per RunConfig field; unset flags stay None so an existing run's value is adopted."""
    g = p.add_argument_group("run settings (set once per run; workers adopt them)")
    for f in dataclasses.fields(C.RunConfig):
        if f.name in _NOT_FLAGS or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"default {default}")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            g.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=f"default {default}")
    g.add_argument("--init-weights", metavar="PATH", default=None,
                   help="start the run from this safetensors weights file (e.g. from `diloco export`) instead of "
                        "the task's seeded initialisation")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (value parsed as JSON if it can be); repeatable")
    g.add_argument("--codec-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a codec option, e.g. density=0.01 for topk; repeatable")


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(C.RunConfig)
             if f.name not in _NOT_FLAGS and getattr(args, f.name, None) is not None
             and not (args.command == "run" and f.name == "max_versions")}
    if args.task_option:
        given["task_options"] = _key_values("--task-option", args.task_option)
    if args.codec_option:
        given["codec_options"] = _key_values("--codec-option", args.codec_option)
    return given


def _key_values(flag: str, items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _connection_flags(p: argparse.ArgumentParser, *, store: bool = True) -> None:
    p.add_argument("--run", default=os.environ.get(C.ENV_RUN, C.DEFAULT_RUN),
                   help=f"run name (env {C.ENV_RUN}; default %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get(C.ENV_REDIS_URL, C.DEFAULT_REDIS_URL),
                   help=f"Redis URL (env {C.ENV_REDIS_URL}; default {C.DEFAULT_REDIS_URL})")
    if store:
        p.add_argument("--store", default=os.environ.get(C.ENV_STORE),
                       help=f"object store URL, s3://bucket/prefix or file:///dir (env {C.ENV_STORE})")


def _stop_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop-grace-s", type=float, default=None, metavar="S",
                   help=f"on SIGTERM/SIGINT, seconds to finish cleanly before exiting anyway (env "
                        f"{stopping.ENV_STOP_GRACE}; default {stopping.DEFAULT_GRACE_S:g}); a second signal "
                        "exits at once")


def _grace(args: argparse.Namespace) -> float:
    """--stop-grace-s, else the environment's, else the default; read late so a bad env value is a clear error."""
    return stopping.check_grace(args.stop_grace_s) if args.stop_grace_s is not None else stopping.grace_from_env()


def _require_store(args: argparse.Namespace) -> str:
    if not args.store:
        raise ConfigError(f"no object store: pass --store s3://bucket/prefix or file:///dir, or set {C.ENV_STORE}")
    return args.store


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diloco", description="DiLoCo training over Redis and object storage")
    p.add_argument("--log-level", default=os.environ.get("DILOCO_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")
    run.add_argument("--max-versions", type=int, default=5,
                     help="stop once the run has committed this many versions (default %(default)s)")
    run.add_argument("--data-dir", default="diloco-data", help="Redis data, objects and logs (default %(default)s)")
    run.add_argument("--run", default=os.environ.get(C.ENV_RUN, "local"), help="run name (default %(default)s)")
    # --max-versions above is this command's stopping point, not the run's stored budget.
    _setting_flags(run, exclude=frozenset({"max_versions"}))
    run.add_argument("--no-monitor", action="store_true",
                     help="print a line per version instead of the live dashboard (always so when not a terminal)")
    _stop_flag(run)

    monitor = sub.add_parser("monitor", help="a live dashboard of a run in the terminal")
    _connection_flags(monitor, store=False)
    monitor.add_argument("--refresh-s", type=float, default=1.0, help="seconds between refreshes (default %(default)s)")
    monitor.add_argument("--once", action="store_true", help="print one frame and exit (1 if the run cannot be read)")
    _stop_flag(monitor)

    init = sub.add_parser("init", help="create a run (idempotent)")
    _connection_flags(init)
    _setting_flags(init)

    worker = sub.add_parser("worker", help="the worker service")
    _connection_flags(worker)
    worker.add_argument("--worker-id", default=os.environ.get(C.ENV_WORKER_ID),
                        help=f"unique worker id (env {C.ENV_WORKER_ID}; default: the host name)")
    worker.add_argument("--device", default="cuda" if _cuda() else "cpu")
    worker.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    worker.add_argument("--heartbeat-interval-s", type=float, default=2.0)
    worker.add_argument("--max-rounds", type=int, default=None, help="exit after this many rounds")
    worker.add_argument("--checkpoint-dir", default=os.environ.get("DILOCO_CHECKPOINT_DIR"),
                        help="keep inner optimizer state here, so a restarted worker resumes it")
    worker.add_argument("--outage-limit-s", type=float, default=600.0,
                        help="exit once Redis or the store has been unreachable this long")
    _stop_flag(worker)

    agg = sub.add_parser("aggregator", help="the aggregator service")
    _connection_flags(agg)
    agg.add_argument("--id", dest="aggregator_id", default=None, help="aggregator id (default: host-pid)")
    agg.add_argument("--lock-ttl-s", type=float, default=30.0)
    agg.add_argument("--concurrency", type=int, default=8, help="parallel shard downloads")
    agg.add_argument("--max-rounds", type=int, default=None, help="exit after committing this many versions")
    agg.add_argument("--outage-limit-s", type=float, default=600.0,
                     help="exit once Redis or the store has been unreachable this long")
    agg.add_argument("--stall-limit-s", type=float, default=1800.0,
                     help="give the round lock up when this holder's round loop made no progress this long "
                          "(a hung call); a standby takes over (default %(default)s)")
    _stop_flag(agg)

    status = sub.add_parser("status", help="show a run's state")
    _connection_flags(status, store=False)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    acl = sub.add_parser("acl", help="create the worker, aggregator and evaluator Redis users (admin credentials)")
    acl.add_argument("--redis-url", default=os.environ.get(C.ENV_REDIS_URL, C.DEFAULT_REDIS_URL))
    acl.add_argument("--save", action="store_true", help="ACL SAVE afterwards (the server needs an aclfile)")

    ctl = sub.add_parser("control", help="stop, pause, resume, kick a worker, or set a tunable setting")
    _connection_flags(ctl, store=False)
    ctl.add_argument("action", choices=["stop", "pause", "resume", "kick", "set"])
    ctl.add_argument("target", nargs="?", help="the worker id for kick; NAME=VALUE for set")
    ctl.add_argument("--who", default=None, help="recorded in the audit stream (default: user@host)")

    ev = sub.add_parser("eval", help="record the held-out loss of each committed version")
    _connection_flags(ev)
    ev.add_argument("--max-samples", type=int, default=512, help="evaluation samples per version")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--max-rounds", type=int, default=None, help="exit after evaluating this many versions")
    _stop_flag(ev)

    units = sub.add_parser("units", help="work-unit progress per epoch: claimed, done, leases, ETA")
    _connection_flags(units, store=False)
    units.add_argument("--json", action="store_true", help="machine-readable output")

    recover = sub.add_parser("recover", help="rebuild a wiped Redis from the newest state snapshot")
    _connection_flags(recover)
    recover.add_argument("--force", action="store_true", help="replace the run's keys if it exists in Redis")

    export = sub.add_parser("export", help="write a committed version's weights as a plain safetensors file")
    _connection_flags(export)
    export.add_argument("out", metavar="OUT.safetensors", help="the file to write")
    export.add_argument("--version", type=int, default=None, help="the version to export (default: the head)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")

    gc = sub.add_parser("gc", help="delete the objects retention does not keep (keep_last, keep_every, delta_grace_s)")
    _connection_flags(gc)
    gc.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    gc.add_argument("--verbose", "-v", action="store_true", help="list every object and why it goes")
    return p


def _cuda() -> bool:
    return os.environ.get("DILOCO_DEVICE") == "cuda"


def _serve(service: Any, max_rounds: int | None, grace_s: float) -> int:
    """Run a service with SIGTERM/SIGINT as a graceful stop (exit 0), forced with 128+N after
    `grace_s` or at a second signal (diloco.stopping)."""
    from diloco.connect import OUTAGE_ERRORS
    from diloco.errors import Unreachable

    def stop(signum: int) -> None:
        logging.getLogger("diloco").info("%s: stopping after the current step (grace %gs; a second signal "
                                         "exits at once)", signal.Signals(signum).name, grace_s)
        service.stop()

    stopping.GracefulStop(stop, grace_s=grace_s).install()
    try:
        service.run(max_rounds=max_rounds)
    except OUTAGE_ERRORS as e:
        if not service.stop_event.is_set():
            raise
        # Asked to stop while Redis or the store is away (e.g. `diloco run` died and took its
        # redis-server with it): one line, not a traceback; leases, lock and alive key expire by TTL.
        raise Unreachable(f"stopped without releasing what it held, Redis or the store is unreachable: "
                          f"{e}") from None
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from diloco import runs
    from diloco.connect import connect_redis
    from diloco.store import open_store

    store = open_store(_require_store(args))
    store.check()
    init = runs.read_init_weights(args.init_weights) if args.init_weights else None
    result = runs.init_run(connect_redis(args.redis_url), store, args.run, _given_settings(args), init)
    verb = "created" if result.created else "already exists with these settings:"
    print(f"run {args.run} {verb} task {result.config.task}, model {result.config.model_hash}, "
          f"codec {result.config.codec}, sync_every {result.config.sync_every}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker; under torchrun, one rank of it (rank 0 runs the Worker, the others a Follower)."""
    from diloco.errors import RankFailed
    from workers.follower import Follower
    from workers.ranks import Ranks
    from workers.worker import Worker, default_worker_id

    settings = C.WorkerSettings(
        redis_url=args.redis_url, store_url=_require_store(args), run=args.run,
        worker_id=args.worker_id or default_worker_id(), device=args.device,
        heartbeat_interval_s=args.heartbeat_interval_s, threads=args.threads,
        checkpoint_dir=args.checkpoint_dir, outage_limit_s=args.outage_limit_s)
    ranks = Ranks.from_env(args.device)
    try:
        service = Worker(settings, ranks=ranks) if ranks.leader else Follower(settings, ranks)
        return _serve(service, args.max_rounds, _grace(args))
    except RuntimeError as e:
        if not ranks.peer_failure(e):
            raise
        # rank 0 has released its work units and alive key by now (Worker.run's finally)
        raise RankFailed(f"rank {ranks.rank}: another rank of this worker is gone ({str(e).splitlines()[0][:200]}); "
                         "stopping the whole worker") from None
    finally:
        ranks.close()


def cmd_aggregator(args: argparse.Namespace) -> int:
    import socket

    from aggregator.aggregator import Aggregator

    agg_id = args.aggregator_id or f"{socket.gethostname()[:40]}-{os.getpid()}"
    settings = C.AggregatorSettings(
        redis_url=args.redis_url, store_url=_require_store(args), run=args.run,
        aggregator_id=agg_id, lock_ttl_s=args.lock_ttl_s, concurrency=args.concurrency,
        outage_limit_s=args.outage_limit_s, stall_limit_s=args.stall_limit_s)
    return _serve(Aggregator(settings), args.max_rounds, _grace(args))


def cmd_status(args: argparse.Namespace) -> int:
    from diloco.connect import connect_redis
    from diloco.status import snapshot

    snap = snapshot(connect_redis(args.redis_url), args.run)
    if args.json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        from diloco.view import print_status

        print_status(snap)
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    """Passwords come from DILOCO_<ROLE>_REDIS_PASSWORD (or the file named by ..._FILE), never flags."""
    from diloco import acl
    from diloco.connect import connect_redis

    passwords = {}
    for role in acl.ROLES:
        env = f"DILOCO_{role.upper()}_REDIS_PASSWORD"
        value = os.environ.get(env)
        if value is None and os.environ.get(env + "_FILE"):
            with open(os.environ[env + "_FILE"]) as f:
                value = f.read().strip()
        if value:
            passwords[role] = value
    if not passwords:
        raise ConfigError("no passwords: set DILOCO_WORKER_REDIS_PASSWORD, DILOCO_AGGREGATOR_REDIS_PASSWORD and "
                          "DILOCO_EVALUATOR_REDIS_PASSWORD (or *_FILE)")
    acl.apply(connect_redis(args.redis_url), passwords, save=args.save)
    print(f"Redis users ready: {', '.join(sorted(passwords))}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from diloco import control, runs
    from diloco.connect import connect_redis

    r = connect_redis(args.redis_url)
    runs.load_config(r, args.run)  # a clear error for a missing run
    who = args.who or control.default_who()
    if args.action in ("kick", "set") and not args.target:
        raise ConfigError(f"control {args.action} needs a {'worker id' if args.action == 'kick' else 'NAME=VALUE'}")
    if args.action == "kick":
        control.kick(r, args.run, args.target, who)
    elif args.action == "set":
        control.set_setting(r, args.run, args.target, who)
    else:
        new = {"stop": control.STOPPED, "pause": control.PAUSED, "resume": control.RUNNING}[args.action]
        control.set_state(r, args.run, new, who)
    print(f"run {args.run}: {args.action} {args.target or ''}".rstrip() + "; takes effect at the next round")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from diloco.evaluate import Evaluator

    return _serve(Evaluator(args.redis_url, _require_store(args), args.run, max_samples=args.max_samples,
                            device=args.device), args.max_rounds, _grace(args))


def cmd_units(args: argparse.Namespace) -> int:
    from diloco import runs, units
    from diloco.connect import connect_redis

    r = connect_redis(args.redis_url)
    rep = units.report(r, runs.load_config(r, args.run))
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        from diloco.view import print_units

        print_units(rep)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from diloco import snapshot
    from diloco.connect import connect_redis
    from diloco.store import open_store

    store = open_store(_require_store(args))
    store.check()
    version = snapshot.recover(connect_redis(args.redis_url), store, args.run, force=args.force)
    print(f"run {args.run} recovered at version {version}; start the aggregator and workers again")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diloco.connect import connect_redis
    from diloco.export import export
    from diloco.store import open_store

    store = open_store(_require_store(args))
    store.check()
    out = export(connect_redis(args.redis_url), store, args.run, args.out, version=args.version, force=args.force)
    meta = out.metadata
    print(f"exported version {out.version} of run {args.run} to {out.path} ({out.nbytes} bytes, sha256 "
          f"{out.sha256}); task {meta['task']}, model {meta['model_hash']}. Load it with "
          "diloco.export.load_model(path), or safetensors.torch.load_file(path) into "
          "load_task(task, task_options).build_model()")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from diloco import retention, runs
    from diloco.connect import connect_redis
    from diloco.store import open_store

    store = open_store(_require_store(args))
    store.check()
    r = connect_redis(args.redis_url)
    cfg = runs.load_config(r, args.run)
    doomed = retention.plan(r, store, args.run)
    if args.verbose:
        for item in doomed:
            print(f"{item.key}  ({item.reason})")
    summary = (retention.measure if args.dry_run else retention.apply)(store, doomed)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"run {args.run} (keep_last {cfg.keep_last}, keep_every {cfg.keep_every}, "
          f"delta_grace_s {cfg.delta_grace_s:g}): {verb}")
    print("\n".join(summary.lines()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from diloco.local import run_local

    args.stop_grace_s = _grace(args)
    return run_local(args, _given_settings(args))


def cmd_monitor(args: argparse.Namespace) -> int:
    from diloco.monitor import watch

    def leave(signum: int) -> None:  # unwind like Ctrl-C, so the terminal leaves the full-screen mode
        raise stopping.Interrupted(signum)

    with stopping.GracefulStop(leave, grace_s=_grace(args)).installed():
        return watch(args.redis_url, args.run, refresh_s=args.refresh_s, once=args.once)


COMMANDS = {"run": cmd_run, "monitor": cmd_monitor,
            "init": cmd_init, "worker": cmd_worker, "aggregator": cmd_aggregator,
            "status": cmd_status, "units": cmd_units, "eval": cmd_eval, "control": cmd_control, "acl": cmd_acl,
            "recover": cmd_recover, "export": cmd_export, "gc": cmd_gc}


def main(argv: list[str] | None = None) -> int:
    stopping.tie_to_parent()  # first: a child of `diloco run` must not outlive it, even while starting
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"diloco {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DilocoError as e:
        print(f"diloco {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:  # Ctrl-C before a command's own handling, or a command that re-raises it
        return stopping.signal_exit_code(getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    sys.exit(main())

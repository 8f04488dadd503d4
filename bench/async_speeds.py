"""Asynchronous DiLoCo with uneven workers (issue 17's targets), on the convergence benchmark's task.

Every run goes through the real services (the aggregator and W workers as threads of this process,
one redis-server, a `file://` store) from the convergence benchmark's warm start and with its
settings (bench/convergence.py: the gpt task, batch 16, AdamW lr 3e-3 with 50 warmup steps, outer
Nesterov lr 0.7 and momentum 0.9, fp32 deltas), at a constant inner rate (a cooldown is set in
versions, and an async run commits W times as many) and H 25:

* uneven: w0 `--slow`x slower than the others. sync (every round waits for w0) against async + DN
  (`dn_buffer` W) + DyLU, which trains on until `--async-extra` times sync's tokens. Target: async
  reaches sync's final eval loss in at most 1/1.5 of sync's wall time.
* equal: W equal workers; sync against async + DN at the same tokens. Target: within 2%.
* tokens: `aggregation=tokens` against uniform, in sync runs: at equal speeds (within 1%: the same
  algorithm when H is even), and with DyLU and w0 2x slower, so that it trains half the steps
  (tokens better than uniform).

Speeds are set, not measured: each inner step of a worker lasts `--step-s` (w0's: times its factor),
its optimizer step sleeping out what the compute left (a wrapper only this bench installs; the rate
DyLU reads includes it). The compute takes well under `--step-s` here, so wall times reflect the
speeds and the protocol, not the shared CPU; the bench counts the steps whose compute ran over.
Every committed version is evaluated afterwards (held-out loss on 512 samples), outside the wall time.
Losses are judged on the mean of the evaluations in the last quarter of the tokens: at a constant
rate consecutive versions differ by 1.5-3% (docs/benchmarks.md, Convergence).

    .venv/bin/python bench/async_speeds.py [--steps 400] [--step-s 0.1] [--only uneven,equal,tokens] \
                                           [--out docs/benchmarks.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # W workers' OpenMP teams in one process: yield, not spin

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/async_speeds.py` from the root

from aggregator.aggregator import Aggregator  # noqa: E402
from bench import convergence  # noqa: E402
from bench.common import machine_facts, write_section  # noqa: E402
from diloco import keys, runs  # noqa: E402
from diloco.config import AggregatorSettings, WorkerSettings  # noqa: E402
from diloco.connect import connect_redis, server_time_ms  # noqa: E402
from diloco.evaluate import eval_loss  # noqa: E402
from diloco.inprocess import ServiceThread  # noqa: E402
from diloco.localserver import RedisServer  # noqa: E402
from diloco.messages import Head  # noqa: E402
from diloco.store import open_store  # noqa: E402
from diloco.tasks import Task, load_task  # noqa: E402
from workers.worker import Worker  # noqa: E402

log = logging.getLogger("bench.async")
EXPERIMENTS = ("uneven", "equal", "tokens")


@dataclass(frozen=True)
class Case:
    name: str
    experiment: str
    settings: dict
    slow: float = 1.0           # w0's step time over the others'
    tokens_factor: float = 1.0  # token budget over the sync runs'


@dataclass
class Result:
    case: Case
    points: list[tuple[float, int, float]] = field(default_factory=list)  # (s since start, tokens, eval loss)
    versions: int = 0
    wall_s: float = 0.0
    mean_h: str = ""
    overrun: float = 0.0        # share of inner steps whose compute took longer than their set time

    @property
    def final(self) -> float:
        return self.points[-1][2]

    def tail(self, tokens: int | None = None) -> float:
        """Mean eval loss of the versions in the last quarter of the first `tokens` (all by default)."""
        end = tokens or self.points[-1][1]
        return statistics.mean(loss for _, t, loss in self.points if 0.75 * end < t <= end)

    def reached(self, loss: float) -> float | None:
        """Seconds from start to the first version at or below `loss`."""
        return next((s for s, _, x in self.points if x <= loss), None)


def async_settings(args: argparse.Namespace) -> dict:
    """Every async run's settings: DN over the W workers, a grace window, and any --async-set."""
    given = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.async_set)}
    return {"mode": "async", "dn_buffer": args.workers, "max_staleness": 4 * args.workers, "grace_s": args.grace_s,
            **given}


def cases(workers: int, slow: float, extra: float, asyn: dict) -> list[Case]:
    sync = {"min_workers": workers, "round_timeout_s": 600.0}
    return [
        Case("sync, w0 slow", "uneven", sync, slow),
        Case("async + DN + DyLU, w0 slow", "uneven", {**asyn, "dylu": True}, slow, extra),
        Case("sync, equal", "equal", sync),
        Case("async + DN, equal", "equal", asyn),
        Case("sync, tokens, equal", "tokens", {**sync, "aggregation": "tokens"}),
        Case("sync + DyLU, w0 2x slow, uniform", "tokens", {**sync, "dylu": True}, 2.0),
        Case("sync + DyLU, w0 2x slow, tokens", "tokens", {**sync, "dylu": True, "aggregation": "tokens"}, 2.0),
    ]


def pace(worker: Worker, step_s: float, overruns: list[int]) -> None:
    """Make each of `worker`'s inner steps last `step_s`: its optimizer step sleeps out the rest (from
    the step's zero_grad, where the inner loop starts a step). Counts [steps, steps that ran over]."""
    opt = worker.inner.optimizer
    zero_grad, step = opt.zero_grad, opt.step
    began = [0.0]

    def zero_grad_timed(*args, **kwargs):
        began[0] = time.perf_counter()
        return zero_grad(*args, **kwargs)

    def step_paced(*args, **kwargs):
        out = step(*args, **kwargs)
        left = began[0] + step_s - time.perf_counter()
        overruns[0] += 1
        overruns[1] += left < 0
        time.sleep(max(0.0, left))
        return out

    opt.zero_grad, opt.step = zero_grad_timed, step_paced


def given(args: argparse.Namespace, case: Case, tokens: int) -> dict:
    return {"task": "gpt", "seed": args.seed, "sync_every": args.h, "batch_size": args.batch_size,
            "inner_lr": args.inner_lr, "inner_weight_decay": args.weight_decay, "inner_warmup_steps": args.warmup,
            "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum, "codec": "fp32",
            "retention_every": 0, "max_tokens": round(tokens * case.tokens_factor), **case.settings}


def run_case(task: Task, args: argparse.Namespace, case: Case, init: runs.InitWeights, tokens: int) -> Result:
    res = Result(case)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            store_url = (Path(tmp) / "store").as_uri()
            r, store, run = connect_redis(server.url), open_store(store_url), "async-bench"
            runs.init_run(r, store, run, given(args, case, tokens), init)
            agg = Aggregator(AggregatorSettings(server.url, store_url, run, "agg", block_ms=100))
            overruns = [0, 0]
            threads = [ServiceThread(agg, None, "aggregator")]
            for i in range(args.workers):
                w = Worker(WorkerSettings(server.url, store_url, run, f"w{i}", heartbeat_interval_s=0.5,
                                          block_ms=100))
                pace(w, args.step_s * (case.slow if i == 0 else 1.0), overruns)
                threads.append(ServiceThread(w, None, f"worker-w{i}"))
            start_ms = server_time_ms(r)
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            res.versions = threads[0].result(timeout=args.run_timeout_s)  # the token budget ends the run
            res.wall_s = time.perf_counter() - t0
            for t in threads[1:]:
                t.result(timeout=120)
            res.overrun = overruns[1] / max(1, overruns[0])
            entries = [f for _, f in r.xrange(keys.versions(run))]
            steps: dict[str, list[int]] = {}
            for _, f in r.xrange(keys.deltas(run)):
                steps.setdefault(f["worker"], []).append(int(f["inner_steps"]))
            res.mean_h = " / ".join(f"{statistics.mean(v):.1f}" for _, v in sorted(steps.items()))
            evaluate(task, args, res, store, entries, init, start_ms)
            r.close()
        finally:
            server.kill()
    log.info("%s: %d versions in %.1fs, final eval loss %.4f, last quarter %.4f, H %s, %.1f%% steps over time",
             case.name, res.versions, res.wall_s, res.final, res.tail(), res.mean_h, 100 * res.overrun)
    return res


def evaluate(task: Task, args: argparse.Namespace, res: Result, store, entries: list[dict],
             init: runs.InitWeights, start_ms: int) -> None:
    net = runs.build_model(task, args.seed)
    net.load_state_dict(init.state)
    res.points.append((0.0, 0, eval_loss(task, net, max_samples=args.eval_samples)))
    tokens = 0
    for e in entries:
        tokens += int(e["tokens"])
        net.load_state_dict(runs.load_weights(store, Head.from_fields({**e, "deltas_since": "0-0"})))
        res.points.append(((int(e["committed_ms"]) - start_ms) / 1000, tokens,
                           eval_loss(task, net, max_samples=args.eval_samples)))


def pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%"


def tail_gap(results: dict[str, Result], name: str, reference: str) -> float | None:
    """% by which run `name`'s last-quarter mean is above `reference`'s; None unless both ran."""
    if name not in results or reference not in results:
        return None
    return (results[name].tail() / results[reference].tail() - 1) * 100


def report(args: argparse.Namespace, results: dict[str, Result], tokens: int) -> tuple[str, list[str]]:
    rows = ["| run | experiment | w0's step time | versions | tokens | wall s | final eval loss | last-quarter mean "
            "| mean H (w0 / others) | steps over their time |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results.values():
        c = r.case
        rows.append(f"| {c.name} | {c.experiment} | {c.slow:g}x | {r.versions} | {r.points[-1][1]:,} | {r.wall_s:.1f} "
                    f"| {r.final:.4f} | {r.tail():.4f} | {r.mean_h} | {100 * r.overrun:.1f}% |")
    verdicts = []
    if "sync, w0 slow" in results and "async + DN + DyLU, w0 slow" in results:
        s, a = results["sync, w0 slow"], results["async + DN + DyLU, w0 slow"]
        at = a.reached(s.final)
        ratio = f"{at / s.wall_s:.2f}x ({at:.1f} s vs {s.wall_s:.1f} s)" if at is not None else "never"
        verdicts.append(f"uneven: async + DN + DyLU reaches sync's final eval loss {s.final:.4f} in {ratio} of sync's "
                        f"wall time (target at most 0.67x: "
                        f"{'met' if at is not None and at <= s.wall_s / 1.5 else 'not met'}); at sync's tokens its "
                        f"last-quarter mean is {a.tail(tokens):.4f}, {pct(a.tail(tokens), s.tail())} against sync's")
    if (gap := tail_gap(results, "async + DN, equal", "sync, equal")) is not None:
        a, s = results["async + DN, equal"], results["sync, equal"]
        verdicts.append(f"equal: async + DN ends {gap:+.1f}% against sync (last-quarter mean; final "
                        f"{pct(a.final, s.final)}) in {a.wall_s / s.wall_s:.2f}x its wall time (target within 2%: "
                        f"{'met' if abs(gap) <= 2 else 'not met'})")
    if (gap := tail_gap(results, "sync, tokens, equal", "sync, equal")) is not None:
        verdicts.append(f"tokens, even H: {gap:+.2f}% against uniform (target within 1%: "
                        f"{'met' if abs(gap) <= 1 else 'not met'})")
    if (gap := tail_gap(results, "sync + DyLU, w0 2x slow, tokens", "sync + DyLU, w0 2x slow, uniform")) is not None:
        h = results["sync + DyLU, w0 2x slow, tokens"].mean_h.split(" / ")[0]
        verdicts.append(f"tokens, w0 trains {h} of {args.h} steps: {gap:+.2f}% against uniform "
                        f"(target better: {'met' if gap < 0 else 'not met'})")
    return "\n".join(rows), verdicts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=400, help="inner steps per worker of a sync run: its token budget")
    p.add_argument("--h", type=int, default=25, help="sync_every (default 25)")
    p.add_argument("--slow", type=float, default=3.0, help="how many times slower w0 is in 'uneven' (default 3)")
    p.add_argument("--step-s", type=float, default=0.1, help="the set time of one inner step (default 0.1)")
    p.add_argument("--async-extra", type=float, default=1.5,
                   help="the uneven async run's token budget over sync's (default 1.5), so it can reach sync's loss")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--grace-s", type=float, default=1.0,
                   help="the async runs' grace window (default 1.0 s, 40%% of a fast worker's round at the defaults)")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated: " + ", ".join(EXPERIMENTS))
    p.add_argument("--cases", help="comma-separated parts of the names of the runs to make (default: all)")
    p.add_argument("--async-set", action="append", default=[], metavar="KEY=JSON",
                   help="a run setting of every async run, e.g. grace_s=1.0 or outer_lr=0.35 (repeatable)")
    p.add_argument("--warm-steps", type=int, default=300, help="steps of the shared warm start (default 300)")
    p.add_argument("--run-timeout-s", type=float, default=1800.0)
    p.add_argument("--out", type=Path, help="write the section into this markdown file")
    return p


def main() -> None:
    args = parser().parse_args()
    conv = convergence.parser().parse_args(["--warm-steps", str(args.warm_steps)])
    for name in ("seed", "batch_size", "inner_lr", "weight_decay", "warmup", "outer_momentum", "eval_samples"):
        setattr(args, name, getattr(conv, name))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    chosen = args.only.split(",")
    task = load_task("gpt", {})
    tokens = args.workers * args.steps * args.batch_size * task.train_data().tokens_per_sample
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        warm = convergence.warm_start(task, conv, Path(tmp) / "warm.safetensors")
        init = runs.read_init_weights(warm)
    asyn = async_settings(args)
    picked = [c for c in cases(args.workers, args.slow, args.async_extra, asyn) if c.experiment in chosen
              and (not args.cases or any(part in c.name for part in args.cases.split(",")))]
    results = {c.name: run_case(task, args, c, init, tokens) for c in picked}
    table, verdicts = report(args, results, tokens)
    cmd = (f"python bench/async_speeds.py --workers {args.workers} --steps {args.steps} --h {args.h} "
           f"--slow {args.slow:g} --step-s {args.step_s:g} --async-extra {args.async_extra:g} "
           f"--outer-lr {args.outer_lr:g} --grace-s {args.grace_s:g} --only {args.only}"
           + "".join(f" --async-set {kv}" for kv in args.async_set)
           + (f" --cases '{args.cases}'" if args.cases else ""))
    took = (time.perf_counter() - t0) / 60
    body = (f"`{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {took:.1f} min in all): the gpt task "
            f"from the convergence benchmark's warm start, W={args.workers}, H={args.h}, batch {args.batch_size}, "
            f"AdamW lr {args.inner_lr:g} (constant after {args.warmup} warmup steps), outer lr {args.outer_lr:g}, "
            f"momentum {args.outer_momentum:g}, fp32; sync runs train {args.steps} steps per worker ({tokens:,} "
            f"tokens); each inner step lasts {args.step_s:g} s (w0's: times the factor in the table). Async runs: "
            + ", ".join(f"`{k}` {v}" for k, v in asyn.items() if k != "mode")
            + f".\n\n{table}\n\n" + "\n".join(f"* {v}" for v in verdicts) + f"\n\n{machine_facts()}\n")
    print(body)
    if args.out:
        write_section(args.out, "Asynchronous DiLoCo", body)


if __name__ == "__main__":
    main()

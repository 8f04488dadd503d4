"""Asynchronous DiLoCo with uneven workers, at toy size: sync against async (+ Delayed Nesterov, DyLU,
token weights) when one of W workers is `--slow`x slower.

Speeds are set, not measured: each worker sleeps `--step-s` (the slow one `--slow` times that) after
every inner step, through a wrapper around its inner loop that only this bench installs; the tiny
task's own compute is a small fraction of that, so the wall times mostly reflect the speeds and the
protocol, not the (shared, loaded) CPU. Every configuration trains to the same token budget
(`max_tokens`, the run stops itself) on its own redis-server and file store, with all services in
threads of this process; the eval loss is the final version's on the tiny task's held-out split.

    .venv/bin/python bench/async_speeds.py [--workers 4] [--slow 3] [--tokens 6400] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/async_speeds.py` from the root

from aggregator.aggregator import Aggregator  # noqa: E402
from bench.common import machine_facts, write_section  # noqa: E402
from diloco import keys, runs  # noqa: E402
from diloco.config import AggregatorSettings, WorkerSettings  # noqa: E402
from diloco.connect import connect_redis  # noqa: E402
from diloco.evaluate import eval_loss  # noqa: E402
from diloco.inprocess import ServiceThread  # noqa: E402
from diloco.localserver import RedisServer  # noqa: E402
from diloco.store import open_store  # noqa: E402
from diloco.tasks import load_task  # noqa: E402
from workers.worker import Worker  # noqa: E402

RUN = "bench"
BASE = {"task": "tiny", "sync_every": 10, "inner_lr": 0.01, "inner_warmup_steps": 0, "codec": "fp32",
        "batch_size": 8, "heartbeat_timeout_s": 10.0, "task_options": {"num_samples": 4096}}


def configs(workers: int, lr: float) -> dict[str, dict]:
    a = {"mode": "async", "max_staleness": 2 * workers, "outer_lr": lr}
    dn = {**a, "dn_buffer": workers}
    full = {**dn, "dylu": True, "h_min": 2, "aggregation": "tokens"}
    return {
        "sync": {"min_workers": workers, "round_timeout_s": 600.0},
        "async": a,
        "async + DN": dn,
        "async + DN + DyLU + tokens": full,
        "async + DN + DyLU + tokens + inv_sqrt": {**full, "staleness_weight": "inv_sqrt"},
    }


def slowed(worker: Worker, step_s: float) -> None:
    """Make `worker` sleep `step_s` in each inner optimizer step (bench only): inside the step, so the
    rate the worker measures and publishes (steps/s, which DyLU reads) includes it."""
    step = worker.inner.optimizer.step

    def step_slowly(*args, **kwargs):
        out = step(*args, **kwargs)
        time.sleep(step_s)
        return out

    worker.inner.optimizer.step = step_slowly


def one(name: str, settings: dict, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            store_url = (Path(tmp) / "store").as_uri()
            runs.init_run(connect_redis(server.url), open_store(store_url), RUN,
                          {**BASE, **settings, "max_tokens": args.tokens})
            agg = ServiceThread(Aggregator(AggregatorSettings(server.url, store_url, RUN, "agg", block_ms=100)), None)
            ws = []
            for i in range(args.workers):
                w = Worker(WorkerSettings(server.url, store_url, RUN, f"w{i}", heartbeat_interval_s=0.5, block_ms=100))
                slowed(w, args.step_s * (args.slow if i == 0 else 1.0))
                ws.append(ServiceThread(w, None, name=f"w{i}"))
            t0 = time.perf_counter()
            for s in (agg, *ws):
                s.start()
            versions = agg.result(timeout=1800)   # the token budget stops the run
            wall = time.perf_counter() - t0
            for s in ws:
                s.result(timeout=600)
            r = connect_redis(server.url)
            head = runs.read_head(r, RUN)
            task = load_task("tiny", BASE["task_options"])
            model = task.build_model()
            model.load_state_dict(runs.load_weights(open_store(store_url), head))
            loss = eval_loss(task, model)
            steps: dict[str, list[int]] = {}
            for _, f in r.xrange(keys.deltas(RUN)):
                steps.setdefault(f["worker"], []).append(int(f["inner_steps"]))
            mean_h = " / ".join(f"{sum(v) / len(v):.1f}" for _, v in sorted(steps.items()))
        finally:
            server.kill()
    print(f"{name}: {versions} versions, {wall:.1f}s, eval loss {loss:.4f}", flush=True)
    return {"name": name, "versions": versions, "wall_s": wall, "loss": loss, "h": mean_h}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slow", type=float, default=3.0, help="how many times slower worker w0 is")
    p.add_argument("--step-s", type=float, default=0.02, help="sleep after each inner step of a normal worker")
    p.add_argument("--tokens", type=int, default=6400, help="the token budget every configuration trains to")
    p.add_argument("--async-outer-lr", type=float, default=0.7, help="outer lr of the async runs (sync: 0.7)")
    p.add_argument("--out", type=Path, help="write the section into this markdown file")
    args = p.parse_args()
    rows = [one(name, settings, args) for name, settings in configs(args.workers, args.async_outer_lr).items()]
    sync = rows[0]["wall_s"]
    table = ["| configuration | versions | wall s | vs sync | eval loss | mean H (w0 slow / others) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['versions']} | {r['wall_s']:.1f} | {r['wall_s'] / sync:.2f}x | {r['loss']:.4f} "
              f"| {r['h']} |" for r in rows]
    cmd = (f"bench/async_speeds.py --workers {args.workers} --slow {args.slow:g} --step-s {args.step_s:g} "
           f"--tokens {args.tokens} --async-outer-lr {args.async_outer_lr:g}")
    body = (f"`{cmd}`: tiny task, H {BASE['sync_every']}, one worker {args.slow:g}x slower (speeds set by a sleep "
            f"in each inner step), every configuration to the same token budget; outer momentum 0.9, sync outer "
            f"lr 0.7. A toy: it shows the protocol's waiting, not the issue's convergence targets (those need the "
            f"gpt task). Eval loss nan = the run diverged. The losses vary from run to run of this bench (one "
            f"run is shown); the wall times do not.\n\n" + "\n".join(table) + f"\n\n{machine_facts()}\n")
    print(body)
    if args.out:
        write_section(args.out, "Asynchronous DiLoCo (toy)", body)


if __name__ == "__main__":
    main()

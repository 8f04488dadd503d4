"""Streaming DiLoCo (issue 16's targets): time not training, peak bytes per sync event, and quality.

Part `workload` runs the sync benchmark's workload (bench/sync_task.py: 6 x Linear(2048, 2048),
100.7 MB fp32, AdamW lr 1e-4, batch 2, MSE, outer Nesterov lr 0.7 momentum 0.9, fp32 deltas, W workers
(--workload-workers: 2, a core each as on separate machines, and 4, two to a core) with one torch
thread each) through the real services as processes (redis-server, one `diloco
aggregator`, W `diloco worker`, a file:// store), as plain DiLoCo and as streaming with N = 4 (--runs:
by default H = 20, where a fragment syncs every 5 steps, the workload's own H, with tau 1 and 4, and
H = 40 with tau 8, each against plain DiLoCo at the same H). Per worker,
over the intervals after --warmup cycles: the share of wall time not training = 1 - (the announced
`train_s` of each interval) / (wall time from the interval's first step to the next interval's first
step; bench/sync_task.py traces the steps), and the bytes of each sync event (one announcement).

Part `quality` runs the convergence benchmark's task (bench/convergence.py: the gpt task from its warm
start, batch 16, AdamW lr 3e-3, outer lr 0.7 momentum 0.9, fp32) with W workers and the aggregators
as threads of this process: plain DiLoCo against streaming with N in {2, 4}, tau in {1, 5} and alpha
in --alphas, the same H and steps (tokens) each, at each H of --quality (24, where tau 5 is a fifth of
a cycle, and 96, nearer the paper's H = 100). The model is evaluated after every cycle of H
steps (each fragment at that cycle's version, which is every fragment's newest then: fragment 0
syncs last in a cycle). Judged on the mean of the last quarter of the evaluations, as
bench/async_speeds.py does.

    .venv/bin/python bench/streaming.py [--parts workload,quality] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/streaming.py` from the root

import torch  # noqa: E402

from aggregator.aggregator import Lanes  # noqa: E402
from bench import convergence  # noqa: E402
from bench.common import machine_facts, write_section  # noqa: E402
from bench.sync import BATCH, INNER_LR, MU, OUTER_LR, SEED, TASK, Services, read_trace, vm_hwm  # noqa: E402
from diloco import keys, runs  # noqa: E402
from diloco.config import AggregatorSettings, WorkerSettings  # noqa: E402
from diloco.connect import connect_redis  # noqa: E402
from diloco.evaluate import eval_loss  # noqa: E402
from diloco.fragments import join as join_fragments  # noqa: E402
from diloco.inprocess import ServiceThread  # noqa: E402
from diloco.localserver import RedisServer  # noqa: E402
from diloco.messages import Head  # noqa: E402
from diloco.store import open_store  # noqa: E402
from diloco.tasks import Task, load_task  # noqa: E402
from workers.worker import Worker  # noqa: E402

log = logging.getLogger("bench.streaming")
RUN = "stream"


# --- part 1: the sync workload ------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    fragments: int
    tau: int
    h: int = 0
    workers: int = 4
    idle: list[float] = field(default_factory=list)     # per worker: share of wall time not training
    train_step: list[float] = field(default_factory=list)   # per worker: training seconds per inner step
    s_per_step: float = 0.0                              # wall time per inner step, measured intervals
    peak_up: int = 0                                     # the largest sync event (one announcement), bytes
    up_per_event: float = 0.0
    events: int = 0                                      # sync events per worker, whole run
    down_per_event: float = 0.0
    agg_rss: int = 0
    wait_s: float = 0.0                                  # streaming: blocked at merges, per worker (mean)


def run_workload(args: argparse.Namespace, workers: int, name: str, fragments: int, h: int, tau: int) -> Workload:
    res = Workload(name, fragments, tau, h, workers)
    interval = h // fragments
    intervals = args.cycles * fragments
    data = Path(tempfile.mkdtemp(prefix=f"diloco-stream{fragments}-"))
    trace = data / "trace"
    trace.mkdir()
    env = {**os.environ, "DILOCO_LOG_LEVEL": "INFO", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    server = RedisServer(data / "redis", appendonly=True).start()
    services = Services(data, env)
    try:
        store_url = (data / "store").as_uri()
        r = connect_redis(server.url)
        samples = max(1024, 2 * workers * args.cycles * h * BATCH)
        cfg = runs.init_run(r, open_store(store_url), RUN, {
            "task": TASK, "task_options": {"width": args.width, "layers": args.layers, "num_samples": samples,
                                           "trace_dir": str(trace)},
            "seed": SEED, "codec": "fp32", "sync_every": h, "batch_size": BATCH, "inner_lr": INNER_LR,
            "inner_warmup_steps": 0, "outer_lr": OUTER_LR, "outer_momentum": MU, "min_workers": workers,
            "num_fragments": fragments, "overlap_steps": tau, "merge_alpha": args.alpha}).config
        common = ["--run", RUN, "--redis-url", server.url, "--store", store_url]
        agg = services.start("agg", ["aggregator", *common, "--id", "agg"])
        procs = {f"w{i}": services.start(f"w{i}", [
            "worker", *common, "--worker-id", f"w{i}", "--threads", "1", "--device", "cpu",
            "--heartbeat-interval-s", "0.5", "--max-rounds", str(intervals)]) for i in range(workers)}
        deadline = time.monotonic() + args.timeout_s
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not done in {args.timeout_s}s; logs in {data}")
            bad = [w for w, p in procs.items() if p.poll() not in (None, 0)]
            if bad or agg.poll() not in (None, 0):
                raise RuntimeError(f"{name}: {bad or 'the aggregator'} failed; logs in {data}")
            res.agg_rss = max(res.agg_rss, vm_hwm(agg.pid))
            time.sleep(0.2)  # the processes' ends are not events we can wait on together
        services.stop_all()
        anns: dict[str, list[tuple[str, dict]]] = {w: [] for w in procs}
        for lane in cfg.lanes:
            for entry_id, f in r.xrange(keys.deltas(lane)):
                anns[f["worker"]].append((entry_id, f))
        stats = {w: r.hgetall(keys.worker_stats(RUN, w)) for w in procs}
        traces = {w: read_trace(trace / f"{p.pid}.txt")["step"] for w, p in procs.items()}
    finally:
        services.stop_all()
        server.stop()
    walls, trains, sizes = [], [], []
    first = args.warmup * fragments
    for w, entries in anns.items():
        entries.sort(key=lambda e: tuple(int(x) for x in e[0].split("-")))
        steps = traces[w]
        assert len(entries) == intervals and len(steps) == intervals * interval, (w, len(entries), len(steps))
        wall = [steps[(i + 1) * interval] - steps[i * interval] for i in range(first, intervals - 1)]
        train = [float(entries[i][1]["train_s"]) for i in range(first, intervals - 1)]
        res.idle.append(1 - sum(train) / sum(wall))
        res.train_step.append(sum(train) / (len(train) * interval))
        walls += wall
        trains += train
        sizes += [sum(int(s) for s in f["sizes"].split(",")) for _, f in entries]
    res.s_per_step = sum(walls) / (len(walls) * interval)
    res.peak_up, res.up_per_event, res.events = max(sizes), statistics.mean(sizes), intervals
    res.down_per_event = statistics.mean(int(s.get("bytes_received", 0)) for s in stats.values()) / intervals
    res.wait_s = statistics.mean(float(s.get("wait_s_total", 0)) for s in stats.values())
    shutil.rmtree(data, ignore_errors=True)
    log.info("W=%d %s: not training %s, %.3f s/step, peak event %.1f MB",
             workers, name, " / ".join(f"{x:.1%}" for x in res.idle), res.s_per_step, res.peak_up / 1e6)
    return res


def reference(results: list[Workload], res: Workload) -> Workload:
    """The run whose sync event is the bytes reference for `res`: the first run at its W."""
    return next(r for r in results if r.workers == res.workers)


def slowest_idle(res: Workload) -> float:
    """Not training, for the worker that trains slowest: it waits on no other worker's delta, so this
    is the wait for communication alone (the others also wait for it)."""
    return res.idle[res.train_step.index(max(res.train_step))]


def workload_report(results: list[Workload]) -> tuple[str, list[str]]:
    rows = ["| W | run | not training, per worker (min / median / max) | wall s per inner step | bytes per sync event "
            "(peak) | vs plain DiLoCo | sync events per H steps | blocked at merges per worker | training s "
            "per step, fastest / slowest worker | not training, the slowest worker |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        idle, base = sorted(res.idle), reference(results, res)
        rows.append(f"| {res.workers} | {res.name} | {idle[0]:.1%} / {statistics.median(idle):.1%} / {idle[-1]:.1%} | "
                    f"{res.s_per_step:.3f} | {res.peak_up / 1e6:.1f} MB | {res.peak_up / base.peak_up:.3f} | "
                    f"{res.fragments} | {res.wait_s:.1f} s | {min(res.train_step):.3f} / {max(res.train_step):.3f} | "
                    f"{slowest_idle(res):.1%} |")
    verdicts = []
    for res in results:
        if res.fragments == 1:
            continue
        worst, base = max(res.idle), reference(results, res)
        plain = next((p for p in results if p.fragments == 1 and p.h == res.h and p.workers == res.workers), None)
        vs = (f"; plain DiLoCo at H={res.h}: {statistics.median(plain.idle):.1%} not training, "
              f"{res.s_per_step / plain.s_per_step:.2f}x its wall time per step") if plain else ""
        verdicts.append(f"W={res.workers}, {res.name}: peak bytes per sync event "
                        f"{res.peak_up / base.peak_up:.3f} of plain DiLoCo's "
                        f"(target 1/{res.fragments} = {1 / res.fragments:.3f}: "
                        f"{'met' if res.peak_up <= base.peak_up / res.fragments * 1.01 else 'not met'}); "
                        f"not training at most {worst:.1%} of a worker's wall time (target at most 5%: "
                        f"{'met' if worst <= 0.05 else 'not met'}{vs}); the slowest worker (which waits on "
                        f"no other's delta) {slowest_idle(res):.1%}; the fastest worker's training step "
                        f"took {1 - min(res.train_step) / max(res.train_step):.1%} less time than the slowest's")
    return "\n".join(rows), verdicts


# --- part 2: quality on the convergence task --------------------------------------------------------

@dataclass
class Quality:
    name: str
    fragments: int
    tau: int
    points: list[tuple[int, float]] = field(default_factory=list)   # (tokens, eval loss) per cycle
    wall_s: float = 0.0

    def tail(self) -> float:
        end = self.points[-1][0]
        return statistics.mean(loss for t, loss in self.points if 0.75 * end < t <= end)


def run_quality(task: Task, args: argparse.Namespace, init: runs.InitWeights, name: str, fragments: int,
                tau: int, alpha: float) -> Quality:
    res = Quality(name, fragments, tau)
    h = args.quality_h
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            store_url = (Path(tmp) / "store").as_uri()
            r, store = connect_redis(server.url), open_store(store_url)
            cfg = runs.init_run(r, store, RUN, {
                "task": "gpt", "seed": args.seed, "sync_every": h, "batch_size": args.batch_size,
                "inner_lr": args.inner_lr, "inner_weight_decay": args.weight_decay,
                "inner_warmup_steps": args.warmup_steps, "outer_lr": args.outer_lr,
                "outer_momentum": args.outer_momentum,
                "codec": "fp32", "retention_every": 0, "min_workers": args.workers, "round_timeout_s": 600.0,
                "num_fragments": fragments, "overlap_steps": tau, "merge_alpha": alpha}, init).config
            settings = AggregatorSettings(server.url, store_url, RUN, "agg", block_ms=100)
            from aggregator.aggregator import Aggregator

            agg = Lanes(settings) if fragments > 1 else Aggregator(settings)
            threads = [ServiceThread(agg, None, "aggregator")]
            intervals = args.quality_steps // (h // fragments)
            for i in range(args.workers):
                w = Worker(WorkerSettings(server.url, store_url, RUN, f"w{i}", heartbeat_interval_s=0.5,
                                          block_ms=100))
                threads.append(ServiceThread(w, intervals, f"worker-w{i}"))
            t0 = time.perf_counter()
            for t in threads[::-1]:
                t.start()
            for t in threads[1:]:
                t.result(timeout=args.timeout_s)
            res.wall_s = time.perf_counter() - t0
            threads[0].stop(timeout=60)
            per_lane = [{int(f["version"]): f for _, f in r.xrange(keys.versions(lane))} for lane in cfg.lanes]
            net = runs.build_model(task, args.seed)
            net.load_state_dict(init.state)
            res.points.append((0, eval_loss(task, net, max_samples=args.eval_samples)))
            tokens = 0
            for v in range(1, min(len(p) for p in per_lane) + 1):
                state = {}
                for p in per_lane:
                    state.update(runs.load_weights(store, Head.from_fields({**p[v], "deltas_since": "0-0"})))
                tokens += sum(int(p[v]["tokens"]) for p in per_lane)
                net.load_state_dict(join_fragments(state))
                res.points.append((tokens, eval_loss(task, net, max_samples=args.eval_samples)))
            r.close()
        finally:
            server.kill()
    log.info("%s: %d cycles in %.1fs, final eval loss %.4f, last quarter %.4f", name, len(res.points) - 1,
             res.wall_s, res.points[-1][1], res.tail())
    return res


def quality_report(results: list[list[Quality]]) -> tuple[str, list[str]]:
    """One row per run (its repeats side by side); gaps on the mean of the repeats' last-quarter means."""
    def mean_tail(reps: list[Quality]) -> float:
        return statistics.mean(q.tail() for q in reps)

    base = mean_tail(results[0])
    rows = ["| run | cycles | tokens | final eval loss (each repeat) | last-quarter mean (each repeat) | mean | "
            "vs plain DiLoCo |", "|---|---:|---:|---|---|---:|---:|"]
    for reps in results:
        q = reps[0]
        rows.append(f"| {q.name} | {len(q.points) - 1} | {q.points[-1][0]:,} | "
                    f"{' / '.join(f'{r.points[-1][1]:.4f}' for r in reps)} | "
                    f"{' / '.join(f'{r.tail():.4f}' for r in reps)} | {mean_tail(reps):.4f} | "
                    f"{(mean_tail(reps) / base - 1) * 100:+.2f}% |")
    verdicts = []
    for reps in results[1:]:
        gap = mean_tail(reps) / base - 1
        verdicts.append(f"{reps[0].name}: {gap * 100:+.2f}% against plain DiLoCo at the same H, codec and tokens "
                        f"(target at most 1% behind: {'met' if gap <= 0.01 else 'not met'})")
    spread = [abs(a.tail() / b.tail() - 1) * 100 for a, b in zip(results[0], results[0][1:], strict=False)]
    if spread:
        verdicts.append(f"noise: plain DiLoCo's repeats differ by {max(spread):.2f}% (the deltas of a round are summed "
                        "in the order they arrive, so runs differ in their last bits and then drift apart)")
    return "\n".join(rows), verdicts


# --- main ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="workload,quality")
    p.add_argument("--workers", type=int, default=4, help="quality: workers")
    p.add_argument("--workload-workers", default="2,4",
                   help="workload: the worker counts, each with every run of --runs; W=2 gives each worker a core of "
                        "its own (as separate machines would), W=4 puts two on each of the 2 cores")
    p.add_argument("--alpha", type=float, default=0.0, help="workload: merge_alpha of the streaming runs")
    p.add_argument("--runs", default="1:20:0,4:20:1,4:20:4,1:40:0,4:40:8",
                   help="workload: the runs, each N:H:tau (num_fragments, sync_every, overlap_steps); the first is "
                        "the reference for bytes")
    p.add_argument("--cycles", type=int, default=8, help="workload: cycles of H steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="workload: cycles not measured")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--quality", default="24:384,96:768",
                   help="quality: the settings compared, each H:steps (sync_every, inner steps per worker); H/4 must "
                        "exceed tau 5")
    p.add_argument("--warm-steps", type=int, default=300, help="quality: steps of the shared warm start")
    p.add_argument("--alphas", default="0.5,0", help="quality: merge_alpha of the streaming runs")
    p.add_argument("--outer-lr", type=float, default=0.7, help="quality: outer_lr of every run")
    p.add_argument("--repeats", type=int, default=2, help="quality: runs of each setting (their mean is judged)")
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--out", type=Path, help="write the 'Streaming DiLoCo' section of this markdown file")
    return p


def main() -> None:
    args = parser().parse_args()
    conv = convergence.parser().parse_args(["--warm-steps", str(args.warm_steps)])
    for name in ("seed", "batch_size", "inner_lr", "weight_decay", "outer_momentum", "eval_samples"):
        setattr(args, name, getattr(conv, name))
    args.warmup_steps = conv.warmup
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    parts = args.parts.split(",")
    if "workload" in parts:
        t0 = time.perf_counter()
        specs = [tuple(int(x) for x in spec.split(":")) for spec in args.runs.split(",")]
        results = [run_workload(args, w, f"plain DiLoCo, H={h}" if n == 1 else f"streaming N={n}, H={h}, tau={t}",
                                n, h, t)
                   for w in map(int, args.workload_workers.split(",")) for n, h, t in specs]
        table, verdicts = workload_report(results)
        cmd = (f"python bench/streaming.py --parts workload --workload-workers {args.workload_workers} --runs "
               f"{args.runs} --cycles {args.cycles}")
        _write(args, "Streaming DiLoCo", cmd, t0,
               f"The sync benchmark's workload with W={args.workload_workers} workers, {args.cycles} cycles of H "
               f"steps per worker, the "
               f"first {args.warmup} not measured; alpha {args.alpha:g}; aggregator peak RSS "
               f"{max(r.agg_rss for r in results) / 2**30:.2f} GiB.\n\n{table}\n\n"
               + "\n".join(f"* {v}" for v in verdicts))
    if "quality" in parts:
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        task = load_task("gpt", {})
        with tempfile.TemporaryDirectory() as tmp:
            init = runs.read_init_weights(convergence.warm_start(task, conv, Path(tmp) / "warm.safetensors"))
        texts = []
        for setting in args.quality.split(","):
            args.quality_h, args.quality_steps = (int(x) for x in setting.split(":"))
            specs = [("plain DiLoCo", 1, 0, 0.0)] + [(f"streaming N={n}, tau={t}, alpha={a:g}", n, t, a)
                                                      for a in map(float, args.alphas.split(",")) for n in (2, 4)
                                                      for t in (1, 5)]
            results_q = [[run_quality(task, args, init, *spec) for _ in range(args.repeats)] for spec in specs]
            table, verdicts = quality_report(results_q)
            texts.append(f"**H={args.quality_h}**, {args.quality_steps} inner steps per worker:\n\n{table}\n\n"
                         + "\n".join(f"* {v}" for v in verdicts))
        cmd = (f"python bench/streaming.py --parts quality --workers {args.workers} --quality {args.quality} "
               f"--alphas {args.alphas} --repeats {args.repeats} --outer-lr {args.outer_lr:g}")
        _write(args, "Streaming DiLoCo: quality", cmd, t0,
               f"The convergence benchmark's gpt task from its warm start, W={args.workers}, batch "
               f"{args.batch_size}, AdamW lr {args.inner_lr:g}, outer lr {args.outer_lr:g} momentum "
               f"{args.outer_momentum:g}, fp32; eval loss on {args.eval_samples} held-out samples after every cycle; "
               f"{args.repeats} runs of each.\n\n" + "\n\n".join(texts))


def _write(args: argparse.Namespace, heading: str, cmd: str, t0: float, text: str) -> None:
    took = (time.perf_counter() - t0) / 60
    body = (f"`{cmd} --out docs/benchmarks.md` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{took:.1f} min; {machine_facts()})\n\n{text}\n")
    print(body)
    if args.out:
        write_section(args.out, heading, body)


if __name__ == "__main__":
    main()

"""Sync round: how long a diloco worker waits for a round, against a plain gloo all-reduce DiLoCo.

The workload (bench/sync_task.py): a Sequential of --layers x Linear(--width, --width) with ReLU
between them (6 x 2048: 25,178,112 fp32 parameters, 100.7 MB); W workers, one torch thread each;
AdamW lr 1e-4, H = 5 inner steps of batch 2 on seeded random data, MSE; outer Nesterov SGD lr 0.7,
momentum 0.9; codec fp32.

diloco runs through the real services: its own redis-server (AOF, appendfsync always, as `diloco run`),
a file:// store (and with `--stores file,s3` an S3 store on a moto_server), `diloco init`, one
`diloco aggregator` process and W `diloco worker --threads 1` processes, each worker with --max-rounds.
The reference is W processes on 127.0.0.1 with torch.distributed (gloo) that train H steps, all_reduce
the flat fp32 pseudo-gradient, and apply the same Nesterov outer step locally.

Worker wait = from the end of a worker's last inner step of a round to the start of its first inner
step of the next round, for the worker that finished training last in that round; the median over
the rounds after --warmup warm-up rounds (also min and max). For diloco the times come from the task
(start of each inner step, model loads: bench/sync_task.py traces them) and from what the product
records (the announcement's `train_s` and stream id, the commit's `committed_ms`, `reduce_s`); the
product code is not changed. A separate short run profiles the aggregator and one worker with
cProfile (--profile-rounds; 0 = off).

    .venv/bin/python bench/sync.py [--workers 2,4,8] [--stores file,s3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/sync.py` from the root

import torch  # noqa: E402

from bench.common import machine_facts, write_section  # noqa: E402
from bench.sync_task import make_task  # noqa: E402

RUN = "sync"
TASK = "bench.sync_task:make_task"
H, BATCH, INNER_LR, OUTER_LR, MU, SEED = 5, 2, 1e-4, 0.7, 0.9, 0


def vm_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stats3(xs: list[float]) -> tuple[float, float, float]:
    return (min(xs), statistics.median(xs), max(xs)) if xs else (float("nan"),) * 3


@dataclass
class Result:
    system: str
    workers: int
    waits: list[float]
    up: float = 0.0        # bytes per worker per round
    down: float = 0.0
    down_after_first: float = 0.0   # per round after a worker's first (a full download of version 0)
    agg_rss: int = 0
    worker_rss: int = 0
    stages: dict[str, list[float]] = field(default_factory=dict)   # seconds, for the last worker of each round
    note: str = ""


# ---- diloco through the real services -------------------------------------------------------------

class Services:
    def __init__(self, data: Path, env: dict[str, str]) -> None:
        self.data, self.env = data, env
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], profile: Path | None = None) -> subprocess.Popen:
        prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + ["-m", "diloco"]
        with open(self.data / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(prefix + argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Moto:
    def __init__(self, data: Path) -> None:
        from diloco.localserver import free_port

        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(data / "moto.log", "wb") as log:
            self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start; see {data / 'moto.log'}") from None
                time.sleep(0.05)  # startup has no event to wait on

    def bucket(self) -> str:
        import boto3

        name = f"sync-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}/diloco"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def task_options(args: argparse.Namespace, workers: int, rounds: int, trace_dir: Path) -> dict:
    samples = max(1024, 2 * workers * rounds * H * BATCH)
    return {"width": args.width, "layers": args.layers, "num_samples": samples, "trace_dir": str(trace_dir)}


def run_diloco(args: argparse.Namespace, store_kind: str, workers: int, rounds: int,
               profile_dir: Path | None = None, codec: str = "fp32", moved: list[Result] | None = None) -> Result:
    from diloco import keys, runs
    from diloco.connect import connect_redis
    from diloco.localserver import RedisServer
    from diloco.store import open_store

    data = Path(tempfile.mkdtemp(prefix=f"diloco-sync-{store_kind}{workers}-"))
    trace = data / "trace"
    trace.mkdir()
    env = {**os.environ, "DILOCO_LOG_LEVEL": "INFO", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("DILOCO_CRASH_AT", None)
    server = RedisServer(data / "redis", appendonly=True).start()
    moto = None
    services = Services(data, env)
    try:
        if store_kind == "s3":
            for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                         ("AWS_DEFAULT_REGION", "us-east-1")):
                env.setdefault(k, v)
                os.environ.setdefault(k, v)
            moto = Moto(data)
            env["DILOCO_S3_ENDPOINT"] = os.environ["DILOCO_S3_ENDPOINT"] = moto.endpoint
            store_url = moto.bucket()
        else:
            store_url = (data / "store").as_uri()
        r = connect_redis(server.url)
        runs.init_run(r, open_store(store_url), RUN, {
            "task": TASK, "task_options": task_options(args, workers, rounds, trace), "seed": SEED,
            "codec": codec, "sync_every": H, "batch_size": BATCH, "inner_lr": INNER_LR, "inner_warmup_steps": 0,
            "outer_lr": OUTER_LR, "outer_momentum": MU, "min_workers": workers})
        common = ["--run", RUN, "--redis-url", server.url, "--store", store_url]
        agg_argv = ["aggregator", *common, "--id", "agg"]
        if profile_dir:
            agg_argv += ["--max-rounds", str(rounds)]
        agg = services.start("agg", agg_argv, profile_dir / "agg.prof" if profile_dir else None)
        procs = {}
        for i in range(workers):
            wid = f"w{i}"
            argv = ["worker", *common, "--worker-id", wid, "--threads", "1", "--device", "cpu",
                    "--heartbeat-interval-s", "0.5", "--max-rounds", str(rounds)]
            procs[wid] = services.start(wid, argv, profile_dir / "worker.prof" if profile_dir and i == 0 else None)
        peak_agg = peak_w = 0
        deadline = time.monotonic() + args.timeout_s
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"diloco {store_kind} W={workers}: not done in {args.timeout_s}s; logs in {data}")
            for wid, p in procs.items():
                if p.poll() not in (None, 0):
                    raise RuntimeError(f"worker {wid} exited with {p.returncode}; see {data / (wid + '.log')}")
            if agg.poll() not in (None, 0):
                raise RuntimeError(f"the aggregator exited with {agg.returncode}; see {data / 'agg.log'}")
            peak_agg = max(peak_agg, vm_hwm(agg.pid))
            peak_w = max([peak_w] + [vm_hwm(p.pid) for p in procs.values()])
            time.sleep(0.2)  # the processes' ends are not events we can wait on together
        peak_agg = max(peak_agg, vm_hwm(agg.pid))
        if profile_dir:
            agg.wait(60)
        services.stop_all()
        anns: dict[str, list[dict]] = {w: [] for w in procs}
        for entry_id, f in r.xrange(keys.deltas(RUN)):
            if f.get("worker") in anns:
                anns[f["worker"]].append({"ms": int(entry_id.split("-")[0]), "version": int(f["version"]),
                                          "train_s": float(f["train_s"]),
                                          "bytes": sum(int(s) for s in f["sizes"].split(","))})
        versions = {int(f["version"]): f for _, f in r.xrange(keys.versions(RUN))}
        stats = {w: r.hgetall(keys.worker_stats(RUN, w)) for w in procs}
        traces = {w: read_trace(trace / f"{p.pid}.txt") for w, p in procs.items()}
        first = open_store(store_url).size(keys.weights_object(RUN, 0, 0))
        if moved is not None:  # the same bytes through the same store, nothing else (the S3 reference)
            moved.append(move_bytes(store_url, workers, rounds, args.warmup,
                                    statistics.median(a["bytes"] for w in anns for a in anns[w]), versions))
    finally:
        services.stop_all()
        server.stop()
        if moto is not None:
            moto.stop()
    system = f"diloco {store_kind}" + (f" {codec}" if codec != "fp32" else "")
    res = timeline(system, workers, rounds, args.warmup, anns, versions, traces)
    res.up = statistics.mean(int(s.get("bytes_sent", 0)) for s in stats.values()) / rounds
    res.down = statistics.mean(int(s.get("bytes_received", 0)) for s in stats.values()) / rounds
    # After a worker's first round (the full weights of version 0) it reads the published update, if any.
    res.down_after_first = statistics.mean((int(s.get("bytes_received", 0)) - first) / (rounds - 1)
                                           for s in stats.values())
    res.agg_rss, res.worker_rss = peak_agg, peak_w
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return res


def move_bytes(store_url: str, workers: int, rounds: int, warmup: int, delta_bytes: float, versions) -> Result:
    """The round's object traffic alone, through the same store at the product's concurrency: W workers
    PUT their delta's shards (each up to 8 at once), the aggregator GETs them all (16 at once) and PUTs
    the weights and momentum side by side, then the W workers GET the weights. Seconds per round."""
    from concurrent.futures import ThreadPoolExecutor

    from diloco.shards import max_shard_object_bytes
    from diloco.store import open_store

    shard = max_shard_object_bytes(64 * 2**20) - 4096
    sizes = [shard] * int(delta_bytes // shard) + ([int(delta_bytes % shard)] if delta_bytes % shard else [])
    model_bytes = int(versions[1]["bytes"]) // int(versions[1]["n"])  # fp32: the delta is the model's size
    bodies = {n: bytes(n) for n in {*sizes, model_bytes}}
    clients = [open_store(store_url) for _ in range(workers)]
    agg = open_store(store_url)
    res = Result("moving the same bytes (s3)", workers, [])
    with ThreadPoolExecutor(max_workers=workers * 8 + 16) as pool, ThreadPoolExecutor(max_workers=16) as fetch:
        for k in range(rounds - 1):
            t0 = time.perf_counter()
            shards = [(c, f"move/r{k}/w{i}/{j}", n) for i, c in enumerate(clients) for j, n in enumerate(sizes)]
            for f in [pool.submit(c.put, key, bodies[n]) for c, key, n in shards]:
                f.result()
            list(fetch.map(agg.get, [key for _, key, _ in shards]))
            for f in [pool.submit(agg.put, f"move/r{k}/{name}", bodies[model_bytes]) for name in ("w", "m")]:
                f.result()
            for f in [pool.submit(c.get, f"move/r{k}/w") for c in clients]:
                f.result()
            if k >= warmup:
                res.waits.append(time.perf_counter() - t0)
    return res


def read_trace(path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"step": [], "load_start": [], "load_end": []}
    for line in path.read_text().splitlines():
        event, t = line.split()
        out[event].append(float(t))
    return out


def timeline(system: str, workers: int, rounds: int, warmup: int, anns, versions, traces) -> Result:
    """Worker waits and the last worker's stages, per round after the warm-up (see the module doc)."""
    res = Result(system, workers, [])
    for k in range(warmup, rounds - 1):
        ends = {}
        for w, tr in traces.items():
            a = anns[w][k]
            ends[w] = tr["step"][k * H] + a["train_s"]
        last = max(ends, key=ends.get)
        tr, a = traces[last], anns[last][k]
        start_next = tr["step"][(k + 1) * H]
        commit = int(versions[a["version"] + 1]["committed_ms"]) / 1000
        v = versions[a["version"] + 1]
        res.waits.append(start_next - ends[last])
        stage = {
            "train end -> announced (delta, encode, upload, XADD)": a["ms"] / 1000 - ends[last],
            "announced -> committed (round closes, aggregator reduces, steps, writes, commits)":
                commit - a["ms"] / 1000,
            "  of which fetch+decode+reduce (reduce_s)": float(v["reduce_s"]),
            "committed -> load starts (notice, claim, download, decode)": tr["load_start"][k + 1] - commit,
            "load_state_dict": tr["load_end"][k + 1] - tr["load_start"][k + 1],
            "load ends -> first inner step": start_next - tr["load_end"][k + 1],
        }
        for name, s in stage.items():
            res.stages.setdefault(name, []).append(s)
    return res


# ---- the gloo reference ---------------------------------------------------------------------------

def gloo_rank(args: argparse.Namespace) -> None:
    """One rank of the reference: H AdamW steps, all_reduce(delta) / W, Nesterov outer step, repeat."""
    import torch.distributed as dist
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.set_num_threads(1)
    rank, world = args.gloo_rank, args.gloo_world
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.gloo_port}", rank=rank, world_size=world)
    task = make_task(width=args.width, layers=args.layers, num_samples=max(1024, 2 * world * args.gloo_rounds * H
                                                                             * BATCH))
    torch.manual_seed(SEED)
    model = task.build_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=INNER_LR, weight_decay=0.1, betas=(0.9, 0.95))
    data = task.train_data()
    glob = parameters_to_vector(params).detach().clone()
    mom = torch.zeros_like(glob)
    starts, ends, reduce_s = [], [], []
    n = len(data)
    for k in range(args.gloo_rounds):
        starts.append(time.time())
        for s in range(H):
            base = ((k * world + rank) * H + s) * BATCH
            batch = data.batch([(base + i) % n for i in range(BATCH)])
            opt.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            opt.step()
        ends.append(time.time())
        with torch.no_grad():
            delta = glob - parameters_to_vector(params)
            t = time.perf_counter()
            dist.all_reduce(delta)
            reduce_s.append(time.perf_counter() - t)
            delta /= world
            mom.mul_(MU).add_(delta)
            glob.sub_(OUTER_LR * (delta + MU * mom))
            vector_to_parameters(glob, params)
    dist.barrier()
    Path(args.gloo_out).write_text(json.dumps({"starts": starts, "ends": ends, "reduce_s": reduce_s,
                                              "rss": vm_hwm(os.getpid())}))
    dist.barrier()   # every rank has written its figures
    # Not destroy_process_group: rank 0 hosts the TCPStore, and tearing it down while another rank still
    # tears down its own now and then aborts the process ("terminate called without an active exception",
    # a CI failure); the figures are on disk, so leave without running the C++ destructors.
    os._exit(0)


def run_gloo(args: argparse.Namespace, workers: int, rounds: int) -> Result:
    from diloco.localserver import free_port

    data = Path(tempfile.mkdtemp(prefix=f"diloco-sync-gloo{workers}-"))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--gloo-rank", str(i), "--gloo-world",
                               str(workers), "--gloo-port", str(port), "--gloo-rounds", str(rounds),
                               "--gloo-out", str(data / f"{i}.json"), "--width", str(args.width),
                               "--layers", str(args.layers)], env=env, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(data / f"{i}.log", "wb"))  # noqa: SIM115
             for i in range(workers)]
    try:
        for i, p in enumerate(procs):
            if p.wait(args.timeout_s) != 0:
                raise RuntimeError(f"gloo rank {i} exited with {p.returncode}: "
                                   f"{(data / f'{i}.log').read_text()[-2000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [json.loads((data / f"{i}.json").read_text()) for i in range(workers)]
    res = Result("gloo all-reduce", workers, [])
    for k in range(args.warmup, rounds - 1):
        last = max(range(workers), key=lambda i: out[i]["ends"][k])
        res.waits.append(out[last]["starts"][k + 1] - out[last]["ends"][k])
        res.stages.setdefault("all_reduce", []).append(out[last]["reduce_s"][k])
    nbytes = sum(p.numel() * 4 for p in make_task(width=args.width, layers=args.layers).build_model().parameters())
    res.up = res.down = 2 * (workers - 1) / workers * nbytes  # a ring all-reduce's figure: not measured
    res.worker_rss = max(o["rss"] for o in out)
    res.note = "bytes: a ring all-reduce's 2(W-1)/W x model, not measured"
    shutil.rmtree(data, ignore_errors=True)
    return res


# ---- the profile ------------------------------------------------------------------------------------

AGG_ROWS = [
    ("aggregator/aggregator.py", "_round", "whole round (collect included)"),
    ("aggregator/collect.py", "collect", "collect: wait for the round to close"),
    ("diloco/runs.py", "load_weights", "read + decode the head's weights"),
    ("diloco/runs.py", "load_momentum", "read + decode the head's momentum"),
    ("diloco/reduce.py", "add", "fetch+decode+reduce, each delta as it is accepted (inside collect)"),
    ("_base.py", "result", "  waiting on reads in threads (shard downloads; a streamed shard's next chunk)"),
    ("diloco/shards.py", "stream_shard", "  fp32 (streamed): check each shard and add it a block at a time"),
    ("diloco/shards.py", "read_into", "    take the next block from the chunks read"),
    ("diloco/shards.py", "_check_finite", "    finite check + squared norm of each block"),
    ("diloco/shards.py", "add_shard", "  other codecs: parse + check shards"),
    ("diloco/shards.py", "norm", "  norm check (summed from the shards' checks)"),
    ("diloco/shards.py", "add_to", "  other codecs: add to the accumulator"),
    ("diloco/shards.py", "unflatten", "  unflatten the mean"),
    ("aggregator/aggregator.py", "_step_and_commit", "step + write + commit + snapshot + retention"),
    ("diloco/outer.py", "outer_step_", "  outer Nesterov step (in place)"),
    ("diloco/model.py", "to_parts", "  serialize weights + momentum (header + views)"),
    ("diloco/store.py", "put_idempotent", "  write weights + momentum"),
    ("diloco/scripts.py", "commit", "  commit script"),
    ("aggregator/aggregator.py", "_snapshot", "  snapshot"),
    ("aggregator/aggregator.py", "_retention", "  retention"),
]
WORKER_ROWS = [
    ("workers/worker.py", "_one_round", "whole round"),
    ("workers/worker.py", "_train_round", "train H steps + delta + encode + upload"),
    ("torch/optim/optimizer.py", "wrapper", "  AdamW steps"),
    ("diloco/shards.py", "flat_delta", "  delta = global - local"),
    ("workers/worker.py", "_upload", "  encode + upload"),
    ("diloco/shards.py", "encode_delta_parts", "    encode"),
    ("diloco/shards.py", "l2_norm", "    norm"),
    ("workers/worker.py", "_wait_for_version_after", "wait for the next version"),
    ("workers/worker.py", "_claim", "claim work units"),
    ("workers/worker.py", "_sync_to", "download + decode + load"),
    ("diloco/runs.py", "load_weights_counted", "  read + decode the weights"),
    ("bench/sync_task.py", "load_state_dict", "  load_state_dict"),
]


def profile_table(path: Path, rows: list[tuple[str, str, str]], rounds: int) -> str:
    st = pstats.Stats(str(path))
    lines = ["| stage | function | calls | cumulative s per round |", "|---|---|---:|---:|"]
    for suffix, func, label in rows:
        hits = [(k, v) for k, v in st.stats.items() if k[0].endswith(suffix) and k[2] == func]  # type: ignore[attr-defined]
        if not hits:
            continue
        _, top = max(hits, key=lambda kv: kv[1][3])
        calls, cum = top[1], top[3]
        indent = "&nbsp;&nbsp;" * ((len(label) - len(label.lstrip())) // 2)
        lines.append(f"| {indent}{label.strip()} | `{func}` | {calls} | {cum / rounds:.3f} |")
    return "\n".join(lines)


# ---- the page ---------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def results_table(results: list[Result], gloo: dict[int, Result]) -> str:
    lines = ["| system | W | worker wait min / median / max (s) | ratio to gloo (median) | up / worker / round | "
             "down / worker / round | aggregator peak RSS | worker peak RSS |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lo, med, hi = stats3(r.waits)
        ref = gloo.get(r.workers)
        ratio = f"{med / statistics.median(ref.waits):.1f}x" if ref and ref.waits and r is not ref else "1.0x"
        agg = f"{r.agg_rss / 2**20:.0f} MiB" if r.agg_rss else "-"   # its target is in MiB (issue 15)
        wrss = f"{r.worker_rss / 2**30:.2f} GiB" if r.worker_rss else "-"
        lines.append(f"| {r.system} | {r.workers} | {lo:.2f} / {med:.2f} / {hi:.2f} | {ratio} | {fmt_bytes(r.up)} | "
                     f"{fmt_bytes(r.down)} | {agg} | {wrss} |")
    return "\n".join(lines)


def move_table(results: list[Result], moved: list[Result]) -> str:
    """The S3 run's wait against moving its bytes alone (module doc of move_bytes)."""
    s3 = next((r for r in results if r.system == "diloco s3"), None)
    if s3 is None or not moved:
        return ""
    m = moved[0]
    ratio = statistics.median(s3.waits) / statistics.median(m.waits)
    lo, med, hi = stats3(m.waits)
    return (f"S3 reference: the same round's PUTs and GETs alone against the same moto_server (W={m.workers} "
            f"workers PUT their delta's shards, 8 at once each; one client GETs them all, 16 at once, and PUTs "
            f"weights and momentum side by side; the W workers GET the weights): {lo:.2f} / {med:.2f} / {hi:.2f} s "
            f"per round (min / median / max); the diloco S3 wait is **{ratio:.2f}x** that.")


def codec_table(rows: list[Result]) -> str:
    """Bytes up and down per worker per round with each upload codec (the download codec is the default)."""
    lines = ["| upload codec (W, file://) | worker wait median (s) | up / worker / round | down / worker / round, "
             "after the first | down <= up |", "|---|---:|---:|---:|---|"]
    for r in rows:
        codec = r.system.removeprefix("diloco file").strip() or "fp32"
        ok = "yes" if r.down_after_first <= r.up else "no"
        lines.append(f"| {codec} (W={r.workers}) | {statistics.median(r.waits):.2f} | {fmt_bytes(r.up)} | "
                     f"{fmt_bytes(r.down_after_first)} | {ok} |")
    return "\n".join(lines)


def stages_table(r: Result) -> str:
    lines = [f"| stage ({r.system}, W={r.workers}, the worker that finished last) | median s | share of the wait |",
             "|---|---:|---:|"]
    wait = statistics.median(r.waits)
    for name, xs in r.stages.items():
        med = statistics.median(xs)
        label = f"&nbsp;&nbsp;{name.strip()}" if name.startswith(" ") else name
        lines.append(f"| {label} | {med:.3f} | {100 * med / wait:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="2,4,8", help="comma-separated W for the file:// store and gloo")
    ap.add_argument("--main-workers", type=int, default=4, help="W of the S3 run, the stages and the profile")
    ap.add_argument("--stores", default="file", help="file, or file,s3 (S3 on a moto_server, at --main-workers)")
    ap.add_argument("--codecs", default="int8,int4,topk",
                    help="lossy codecs run at --main-workers on file:// for bytes up and down ('' for none)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up rounds, not measured")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--profile-rounds", type=int, default=4, help="rounds of the cProfile run (0: no profile)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    ap.add_argument("--keep", action="store_true", help="keep each run's data directory (logs, traces)")
    ap.add_argument("--out", type=Path, help="write the 'Sync round' section of this markdown file")
    for hidden in ("--gloo-rank", "--gloo-world", "--gloo-port", "--gloo-rounds"):
        ap.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gloo-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gloo_rank is not None:
        gloo_rank(args)
        return 0
    ws = [int(w) for w in args.workers.split(",")]
    stores = args.stores.split(",")
    rounds = args.warmup + args.rounds + 1   # a wait ends at the next round's first step
    params = sum(p.numel() for p in make_task(width=args.width, layers=args.layers).build_model().parameters())
    t_start = time.monotonic()
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {params:,} parameters "
          f"({params * 4 / 1e6:.1f} MB fp32); {rounds} rounds each, {args.warmup} warm-up", flush=True)
    results: list[Result] = []
    gloo: dict[int, Result] = {}
    for w in ws:
        g = run_gloo(args, w, rounds)
        gloo[w] = g
        print(f"gloo W={w}: wait {stats3(g.waits)}", flush=True)
        r = run_diloco(args, "file", w, rounds)
        results.append(r)
        print(f"diloco file W={w}: wait {stats3(r.waits)}", flush=True)
    moved: list[Result] = []
    if "s3" in stores:
        r = run_diloco(args, "s3", args.main_workers, rounds, moved=moved)
        results.append(r)
        print(f"diloco s3 W={args.main_workers}: wait {stats3(r.waits)}; moving the bytes alone "
              f"{stats3(moved[0].waits)}", flush=True)
    coded = []
    for codec in filter(None, args.codecs.split(",")):
        coded.append(run_diloco(args, "file", args.main_workers, rounds, codec=codec))
        print(f"diloco file {codec} W={args.main_workers}: wait {stats3(coded[-1].waits)}", flush=True)
    results += [gloo[w] for w in ws]
    main_w = args.main_workers if args.main_workers in ws else ws[0]
    table = results_table(results, gloo)
    extra = move_table(results, moved) + "\n\n" + codec_table(
        [r for r in results if r.system == "diloco file" and r.workers == args.main_workers] + coded)
    main_file = next(r for r in results if r.system == "diloco file" and r.workers == main_w)
    stage_tables = [stages_table(main_file)] + [stages_table(r) for r in results
                                                if r.system == "diloco s3"]
    profile = ""
    if args.profile_rounds:
        pdir = Path(tempfile.mkdtemp(prefix="diloco-sync-prof-"))
        run_diloco(args, "file", main_w, args.profile_rounds, profile_dir=pdir)
        profile = (f"Aggregator under cProfile (`python -m cProfile -m diloco aggregator --max-rounds "
                   f"{args.profile_rounds}`, file://, W={main_w}; main thread only: the shard downloads run in "
                   f"a thread pool and show as the wait on their futures; the first round includes start-up):\n\n"
                   f"{profile_table(pdir / 'agg.prof', AGG_ROWS, args.profile_rounds)}\n\n"
                   f"Worker w0 under cProfile, same run:\n\n"
                   f"{profile_table(pdir / 'worker.prof', WORKER_ROWS, args.profile_rounds)}")
        if args.keep:
            print(f"profiles kept in {pdir}", flush=True)
        else:
            shutil.rmtree(pdir, ignore_errors=True)
    print(table)
    print("\n" + extra)
    for t in stage_tables:
        print("\n" + t)
    if profile:
        print("\n" + profile)
    elapsed = time.monotonic() - t_start
    print(f"\n(total {elapsed:.0f}s)")
    if args.out:
        cmd = "python bench/sync.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        body = f"""`{cmd.strip()}` ({time.strftime('%Y-%m-%d')}; {machine_facts()}; load average {load} at the end;
{elapsed:.0f} s in all)

The workload of issue 15: {args.layers} x `Linear({args.width}, {args.width})` with ReLU between them ({params:,}
fp32 parameters, {params * 4 / 1e6:.1f} MB), one torch thread per worker, AdamW lr 1e-4, H = 5 inner steps of
batch 2 on seeded random data, MSE, outer Nesterov lr 0.7 momentum 0.9, codec fp32, `min_workers` = W. diloco
runs through the real services: redis-server (AOF, appendfsync always, as `diloco run`), a file:// store (S3:
moto_server on loopback), one `diloco aggregator` and W `diloco worker --threads 1` processes. The reference
is W processes doing the same DiLoCo with `torch.distributed` gloo: H steps, `all_reduce` of the flat fp32
pseudo-gradient, the same Nesterov step locally. All processes share this machine's cores, so W > cores
means the workers' training, downloads and loads contend for CPU (in both systems alike).

**Worker wait** = from the end of a worker's last inner step of a round to the start of its first inner step of
the next round, for the worker that finished training last in that round (it waited on no other worker);
min / median / max over {args.rounds} rounds after {args.warmup} warm-up rounds. For diloco, "start of an inner
step" is the task's `loss` call (bench/sync_task.py writes its time to a trace file; grad_accum is 1), "end of
the last inner step" is that round's first `loss` call + the announcement's `train_s` (the worker's own timer
around its H steps); commit times are the versions stream's `committed_ms` (Redis server clock, same machine).
No product code is changed. Bytes are the workers' `bytes_sent` / `bytes_received` stats over the run divided by
the rounds (the first download, of version 0, included). Peak RSS is `VmHWM` of the process, polled every 0.2 s.

{table}

{extra}

Where the wait goes, the worker that finished last, median over the measured rounds (the stages add up to
the wait, apart from the indented row, which is part of the one above it):

{chr(10).join(stage_tables)}

{profile}
"""
        write_section(args.out, "Sync round", body)
        print(f"wrote the Sync round section of {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

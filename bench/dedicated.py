"""Codec and step times as on a dedicated worker machine, for bench/convergence.py's codec-share figures.

Run by convergence.py in a child process with the default OpenMP wait policy: the benchmark itself
sets OMP_WAIT_POLICY=PASSIVE because its W workers' threads share 2 cores, which makes each of torch's
small parallel operations wait for a sleeping thread, and no dedicated machine would run that way.

    python bench/dedicated.py '{"seed": 0, "inner_lr": 0.003, "weight_decay": 0.1, "h": 25,
                                "batch_size": 16, "workers": 4, "threads": 2, "codecs": {"topk": {}}}'

prints {"codec_ms": {codec: ms}, "step_s": s, "omp_wait_policy": ...} as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/dedicated.py` from the root

from diloco import runs
from diloco.codecs import get_codec
from diloco.shards import DeltaBuffer, encode_delta, encode_with_feedback
from diloco.tasks import Task, load_task

SHARD_BYTES = 64 * 2**20


def best_time(fn, reps: int = 7) -> float:
    """The fastest of `reps` timed calls (after one warm-up): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def pseudo_gradient(task: Task, s: dict) -> dict[str, torch.Tensor]:
    """A real pseudo-gradient: H AdamW steps from the seeded model."""
    net = runs.build_model(task, s["seed"])
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    opt = torch.optim.AdamW(net.parameters(), lr=s["inner_lr"], weight_decay=s["weight_decay"], betas=(0.9, 0.95))
    data = task.train_data()
    for step in range(s["h"]):
        loss = task.loss(net, data.batch(list(range(step * s["batch_size"], (step + 1) * s["batch_size"]))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = net.state_dict()
    return {k: before[k] - after[k].detach() for k in before}


def codec_ms(delta: dict[str, torch.Tensor], name: str, options: dict, workers: int) -> float:
    """Encode with error feedback on one worker (the worker's own code path), plus decoding, checking
    and adding `workers` deltas on the aggregator, in ms."""
    codec = get_codec(name, options)
    residual = {n: torch.zeros_like(t) for n, t in delta.items()}  # a later round's: one more add

    def worker_side() -> None:
        if name == "fp32":  # no error feedback (Worker._encode_with_feedback)
            encode_delta(delta, codec, SHARD_BYTES)
        else:
            encode_with_feedback(delta, residual, codec, 1.0, SHARD_BYTES)

    shards = encode_delta(delta, codec, SHARD_BYTES)
    acc = torch.zeros(sum(t.numel() for t in delta.values()))

    def aggregator_side() -> None:  # diloco.reduce.reduce_round's work per delta, less the download
        for _ in range(workers):
            buf = DeltaBuffer(delta)
            for shard in shards:
                buf.add_shard(shard, codec)
            buf.check_complete()
            buf.norm()
            buf.add_to(acc)

    return 1000 * (best_time(worker_side) + best_time(aggregator_side))


def step_s(task: Task, s: dict) -> float:
    """Best time of one AdamW step at the workers' batch size."""
    net = runs.build_model(task, s["seed"])
    opt = torch.optim.AdamW(net.parameters(), lr=s["inner_lr"])
    data = task.train_data()
    ids = list(range(s["batch_size"]))

    def step() -> None:
        loss = task.loss(net, data.batch(ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return best_time(step, reps=21)


def measure(s: dict) -> dict:
    torch.set_num_threads(s["threads"])
    task = load_task("gpt", {})
    delta = pseudo_gradient(task, s)
    return {"codec_ms": {name: codec_ms(delta, name, opts, s["workers"]) for name, opts in s["codecs"].items()},
            "step_s": step_s(task, s), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

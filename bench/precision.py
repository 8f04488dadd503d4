"""Inner-loop throughput by precision: what bf16 autocast buys a worker on its device.

Times the worker's own inner loop (workers/inner.py: the same code a round runs, AdamW, no Redis or
store) on the gpt task for each precision, after --warmup steps, and prints a markdown table:
steps/s, tokens/s and, on CUDA, peak memory. Under torchrun each rank trains its share of the batch
(DDP), and rank 0 prints the table.

    .venv/bin/python bench/precision.py --device cuda
    torchrun --nproc-per-node 8 bench/precision.py --device cuda     # one worker over 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diloco.config import RunConfig
from workers.inner import InnerLoop
from workers.ranks import Ranks


def measure(precision: str, args: argparse.Namespace, ranks: Ranks) -> dict[str, float]:
    options = {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.width, "seq_len": args.seq_len,
               "corpus_mb": 4.0}
    steps = args.warmup + args.steps
    cfg = RunConfig(run="bench", task="gpt", task_options=options, sync_every=steps, batch_size=args.batch,
                    inner_warmup_steps=0, precision=precision)
    inner = InnerLoop(cfg, ranks)
    inner.distribute()
    ids = [i % len(inner.train_data) for i in range(steps * args.batch)]
    marks: list[float] = []

    def on_step(step: int, _loss: float, _lr: float, _elapsed: float) -> None:
        if ranks.device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    if ranks.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    inner.train(0, ids, lambda: False, on_step)
    per_s = args.steps / (marks[-1] - marks[args.warmup - 1])
    peak = torch.cuda.max_memory_allocated() / 2**30 if ranks.device.type == "cuda" else 0.0
    return {"steps_per_s": per_s, "tokens_per_s": per_s * args.batch * args.seq_len, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="the worker's micro-batch (split over ranks)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (at least 1)")
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    ranks = Ranks.from_env(args.device)
    rows = {prec: measure(prec, args, ranks) for prec in args.precisions.split(",")}
    if ranks.leader:
        name = torch.cuda.get_device_name(ranks.device) if ranks.device.type == "cuda" else "cpu"
        print(f"gpt {args.layers}x{args.width}, seq {args.seq_len}, batch {args.batch}, {ranks.world} rank(s), {name}")
        print("| precision | steps/s | tokens/s | peak GiB |\n|---|---|---|---|")
        for prec, m in rows.items():
            print(f"| {prec} | {m['steps_per_s']:.2f} | {m['tokens_per_s']:,.0f} | {m['peak_gib']:.2f} |")
        print(json.dumps({"args": vars(args), "world": ranks.world, "results": rows}))
    ranks.close()


if __name__ == "__main__":
    main()

"""In-process DiLoCo simulation for hyperparameter sweeps: W workers' rounds run one after another.

bench/convergence.py runs the product (threads, redis, a store) and takes about 90 s of wall time per
configuration with every other configuration waiting; this script runs the same training arithmetic
in one thread with no services, so two sweeps fit on the 2 cores at once. It uses the product's model,
codecs and outer step (`diloco.outer.outer_step`); what it does not model is the product's work
units (each worker draws its batches uniformly, with its own seed) and late arrivals (every round
averages all W workers). docs/benchmarks.md quotes its results as "the in-process simulation"; its
dp (`--workers 1 --batch 64 --h 1 --outer-lr 1 --outer-momentum 0`) ends where the benchmark's dp
does, so its DiLoCo numbers can be set against it.

    .venv/bin/python bench/simulate.py --tag NAME [options] [--results FILE]

Each run appends one JSON line (its options, final and last-quarter eval loss, every evaluation as
(fraction of the rounds, loss), seconds) to --results, and prints the eval loss as it goes. The
shared warm start (--warm-steps AdamW steps at batch 16, lr 2e-3, as bench/convergence.py's) is cached
at --warm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/simulate.py` from the root

from diloco import model, runs
from diloco.codecs import get_codec
from diloco.evaluate import eval_loss
from diloco.outer import outer_step
from diloco.tasks import Task, load_task

Tensors = dict[str, torch.Tensor]
WARMUP = 50  # inner lr warmup steps, per worker (as the product's)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True, help="name of the run in the results")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="per-worker batch")
    ap.add_argument("--steps", type=int, default=1200, help="inner steps per worker in all")
    ap.add_argument("--h", type=int, default=25, help="inner steps per round")
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--cooldown", type=float, default=0.0,
                    help="fraction of the rounds over which the inner lr decays linearly to 0 (0: none)")
    ap.add_argument("--cosine", action="store_true", help="instead: cosine inner lr from 1 to 0.1 over the rounds")
    ap.add_argument("--outer-decay", default="", choices=("", "lr", "mu", "lrmu"),
                    help="what of the outer step decays with the inner lr")
    ap.add_argument("--cooldown-outer-lr", type=float,
                    help="instead of decaying, the outer lr moves linearly to this value with the inner lr's decay")
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--density", type=float, default=0.015, help="topk density")
    ap.add_argument("--feedback-decay", type=float, default=1.0, help="share of the residual carried over")
    ap.add_argument("--ef-cooldown", action="store_true", help="the carried share decays with the inner lr too")
    ap.add_argument("--flat", action="store_true",
                    help="encode the tensors laid end to end (the product's shards) instead of one by one")
    ap.add_argument("--agg", default="mean", choices=("mean", "nzmean"),
                    help="nzmean: average each entry over the workers that sent it")
    ap.add_argument("--keep-local", action="store_true",
                    help="workers start a round from the global model minus their residual")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=INT",
                    help="an option of the gpt task (n_layer, n_head, n_embd, seq_len); repeatable")
    ap.add_argument("--warm-steps", type=int, default=300, help="AdamW steps of the shared warm start")
    ap.add_argument("--warm", type=Path, help="where the warm start is cached (default /tmp/diloco-sim-warm-N)")
    ap.add_argument("--results", type=Path, default=Path("/tmp/diloco-sim-results.jsonl"))
    args = ap.parse_args(argv)
    args.warm = args.warm or Path(f"/tmp/diloco-sim-warm-{args.warm_steps}.safetensors")
    return args


def warm_start(task: Task, path: Path, steps: int, batch: int = 16) -> Tensors:
    if not path.exists():
        net = runs.build_model(task, 0)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
        data, g = task.train_data(), torch.Generator().manual_seed(1)
        for _ in range(steps):
            ids = torch.randint(0, len(data), (batch,), generator=g).tolist()
            loss = task.loss(net, data.batch(ids))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        path.write_bytes(model.to_bytes(model.state_to_cpu(net), what="simulation warm start"))
    return runs.read_init_weights(path).state


def lr_scale(args: argparse.Namespace, r: int, rounds: int) -> float:
    """The inner lr's factor in round r (constant within a round, as the product's cooldown by version)."""
    if args.cooldown:
        return min(1.0, (rounds - r) / (args.cooldown * rounds))
    if args.cosine:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * r / rounds))
    return 1.0


class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.task = load_task("gpt", {k: int(v) for k, v in (o.split("=", 1) for o in args.task_option)})
        self.glob = {n: t.clone().float() for n, t in warm_start(self.task, args.warm, args.warm_steps).items()}
        self.mom = {n: torch.zeros_like(t) for n, t in self.glob.items()}
        self.codec = get_codec(args.codec, {"density": args.density} if args.codec == "topk" else {})
        self.data = self.task.train_data()
        w = args.workers
        self.nets = [runs.build_model(self.task, 0) for _ in range(w)]
        self.opts = [torch.optim.AdamW(n.parameters(), lr=args.inner_lr, weight_decay=0.1, betas=(0.9, 0.95))
                     for n in self.nets]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / WARMUP)) for o in self.opts]
        self.gens = [torch.Generator().manual_seed(100 + i) for i in range(w)]
        self.resid: list[Tensors] = [{} for _ in range(w)]
        self.evalnet = runs.build_model(self.task, 0)

    def set_inner_lr(self, scale: float) -> None:
        for s in self.scheds:
            s.base_lrs = [self.args.inner_lr * scale for _ in s.base_lrs]
            for group, base in zip(s.optimizer.param_groups, s.base_lrs, strict=True):
                group["lr"] = base * s.lr_lambdas[0](s.last_epoch)

    def train(self, w: int) -> Tensors:
        """Worker w's pseudo-gradient for this round: H AdamW steps from the global model."""
        a, net, opt = self.args, self.nets[w], self.opts[w]
        if a.keep_local and self.resid[w]:
            net.load_state_dict({n: self.glob[n] - self.resid[w][n] for n in self.glob})
        else:
            net.load_state_dict(self.glob)
        for _ in range(a.h):
            ids = torch.randint(0, len(self.data), (a.batch,), generator=self.gens[w]).tolist()
            loss = self.task.loss(net, self.data.batch(ids))
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.scheds[w].step()
        local = net.state_dict()
        return {n: self.glob[n] - local[n].float() for n in self.glob}

    def roundtrip(self, flat: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.codec.encode(flat), flat.numel())

    def send(self, w: int, delta: Tensors, scale: float) -> Tensors:
        """What worker w's codec delivers, with error feedback (the residual kept in self.resid[w])."""
        a, resid = self.args, self.resid[w]
        if a.codec == "fp32":
            return delta
        sent = {}
        if a.flat:
            names = sorted(delta)
            carry = a.feedback_decay * (scale if a.ef_cooldown else 1.0)
            tgt = {n: delta[n] + carry * resid[n] if n in resid and not a.keep_local else delta[n] for n in names}
            got = self.roundtrip(torch.cat([tgt[n].reshape(-1) for n in names]))
            off = 0
            for n in names:
                k = tgt[n].numel()
                sent[n] = got[off:off + k].reshape(tgt[n].shape)
                resid[n] = tgt[n] - sent[n]
                off += k
            return sent
        for n, d in delta.items():
            tgt = d + a.feedback_decay * resid[n] if n in resid else d
            sent[n] = self.roundtrip(tgt.reshape(-1).contiguous()).reshape(tgt.shape)
            resid[n] = tgt - sent[n]
        return sent

    def average(self, sent: list[Tensors]) -> Tensors:
        if self.args.agg == "nzmean":
            out = {}
            for n in self.glob:
                st = torch.stack([s[n] for s in sent])
                out[n] = st.sum(0) / (st != 0).sum(0).clamp(min=1)
            return out
        return {n: sum(s[n] for s in sent) / len(sent) for n in self.glob}

    def run(self) -> dict:
        a, t0, points = self.args, time.time(), []
        rounds = a.steps // a.h
        for r in range(rounds):
            scale = lr_scale(a, r, rounds)
            if a.cooldown or a.cosine:
                self.set_inner_lr(scale)
            sent = [self.send(w, self.train(w), scale) for w in range(a.workers)]
            lr = a.outer_lr * (scale if "lr" in a.outer_decay else 1.0)
            if a.cooldown_outer_lr is not None:
                lr = a.cooldown_outer_lr + (a.outer_lr - a.cooldown_outer_lr) * scale
            mu = a.outer_momentum * (scale if "mu" in a.outer_decay else 1.0)
            self.glob, self.mom = outer_step(self.glob, self.mom, self.average(sent), lr=lr, mu=mu)
            if (r + 1) % max(1, rounds // 24) == 0 or r == rounds - 1:
                self.evalnet.load_state_dict(self.glob)
                points.append(((r + 1) / rounds, eval_loss(self.task, self.evalnet, max_samples=512)))
                print(f"{a.tag} round {r + 1}/{rounds} eval loss {points[-1][1]:.4f} {time.time() - t0:.0f}s",
                      flush=True)
        tail = [loss for f, loss in points if f > 0.75]
        return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                "final": points[-1][1], "tail": sum(tail) / len(tail), "points": points, "s": time.time() - t0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core per simulation: two sweeps side by side on the 2 cores
    res = Sim(args).run()
    print("RESULT", json.dumps({k: res[k] for k in ("args", "final", "tail", "s")}), flush=True)
    with args.results.open("a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

"""Compressed download against full-weights download: the same training, bytes down and final loss.

For each codec, the convergence benchmark's DiLoCo run (bench/convergence.py: gpt task, W workers,
H = --h-small, the shared warm start, the same settings and cooldown) twice: once with
`download_codec` fp32 (workers download the full fp32 weights every round, as before the compressed
download) and once with the product's default (the version's update, encoded with the upload
codec, with the aggregator's error feedback). Prints and writes the "Compressed download" section:
final and tail eval loss of both, their difference, and bytes up and down per worker per round.

    python bench/download.py --codecs bf16,int8,int4,topk --out docs/benchmarks.md
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/convergence.py, before torch loads
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/download.py` from the root

import torch

from bench import convergence as conv
from bench.common import machine_facts, write_section
from diloco.localserver import RedisServer
from diloco.tasks import load_task

log = logging.getLogger("bench.download")
TARGET_PCT = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = conv.parser()
    ap.description = __doc__.splitlines()[0]
    ap.add_argument("--codecs", default="bf16,int8,int4,topk", help="comma-separated codecs (default all lossy)")
    ap.add_argument("--variant", action="append", default=[], metavar="CODEC:DOWNLOAD[:KEY=VALUE,...]",
                    help="also run CODEC with this download codec and options, e.g. topk:topk:density=0.12")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    conv.log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    command = shlex.join(["python", "bench/download.py", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = conv.load_average()
    started = time.perf_counter()
    task = load_task("gpt", {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="diloco-download-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=True).start()
        try:
            warm = conv.warm_start(task, args, Path(tmp) / "warm.safetensors")
            for codec in codecs:
                pair = []
                for download in ("fp32", codec):
                    cfg = conv.Config("diloco", args.h_small, codec, download=download)
                    res = conv.run_diloco(task, args, cfg, server.url, f"file://{tmp}/store", warm)
                    log.info("%s: final eval loss %.4f, down %.0f B/round", cfg.label, res.final,
                             res.down_per_worker_round)
                    pair.append(res)
                rows.append((codec, *pair))
            for variant in args.variant:
                codec, download, options = _variant(variant)
                full = next(full for c, full, _ in rows if c == codec)
                cfg = conv.Config("diloco", args.h_small, codec, download=download, download_options=options)
                res = conv.run_diloco(task, args, cfg, server.url, f"file://{tmp}/store", warm)
                log.info("%s: final eval loss %.4f, down %.0f B/round", cfg.label, res.final,
                         res.down_per_worker_round)
                rows.append((codec, full, res))
        finally:
            server.stop()
    elapsed = time.perf_counter() - started
    table = _table(rows)
    print(table)
    if args.out:
        write_section(args.out, "Compressed download", _report(args, command, date, load_start, elapsed, table))
    return 0


def _variant(text: str) -> tuple[str, str, dict]:
    codec, download, *rest = text.split(":")
    options = {}
    for item in filter(None, (rest[0] if rest else "").split(",")):
        key, _, value = item.partition("=")
        options[key] = float(value) if "." in value else int(value)
    return codec, download, options


def _table(rows) -> str:
    lines = ["| codec | download | final eval loss | tail eval loss | vs fp32 download (final) | up / worker / round "
             "| down / worker / round | within 1% |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    shown = set()
    for codec, full, comp in rows:
        options = ", ".join(f"{k}={v}" for k, v in comp.config.download_options.items())
        update = f"{comp.config.download}{f' {options}' if options else ''} (update)"
        for res, name in ((full, "fp32 (full weights)"), (comp, update)):
            if res is full and id(full) in shown:
                continue
            shown.add(id(full))
            diff = (res.final - full.final) / full.final * 100
            ok = "" if res is full else ("met" if abs(diff) <= TARGET_PCT else "not met")
            lines.append(f"| {codec} | {name} | {res.final:.4f} | {res.tail:.4f} | {diff:+.2f}% | "
                         f"{_mb(res.bytes_per_worker_round)} | {_mb(res.down_per_worker_round)} | {ok} |")
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _report(args, command: str, date: str, load_start: str, elapsed: float, table: str) -> str:
    return (
        f"`{command}` ({date}; {machine_facts()}; load average {load_start} at the start; "
        f"{elapsed / 60:.1f} min in all)\n\n"
        f"The convergence benchmark's DiLoCo run (gpt task, {args.workers} workers, H = {args.h_small}, "
        f"T = {args.steps} steps per worker from the shared warm start, the same settings per codec as in "
        "[Convergence](#convergence)), once with `download_codec` fp32 (the full fp32 weights every round) "
        "and once with the default, the update encoded with the upload codec and the aggregator's error "
        "feedback. Down is what a worker read per round after its first round (which reads the full weights, "
        "as a joining worker does); up is the encoded delta. Target: the final eval loss within 1% of the "
        "fp32 download's, and bytes down <= bytes up.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())

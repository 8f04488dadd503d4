"""The CUDA paths, on a machine with a GPU (`pytest -m cuda`; CI has none and leaves these out).

A worker training on `cuda` (the tiny task, whose BatchNorm holds float and int64 buffers, and a
small GPT) commits versions through the real services, its residual and deltas stay on the CPU
where they are encoded, and every committed version replays bit for bit: the aggregator's CPU
arithmetic does not depend on where the workers trained.
"""

from __future__ import annotations

import pytest
import torch

from diloco import keys
from diloco.replay import replay
from diloco.store import open_store
from tests import harness
from tests.test_torchrun import torchrun

pytestmark = pytest.mark.cuda

GPT_SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "seq_len": 32, "corpus_mb": 0.25}


@pytest.mark.parametrize(("task", "options", "codec"), [
    ("tiny", {"num_samples": 400}, "bf16"),
    ("tiny", {"num_samples": 400}, "topk"),
    ("gpt", GPT_SMALL, "int8"),
])
def test_workers_train_on_cuda_and_every_version_replays(redis_url, file_url, r, task, options, codec):
    assert torch.cuda.is_available(), "run these on a machine with a CUDA device"
    harness.init(redis_url, file_url, task=task, task_options=options, codec=codec, min_workers=2)
    rounds: list = []
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=3, device="cuda", observer=rounds.append)
          for i in range(2)]
    assert agg.result(300) == 3 and [w.result(300) for w in ws] == [3, 3]
    assert all(t.device.type == "cpu" for info in rounds for t in info.delta.values()), "deltas encode on the CPU"
    assert any(p.is_cuda for w in ws for p in w.service.model.parameters()), "the model trained on the GPU"
    assert all(t.device.type == "cpu" for w in ws for t in w.service.residual.values())
    # Versions 1 and 2 came as published updates, applied on the CPU copy and checked against the full
    # weights' sha256: a CUDA worker reaches them bit for bit too.
    assert [(w.service.updates_applied, w.service.update_fallbacks) for w in ws] == [(2, 0), (2, 0)]
    entries = [f for _, f in r.xrange(keys.versions("t"))]
    assert [e["n"] for e in entries] == ["2", "2", "2"]
    assert replay(r, open_store(file_url), "t").mismatched == []


def test_bf16_autocast_on_cuda_trains_and_replays(redis_url, file_url, r):
    assert torch.cuda.is_available(), "run these on a machine with a CUDA device"
    harness.init(redis_url, file_url, task="gpt", task_options=GPT_SMALL, codec="bf16", precision="bf16")
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    w = harness.worker(redis_url, file_url, "w0", max_rounds=2, device="cuda", start=False)
    seen: set[torch.dtype] = set()
    w.service.model.lm_head.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    w.start()
    assert w.result(300) == 2 and agg.result(300) == 2
    assert seen == {torch.bfloat16}, "the forward pass ran under bf16 autocast"
    assert all(p.dtype == torch.float32 for p in w.service.model.parameters())
    assert replay(r, open_store(file_url), "t").mismatched == []


def test_torchrun_over_the_gpus(redis_url, file_url, r, procs, tmp_path):
    """One worker over every GPU of the machine (NCCL for the model, gloo for messages); one GPU works too."""
    gpus = torch.cuda.device_count()
    assert gpus >= 1, "run these on a machine with a CUDA device"
    harness.init(redis_url, file_url, task="gpt", task_options=GPT_SMALL, codec="bf16", precision="bf16",
                 batch_size=4 * gpus, grad_accum=2)
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    log = tmp_path / "torchrun.log"
    proc = torchrun(redis_url, file_url, "t", log, "--max-rounds", "2", nproc=gpus, device="cuda")
    procs.append(proc)
    assert proc.wait(300) == 0, log.read_text()[-3000:]
    assert agg.result(300) == 2
    assert replay(r, open_store(file_url), "t").mismatched == []

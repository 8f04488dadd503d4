"""The worker's error feedback: what a lossy codec leaves out is sent in later rounds (decayed by the
codec's `feedback_decay` and the run's cooldown), and the residual survives a worker restart through
its checkpoint."""

from __future__ import annotations

import pytest
import torch

from diloco.codecs import get_codec
from diloco.config import WorkerSettings
from diloco.errors import ConfigError
from diloco.shards import DeltaBuffer
from tests import harness
from workers.worker import Worker


def _decoded(worker: Worker, shards: list[bytes], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buf = DeltaBuffer(like)
    for shard in shards:
        buf.add_shard(shard, worker.codec)
    buf.check_complete()
    return {n: buf.flat[n].reshape(t.shape) for n, t in like.items()}


@pytest.mark.parametrize(("decay", "cooldown", "factors"), [
    (1.0, {}, [1, 1, 1]),
    (0.5, {}, [0.5, 0.5, 0.5]),
    (0.5, {"cooldown_from": 0, "cooldown_to": 4}, [0.5, 0.375, 0.25]),  # the cooldown fades the carried residual
])
def test_each_round_sends_delta_plus_decayed_residual_and_keeps_the_rest(redis_url, file_url, decay, cooldown,
                                                                        factors, tmp_path):
    harness.init(redis_url, file_url, codec="topk", codec_options={"density": 0.05, "feedback_decay": decay},
                 **cooldown)
    w = Worker(WorkerSettings(redis_url, file_url, "t", "w0", checkpoint_dir=str(tmp_path)))
    g = torch.Generator().manual_seed(0)
    like = {n: p.detach() for n, p in w.model.named_parameters()}
    assert any(t.numel() >= 100 for t in like.values())
    residual = {n: torch.zeros_like(t) for n, t in like.items()}
    for version, factor in enumerate(factors):
        delta = {n: torch.randn(t.shape, generator=g) for n, t in like.items()}
        shards, norm = w._encode_with_feedback(delta, version)
        sent = _decoded(w, shards, like)
        for n in like:
            target = delta[n] + factor * residual[n]
            assert torch.allclose(sent[n] + w.residual[n], target, atol=1e-6), n
            if target.numel() >= 100:  # k is at least 1 per chunk, so tiny tensors are sent whole
                assert int((sent[n] != 0).sum()) < 0.1 * target.numel(), "topk leaves most entries to the residual"
        residual = {n: t.clone() for n, t in w.residual.items()}
        assert norm == pytest.approx(float(torch.sqrt(sum((s.double() ** 2).sum() for s in sent.values()))))
    assert any(t.abs().sum() > 0 for t in residual.values())
    w.checkpoint.save(w)
    again = Worker(WorkerSettings(redis_url, file_url, "t", "w0", checkpoint_dir=str(tmp_path)))
    assert again.residual == {} and again.checkpoint.load(again)
    assert all(torch.equal(again.residual[n], residual[n]) for n in residual)


def test_feedback_decay_outside_zero_one_is_refused():
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="option 'feedback_decay' must be"):
            get_codec("topk", {"feedback_decay": bad})
    assert get_codec("topk").feedback_decay == 1.0 and get_codec("int8").feedback_decay == 1.0

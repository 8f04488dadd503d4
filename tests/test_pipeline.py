"""End to end over a real redis-server and a real S3 server: workers and aggregators in threads.

The committed weights are checked against DiLoCo computed independently here, from the workers'
local weights (handed out by an observer) and the previous committed version.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from diloco import keys, model, runs
from diloco.cli import main as cli_main
from diloco.codecs import get_codec
from diloco.messages import Announcement
from diloco.replay import ReplayResult, replay
from diloco.shards import DeltaBuffer
from diloco.store import open_store
from tests import harness


class Recorder:
    """Observer keeping each worker's local weights and optimizer step count per base version."""

    def __init__(self) -> None:
        self.local: dict[int, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
        self.adam_steps: dict[str, list[int]] = defaultdict(list)
        self.micro: dict[str, list[int]] = defaultdict(list)
        self.last_lr: dict[str, list[float]] = defaultdict(list)

    def for_worker(self, worker_id: str):
        def observe(info) -> None:
            self.local[info.version][worker_id] = info.local_state
            states = list(info.optimizer.state.values())
            self.adam_steps[worker_id].append(int(states[0]["step"]))
            self.micro[worker_id].append(info.micro_batches)
            self.last_lr[worker_id].append(info.optimizer.param_groups[0]["lr"])
        return observe


def committed(store, entry: dict[str, str]) -> tuple[dict, dict]:
    w = model.from_bytes(store.get(entry["weights"], digest=entry["weights_digest"]), "w")
    m = model.from_bytes(store.get(entry["momentum"], digest=entry["momentum_digest"]), "m")
    return w, m


def run_pipeline(redis_url, store_url, r, n_workers: int, versions: int, **settings):
    cfg = harness.init(redis_url, store_url, min_workers=n_workers, **settings)
    head0 = runs.read_head(r, "t")
    rec = Recorder()
    agg = harness.aggregator(redis_url, store_url, max_rounds=versions)
    ws = [harness.worker(redis_url, store_url, f"w{i}", max_rounds=versions, observer=rec.for_worker(f"w{i}"))
          for i in range(n_workers)]
    assert agg.result() == versions
    for w in ws:
        assert w.result() == versions
    entries = harness.wait_for_version(r, "t", versions)
    return cfg, head0, rec, entries


def test_committed_weights_equal_reference_diloco(redis_url, s3_url, r):
    _, head0, rec, entries = run_pipeline(redis_url, s3_url, r, 3, 3, outer_lr=0.7, outer_momentum=0.9)
    store = open_store(s3_url)
    theta = runs.load_weights(store, head0)
    b = {n: torch.zeros_like(t) for n, t in runs.load_momentum(store, head0).items()}
    assert [int(e["version"]) for e in entries] == [1, 2, 3]
    for entry in entries:
        base = int(entry["version"]) - 1
        locals_ = [rec.local[base][w] for w in sorted(rec.local[base])]
        assert len(locals_) == 3 and entry["participants"] == "w0,w1,w2"
        new_w, new_m = committed(store, entry)
        for name, t in theta.items():
            if not t.is_floating_point():
                assert torch.equal(new_w[name], t), f"integer buffer {name} must keep the global value"
                continue
            d = torch.stack([t.double() - loc[name].double() for loc in locals_]).mean(0)
            if name in b:  # parameter: Nesterov, b = mu*b + d; theta -= lr*(d + mu*b)
                b[name] = 0.9 * b[name].double() + d
                expected = t.double() - 0.7 * (d + 0.9 * b[name])
                torch.testing.assert_close(new_m[name].double(), b[name], atol=1e-6, rtol=1e-5)
            else:       # float buffer: the workers' average
                expected = t.double() - d
            torch.testing.assert_close(new_w[name].double(), expected, atol=1e-6, rtol=1e-5)
        theta = new_w


def test_fedavg_equivalence_and_sign(redis_url, s3_url, r):
    """outer_lr 1, momentum 0: the new weights are the plain average of the local weights."""
    _, head0, rec, entries = run_pipeline(redis_url, s3_url, r, 2, 2, outer_lr=1.0, outer_momentum=0.0)
    store = open_store(s3_url)
    theta0 = runs.load_weights(store, head0)
    for entry in entries:
        base = int(entry["version"]) - 1
        new_w, _ = committed(store, entry)
        for name, t in new_w.items():
            if t.is_floating_point():
                avg = torch.stack([rec.local[base][w][name] for w in ("w0", "w1")]).mean(0)
                torch.testing.assert_close(t, avg, atol=1e-6, rtol=1e-5)
    # Sign: the announced delta is global minus local, so global - delta is the worker's weights.
    ann = Announcement.from_fields(r.xrange(keys.deltas("t"), count=1)[0][1])
    assert ann.version == 0
    floats = {n: t for n, t in theta0.items() if t.is_floating_point()}
    buf = DeltaBuffer(floats)
    for key, sha in zip(ann.shards, ann.digest, strict=True):
        buf.add_shard(store.get(key, digest=sha), get_codec("fp32"))
    buf.check_complete()
    local = rec.local[0][ann.worker]
    name = next(iter(floats))
    torch.testing.assert_close(buf.flat[name].reshape(floats[name].shape), floats[name] - local[name])
    assert not torch.equal(local[name], floats[name]), "training must have moved the weights"


def test_inner_state_persists_and_exact_steps_with_accumulation(redis_url, file_url, r):
    H, accum = 4, 3
    _, _, rec, entries = run_pipeline(redis_url, file_url, r, 1, 3, sync_every=H, grad_accum=accum)
    # AdamW's step counter keeps counting across rounds: state is kept, never reset or sent.
    assert rec.adam_steps["w0"] == [H, 2 * H, 3 * H]
    assert rec.micro["w0"] == [H * accum] * 3
    assert [int(e["samples"]) for e in entries] == [H * accum * 8] * 3


def test_inner_lr_warms_up_per_worker_and_the_cooldown_follows_the_version(redis_url, file_url, r):
    # H=5, warmup over a worker's first 8 steps, linear decay from version 1 to zero at version 3.
    _, _, rec, entries = run_pipeline(redis_url, file_url, r, 1, 4, sync_every=5, inner_lr=0.01, outer_momentum=0.9,
                                      inner_warmup_steps=8, cooldown_from=1, cooldown_to=3)
    # The lr of each round's last step (s = 4, position v + 0.8): v0 in warmup (step 5 of 8);
    # v1 at 1.8 and v2 at 2.8 on the decay line; v3 past its end.
    assert rec.last_lr["w0"] == pytest.approx([0.01 * 5 / 8, 0.01 * 0.6, 0.01 * 0.1, 0.0])
    # At lr 0 the round leaves the parameters as they were (AdamW's decay is scaled by lr too);
    # batch norm's running statistics still move.
    base, momentum = committed(open_store(file_url), entries[2])
    assert momentum
    for name in momentum:
        assert torch.equal(rec.local[3]["w0"][name], base[name]), name
    # The outer momentum cools down with it, at each round's base version 0..3; replay follows the record.
    assert [float(e["outer_momentum"]) for e in entries] == pytest.approx([0.9, 0.9, 0.45, 0.0])
    assert replay(r, open_store(file_url), "t") == ReplayResult(4, [])


def test_two_aggregators_commit_each_version_once(redis_url, file_url, r, monkeypatch):
    from aggregator.aggregator import Aggregator

    rounds: dict[str, int] = defaultdict(int)   # rounds each aggregator started (kills Aggregator.run 36:
    real_round = Aggregator._round                 # a standby that failed to take the lock does a round)

    def counted(self, *args, **kw):
        rounds[self.s.aggregator_id] += 1
        return real_round(self, *args, **kw)

    monkeypatch.setattr(Aggregator, "_round", counted)
    harness.init(redis_url, file_url, min_workers=2)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{i}") for i in range(2)]
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=4) for i in range(2)]
    for w in ws:
        assert w.result() == 4
    entries = harness.wait_for_version(r, "t", 4)
    assert len({e["aggregator"] for e in entries}) == 1
    leader = entries[0]["aggregator"]
    standby = next(f"agg{i}" for i in range(2) if f"agg{i}" != leader)
    # The standby stops first: stopped after the leader, it could take the released lock and (rightly)
    # start a round before its own stop arrived.
    by_id = {a.service.s.aggregator_id: a for a in aggs}
    committed_by = {standby: by_id[standby].stop(), leader: by_id[leader].stop()}
    assert committed_by == {leader: 4, standby: 0}, "one aggregator commits, the other stays standby"
    assert [int(e["version"]) for e in r.xrange(keys.versions("t")) for e in [e[1]]] == [1, 2, 3, 4]
    assert r.get(keys.lock("t")) is None, "a stopped aggregator releases the lock"
    assert rounds[standby] == 0, f"the standby started {rounds[standby]} rounds without the lock"


def test_status_json(redis_url, file_url, r, capsys):
    run_pipeline(redis_url, file_url, r, 2, 1)
    assert cli_main(["status", "--run", "t", "--redis-url", redis_url, "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["run"] == "t" and snap["version"] == 1
    assert snap["config"]["sync_every"] == 5 and snap["config"]["task"] == "tiny"
    assert {w["id"] for w in snap["workers"]} == {"w0", "w1"}
    assert all(not w["alive"] and w["state"] == "stopped" for w in snap["workers"])
    assert [rd["version"] for rd in snap["rounds"]] == [1] and snap["rounds"][0]["n"] == 2
    assert cli_main(["status", "--run", "t", "--redis-url", redis_url]) == 0
    assert "w0" in capsys.readouterr().out

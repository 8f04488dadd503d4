"""Asynchronous DiLoCo (issue 17): settings, staleness, the grace window, weighted means, Delayed
Nesterov, an async run replayed bit for bit, and an aggregator crash mid-stream in async mode.

References (float64) are in tests/reference.py, never the product's code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load as st_load

from aggregator.collect import Round, check, collect
from diloco import dylu, keys, outer, runs, units, weighting
from diloco.codecs import get_codec
from diloco.config import ENV_CRASH_AT, RunConfig
from diloco.errors import ConfigError, RunNotFound
from diloco.faults import CRASH_EXIT_CODE
from diloco.messages import Announcement
from diloco.reduce import Reducer
from diloco.replay import replay
from diloco.shards import encode_delta, l2_norm
from diloco.store import digest_of, open_store, put_idempotent
from tests import harness, reference
from tests.test_faults import FAST, procs_for  # noqa: F401  (procs_for: a fixture)

RUN = "t"


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "asynchronous"}, "mode must be one of sync, async"),
    ({"mode": "async", "staleness_weight": "inv"}, "staleness_weight must be one of none, inv_sqrt"),
    ({"aggregation": "samples"}, "aggregation must be one of uniform, tokens"),
    ({"mode": "async", "grace_s": -1.0}, "grace_s must be a finite number"),
    ({"mode": "async", "max_staleness": -1}, "max_staleness must be an integer >= 0"),
    ({"dn_buffer": 0}, "dn_buffer must be a positive integer"),
    ({"dn_buffer": 2, "nesterov": False}, "dn_buffer > 1 (Delayed Nesterov) needs nesterov = true"),
    ({"grace_s": 1.0}, "apply to mode=async only"),
    ({"staleness_weight": "inv_sqrt"}, "apply to mode=async only"),
])
def test_async_settings_are_validated_at_the_boundary(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_options("t", options)


def test_async_settings_round_trip_and_the_aggregator_only_ones_are_tunable():
    cfg = RunConfig.from_options("t", {"mode": "async", "grace_s": 0.5, "max_staleness": 2, "dn_buffer": 3,
                                       "staleness_weight": "inv_sqrt", "aggregation": "tokens"})
    assert RunConfig.from_fields(cfg.to_fields()) == cfg and cfg.is_async
    assert {"grace_s", "max_staleness", "staleness_weight", "aggregation"} <= RunConfig.TUNABLE
    assert not {"mode", "dn_buffer"} & RunConfig.TUNABLE, "workers and the momentum state depend on them"


# --- Delayed Nesterov ----------------------------------------------------------------------------

def _deltas(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g), "bias": torch.randn(4, generator=g),
             "stat": torch.randn(4, generator=g)} for _ in range(count)]


def _start() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(7)
    theta = {"w": torch.randn(3, 4, generator=g), "bias": torch.randn(4, generator=g),
             "stat": torch.randn(4, generator=g), "count": torch.tensor(3)}
    return theta, {"w": torch.zeros(3, 4), "bias": torch.zeros(4)}


def test_delayed_nesterov_with_a_buffer_of_one_is_nesterov_bit_for_bit():
    theta, b = _start()
    t1, b1, t2, b2 = theta, b, theta, b
    for d in _deltas(4):
        t1, b1 = outer.outer_step(t1, b1, d, lr=0.7, mu=0.9, nesterov=True)
        t2, b2 = outer.outer_step(t2, b2, d, lr=0.7, mu=0.9, nesterov=True, dn_buffer=1)
    assert all(torch.equal(t1[k], t2[k]) for k in t1) and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert sorted(b2) == sorted(b), "no Delayed Nesterov state with a buffer of one"
    # and the DN code itself, with n=1, takes Nesterov's steps (to fp32 precision: it is not torch's SGD)
    t4, b4 = dict(theta), dict(b)
    for d in _deltas(4):
        t4, b4 = dict(t4), dict(b4)
        outer.delayed_nesterov_step_(t4, b4, d, lr=0.7, mu=0.9, n=1)
    reference.assert_close({k: v for k, v in t4.items() if k != "count"},
                           {k: v for k, v in t1.items() if k != "count"}, "DN n=1 weights")
    reference.assert_close({k: v for k, v in b4.items() if not k.startswith(outer.DN)}, b1, "DN n=1 momentum")


def test_delayed_nesterov_with_a_buffer_of_three_matches_the_reference_over_seven_deltas():
    theta, b = _start()
    deltas = _deltas(7, seed=1)
    want_theta, want_b = reference.delayed_nesterov(theta, b, deltas, lr=0.7, mu=0.9, n=3)
    got_theta, got_b = theta, b
    for d in deltas:  # through the copying step, as the replay does: the state rides in the momentum dict
        got_theta, got_b = outer.outer_step(got_theta, got_b, d, lr=0.7, mu=0.9, dn_buffer=3)
    assert torch.equal(got_theta["count"], theta["count"]), "integer buffers keep the global value"
    reference.assert_close({k: v for k, v in got_theta.items() if k != "count"},
                           {k: v for k, v in want_theta.items() if k != "count"}, "DN n=3 weights")
    reference.assert_close({k: v for k, v in got_b.items() if not k.startswith(outer.DN)}, want_b,
                           "DN n=3 momentum")
    assert got_b[outer.DN_COUNT].item() == 1.0, "7 = 2*3 + 1: one delta is buffered"
    torch.testing.assert_close(got_b[outer.DN_BUFFER + "w"], deltas[6]["w"])
    # In place and with `arrivals` left to its default of one delta a version (kills
    # outer.x_delayed_nesterov_step___mutmut_1, a default of 2), the same steps.
    in_place_theta, in_place_b = {k: v.clone() for k, v in theta.items()}, {k: v.clone() for k, v in b.items()}
    for d in deltas:
        outer.delayed_nesterov_step_(in_place_theta, in_place_b, d, lr=0.7, mu=0.9, n=3)
    reference.assert_close(in_place_theta, got_theta, "DN n=3 in place")
    # Not Nesterov: the momentum moved twice, not seven times.
    nesterov, _ = theta, b
    for d in deltas:
        nesterov, _ = outer.outer_step(nesterov, _, d, lr=0.7, mu=0.9)
    assert not torch.allclose(nesterov["w"], got_theta["w"], atol=1e-3)



def test_delayed_nesterov_counts_the_deltas_of_a_grace_batch_not_the_versions():
    """A version of k deltas counts k toward the buffer of n and moves theta by min(k, n)/n of their
    mean (a reference in float64 over batches of 2, 1, 3, 1, 4 deltas with n = 3)."""
    theta, b = _start()
    deltas, sizes = _deltas(5, seed=2), [2, 1, 3, 1, 4]
    want_theta, want_b = reference.delayed_nesterov(theta, b, deltas, lr=0.7, mu=0.9, n=3, arrivals=sizes)
    got_theta, got_b = theta, b
    for d, k in zip(deltas, sizes, strict=True):
        got_theta, got_b = outer.outer_step(got_theta, got_b, d, lr=0.7, mu=0.9, dn_buffer=3, arrivals=k)
    reference.assert_close({k: v for k, v in got_theta.items() if k != "count"},
                           {k: v for k, v in want_theta.items() if k != "count"}, "DN batches weights")
    reference.assert_close({k: v for k, v in got_b.items() if not k.startswith(outer.DN)}, want_b,
                           "DN batches momentum")
    assert got_b[outer.DN_COUNT].item() == 0.0, "2+1 = 3, then 3, then 1+4 = 5 >= 3: every buffer was spent"



def test_delayed_nesterov_keeps_each_tensors_dtype():
    """bf16 parameters and float buffers step in fp32 and stay bf16 (kills
    outer.x_delayed_nesterov_step___mutmut_55 and _68: the stepped value left in fp32)."""
    theta, b = _start()
    theta = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in theta.items()}
    got_theta, got_b = theta, b
    for d in _deltas(2, seed=4):
        got_theta, got_b = outer.outer_step(got_theta, got_b, d, lr=0.7, mu=0.9, dn_buffer=2)
    assert {k: v.dtype for k, v in got_theta.items()} == {k: v.dtype for k, v in theta.items()}
    assert got_b["w"].dtype == torch.float32, "the momentum stays fp32"

def test_delayed_nesterov_with_every_version_a_batch_of_n_is_the_sync_nesterov_step():
    """n workers whose deltas always share a grace window: each version is one Nesterov step on their
    mean, as in a sync round (to fp32 precision)."""
    theta, b = _start()
    t_dn, b_dn, t_sync, b_sync = theta, b, theta, b
    for d in _deltas(5, seed=3):
        t_dn, b_dn = outer.outer_step(t_dn, b_dn, d, lr=0.7, mu=0.9, dn_buffer=4, arrivals=4)
        t_sync, b_sync = outer.outer_step(t_sync, b_sync, d, lr=0.7, mu=0.9)
    reference.assert_close(t_dn, t_sync, "DN of full batches vs Nesterov weights")
    reference.assert_close({k: v for k, v in b_dn.items() if not k.startswith(outer.DN)}, b_sync,
                           "DN of full batches vs Nesterov momentum")

# --- staleness -----------------------------------------------------------------------------------

def _ann(cfg: RunConfig, worker: str, version: int, unit_bits: list[int], epoch: int, **kw) -> Announcement:
    prefix = keys.delta_prefix(cfg.run, version, worker)
    fields = {"run": cfg.run, "worker": worker, "nonce": "n", "version": version, "codec": cfg.codec,
              "shards": (prefix + "x-0",), "sizes": (10,), "digest": ("0" * 64,), "samples": 40, "tokens": 40,
              "inner_steps": cfg.sync_every, "loss": 1.0, "units": tuple((epoch, b) for b in unit_bits)}
    return Announcement(**{**fields, **kw})


def test_async_accepts_bases_within_max_staleness_and_rejects_older_ones_naming_the_staleness(redis_url, file_url,
                                                                                             r):
    cfg = harness.init(redis_url, file_url, mode="async", max_staleness=4)
    head = dataclasses.replace(runs.read_head(r, RUN), version=6)
    rnd = Round(head=head, last_id="0-0")
    assert check(_ann(cfg, "w0", 2, [0], 0), cfg, rnd) is None
    assert check(_ann(cfg, "w0", 6, [0], 0), cfg, rnd) is None
    assert check(_ann(cfg, "w0", 1, [0], 0), cfg, rnd) == (
        "stale: trained on version 1, the head is version 6: staleness 5 exceeds max_staleness 4")
    assert "ahead of the committed version 6" in check(_ann(cfg, "w0", 7, [0], 0), cfg, rnd)
    sync = cfg.replace(mode="sync")
    assert check(_ann(cfg, "w0", 5, [0], 0), sync, rnd).startswith("late: trained on version 5")


# --- the grace window ----------------------------------------------------------------------------

def _stream_three(r, cfg) -> list[str]:
    """Three valid announcements on version 0 with set Redis timestamps: 1000 ms, 1500 ms and 5000 ms."""
    plan = units.plan_for(r, cfg)
    want = units.units_per_round(cfg)
    epoch = int(r.hget(keys.units_meta(RUN, plan.dataset), "epoch_lo") or 0)
    ids = []
    for i, ms in enumerate((1000, 1500, 5000)):
        ann = _ann(cfg, f"w{i}", 0, list(range(i * want, (i + 1) * want)), epoch)
        ids.append(r.xadd(keys.deltas(RUN), ann.to_fields(), id=f"{ms}-0"))
    return ids


def _collect(r, cfg, last_id: str) -> Round:
    import threading

    rnd = Round(head=runs.read_head(r, RUN), last_id=last_id)
    assert collect(r, cfg, units.plan_for(r, cfg), rnd, block_ms=50, stop=threading.Event())
    return rnd


def test_deltas_within_the_grace_window_make_one_version_and_a_later_one_the_next(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, mode="async", grace_s=1.0, task_options={"num_samples": 400})
    ids = _stream_three(r, cfg)
    first = _collect(r, cfg, "0-0")
    assert sorted(first.accepted) == ["w0", "w1"] and first.last_id == ids[1], "5000 ms is past 1000 + 1000 ms"
    second = _collect(r, cfg, first.last_id)
    assert sorted(second.accepted) == ["w2"] and second.last_id == ids[2]


def test_without_a_grace_window_each_delta_is_a_version_of_its_own(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, mode="async", task_options={"num_samples": 400})
    ids = _stream_three(r, cfg)
    last = "0-0"
    for i in range(3):
        rnd = _collect(r, cfg, last)
        assert list(rnd.accepted) == [f"w{i}"] and rnd.last_id == ids[i]
        last = rnd.last_id



def test_a_grace_window_closes_once_every_live_worker_has_a_delta_in_it(redis_url, file_url, r):
    import threading

    cfg = harness.init(redis_url, file_url, mode="async", grace_s=600.0, task_options={"num_samples": 400})
    plan, want = units.plan_for(r, cfg), units.units_per_round(cfg)
    epoch = int(r.hget(keys.units_meta(RUN, plan.dataset), "epoch_lo") or 0)
    for w in ("w0", "w1"):
        r.sadd(keys.workers(RUN), w)
        r.set(keys.worker_alive(RUN, w), "1", ex=600)

    def announce(i: int) -> str:
        ann = _ann(cfg, f"w{i}", 0, list(range(i * want, (i + 1) * want)), epoch)
        return r.xadd(keys.deltas(RUN), ann.to_fields())

    def collected(last_id: str, give_up_s: float) -> tuple[bool, Round]:
        rnd, stop = Round(head=runs.read_head(r, RUN), last_id=last_id), threading.Event()
        timer = threading.Timer(give_up_s, stop.set)
        timer.start()
        try:
            return collect(r, cfg, plan, rnd, block_ms=50, stop=stop), rnd
        finally:
            timer.cancel()

    announce(0)
    closed, rnd = collected("0-0", 1.0)
    assert not closed and list(rnd.accepted) == ["w0"], "w1 is live and has not answered: the window stays open"
    second = announce(1)
    closed, rnd = collected("0-0", 60.0)   # not the 600 s window: closed as soon as w1's delta is read
    assert closed and sorted(rnd.accepted) == ["w0", "w1"] and rnd.last_id == second

# --- weights in the reduce -----------------------------------------------------------------------

def test_the_reduce_weights_each_delta_by_weight_times_scale_over_the_sum_of_weights(tmp_path):
    store = open_store(tmp_path.as_uri())
    codec = get_codec("fp32")
    like = {"a": torch.zeros(5), "b": torch.zeros(2, 3)}
    deltas = _deltas_like(like, 3)
    anns = []
    for i, d in enumerate(deltas):
        shards = encode_delta(d, codec, 1 << 20)
        names = tuple(f"d/{i}/{j}" for j in range(len(shards)))
        shas = tuple(put_idempotent(store, k, s) for k, s in zip(names, shards, strict=True))
        anns.append((f"{i + 1}-0", Announcement(
            run="t", worker=f"w{i}", nonce="n", version=0, codec="fp32", shards=names,
            sizes=tuple(len(s) for s in shards), digest=shas, samples=1, tokens=(i + 1) * 100, inner_steps=5,
            loss=1.0, norm=l2_norm(d.values()))))
    factors = [(100.0, 1.0), (200.0, 0.5), (300.0, 1 / math.sqrt(3))]
    with ThreadPoolExecutor(2) as pool:
        red = Reducer(store, codec, like, 1 << 20, pool)
        for (entry_id, ann), f in zip(anns, factors, strict=True):
            assert red.add(entry_id, ann, factors=f) is None
        got = red.result()
        plain = Reducer(store, codec, like, 1 << 20, pool)
        for entry_id, ann in anns:
            plain.add(entry_id, ann)
        uniform = plain.result()
    want = {n: sum(w * s * d[n].double() for (w, s), d in zip(factors, deltas, strict=True)) / 600.0 for n in like}
    reference.assert_close(got.mean, want, "the weighted mean")
    assert got.factors == factors
    # weights all 1: exactly the unweighted mean's bits (sync runs committed before weights replay so)
    mean = {n: torch.stack([d[n] for d in deltas]).sum(0) / 3 for n in like}
    reference.assert_close(uniform.mean, mean, "the uniform mean")
    assert not torch.allclose(got.mean["a"], uniform.mean["a"]), "the weights change the mean"


def test_a_deltas_weight_is_its_tokens_and_its_scale_one_over_sqrt_one_plus_staleness(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, mode="async", aggregation="tokens", staleness_weight="inv_sqrt")
    ann = _ann(cfg, "w0", 2, [0], 0, tokens=300)
    assert weighting.factors("tokens", "inv_sqrt", 5, ann) == (300.0, 0.5)   # staleness 3
    assert weighting.factors("uniform", "none", 5, ann) == (1.0, 1.0)
    assert weighting.stats(cfg, 5, [ann]) == {"aggregation": "tokens", "staleness_weight": "inv_sqrt",
                                              "staleness": "3", "delta_weights": "300.0", "delta_scales": "0.5"}
    assert weighting.stats(cfg.replace(mode="sync", staleness_weight="none", aggregation="uniform"), 5, [ann]) == {}


def _deltas_like(like, count):
    g = torch.Generator().manual_seed(3)
    return [{n: torch.randn(t.shape, generator=g) for n, t in like.items()} for _ in range(count)]


# --- an async run, replayed; and the aggregator killed mid-stream --------------------------------

ASYNC = {"mode": "async", "dn_buffer": 2, "aggregation": "tokens", "staleness_weight": "inv_sqrt",
         "outer_lr": 0.7, "outer_momentum": 0.9, "task_options": {"num_samples": 400}}


def _reference_run(r, store) -> None:
    """Recompute every committed version from v0 with float64 DN and weights from the announcements
    (tokens, 1/sqrt(1+staleness)) and check the committed weights against it."""
    theta = st_load(store.get(keys.weights_object(RUN, 0, 0)))
    floats = {n: t for n, t in theta.items() if t.is_floating_point()}
    b = st_load(store.get(keys.momentum_object(RUN, 0, 0)))
    mean_deltas, lr_mu = [], []
    for _, entry in r.xrange(keys.versions(RUN)):
        anns = [Announcement.from_fields(r.xrange(keys.deltas(RUN), i, i)[0][1]) for i in entry["entries"].split(",")]
        ws = [float(a.tokens) for a in anns]
        ss = [1 / math.sqrt(1 + int(entry["version"]) - 1 - a.version) for a in anns]
        ds = [reference.fp32_delta([store.get(k) for k in a.shards], floats) for a in anns]
        mean_deltas.append(reference.weighted_mean(ds, ws, ss))
        lr_mu.append((float(entry["outer_lr"]), float(entry["outer_momentum"])))
        assert entry["staleness"] == ",".join(str(int(entry["version"]) - 1 - a.version) for a in anns)
    assert len({m for m in lr_mu}) == 1
    (lr, mu), = set(lr_mu)
    want, _ = reference.delayed_nesterov(theta, b, mean_deltas, lr=lr, mu=mu, n=2)
    last = r.xrevrange(keys.versions(RUN), count=1)[0][1]
    got = st_load(store.get(last["weights"]))
    reference.assert_close({n: got[n] for n in floats}, {n: want[n] for n in floats}, "the last version's weights")


def test_an_async_run_commits_a_version_per_delta_with_stale_ones_weighted_and_replays_bit_for_bit(
        redis_url, file_url, r):
    harness.init(redis_url, file_url, **ASYNC)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    # Both announce on version 0 before any commit, so the second delta committed is one version stale.
    harness.wait_until_len(r, keys.deltas(RUN), 2)
    agg = harness.aggregator(redis_url, file_url, max_rounds=4)
    assert agg.result() == 4 and [w.result() for w in ws] == [2, 2]
    entries = [f for _, f in r.xrange(keys.versions(RUN))]
    assert [e["n"] for e in entries] == ["1"] * 4, "one version per delta (grace_s 0)"
    assert entries[1]["staleness"] == "1" and entries[1]["delta_scales"] == repr(1 / math.sqrt(2))
    assert all(e["delta_weights"] == e["tokens"] + ".0" for e in entries), "aggregation=tokens"
    store = open_store(file_url)
    result = replay(r, store, RUN)
    assert (result.versions, result.mismatched) == (4, [])
    _reference_run(r, store)



def test_a_grace_window_of_every_worker_is_one_delayed_nesterov_step_of_their_deltas_and_replays(redis_url, file_url,
                                                                                              r):
    """Two live workers, a window that closes once both are in it: each version holds both deltas,
    Delayed Nesterov counts two arrivals (n = 2: every version moves the momentum), and the replay
    agrees (kills Aggregator._step_and_commit 31: the aggregator counting one arrival a version)."""
    harness.init(redis_url, file_url, mode="async", grace_s=60.0, dn_buffer=2, task_options={"num_samples": 400})
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    harness.wait_until_len(r, keys.deltas(RUN), 2)
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    assert agg.result() == 2 and [w.result() for w in ws] == [2, 2]
    assert [e["n"] for _, e in r.xrange(keys.versions(RUN))] == ["2", "2"]
    store = open_store(file_url)
    momentum = runs.load_momentum(store, runs.read_head(r, RUN))
    assert momentum[outer.DN_COUNT].item() == 0.0, "2 + 2 arrivals: the buffer was spent at each version"
    result = replay(r, store, RUN)
    assert (result.versions, result.mismatched) == (2, [])

def test_the_aggregator_killed_mid_stream_in_async_mode_a_standby_commits_the_same_versions(
        redis_url, file_url, r, procs_for):  # noqa: F811
    harness.init(redis_url, file_url, **ASYNC, **FAST)
    procs = procs_for(redis_url, file_url)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    harness.wait_until_len(r, keys.deltas(RUN), 2)
    a = procs.aggregator("aggA", env={ENV_CRASH_AT: "after_write"})   # dies before committing version 1
    harness.wait_for_key(r, keys.lock_token(RUN))
    b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=2)
    try:
        assert a.wait(timeout=60) == CRASH_EXIT_CODE
        assert [w.result() for w in ws] == [2, 2]
        entries = harness.wait_for_version(r, RUN, 4)
    finally:
        b.stop()
    assert [int(e["version"]) for e in entries] == [1, 2, 3, 4], "every version committed exactly once"
    assert {e["aggregator"] for e in entries} == {"aggB"}
    store = open_store(file_url)
    orphan = keys.weights_object(RUN, 1, 1)
    assert digest_of(store.get(orphan)) == entries[0]["weights_digest"], "the redo is bit-identical"
    result = replay(r, store, RUN)
    assert (result.versions, result.mismatched) == (4, [])
    _reference_run(r, store)


def test_status_shows_each_async_versions_staleness_and_sync_tables_are_unchanged():
    from rich.console import Console

    from diloco.view import rounds_table

    rounds = [{"version": 7, "n": 2, "loss": 1.0, "duration_s": 0.5, "bytes": 10, "rejected": 0,
               "aggregator": "agg", "staleness": "0,3"}]

    def render(mode: str) -> str:
        console = Console(record=True, width=200)
        console.print(rounds_table({"config": {"mode": mode}, "rounds": rounds}))
        return console.export_text()

    assert "staleness" in render("async") and "0,3" in render("async")
    assert "staleness" not in render("sync")


# --- DyLU ------------------------------------------------------------------------------------------

def test_dylu_h_is_the_speed_share_of_sync_every_floored_and_at_least_h_min():
    cfg = RunConfig.from_options("t", {"mode": "async", "dylu": True, "h_min": 3, "sync_every": 20})
    assert dylu.inner_steps(cfg, 1.0, [3.0, 2.0]) == 6        # floor(20 * 1/3)
    assert dylu.inner_steps(cfg, 0.1, [3.0]) == 3             # floor(0.67) -> h_min
    assert dylu.inner_steps(cfg, 3.0, [1.0, 2.0]) == 20       # the fastest trains sync_every
    assert dylu.inner_steps(cfg, None, [3.0]) == 20           # no rate of its own yet
    assert dylu.inner_steps(cfg, 1.0, [float("nan"), -1.0]) == 20, "nonsense rates are ignored"
    assert dylu.inner_steps(cfg.replace(dylu=False), 1.0, [3.0]) == 20
    with pytest.raises(ConfigError, match="h_min must be in"):
        cfg.replace(h_min=21)
    assert RunConfig.from_options("t", {"dylu": True}).dylu, "a sync round ends sooner when its slow workers train less"


def test_dylu_accepts_fewer_inner_steps_with_units_to_match_and_sync_does_not(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, mode="async", dylu=True, h_min=2, task_options={"num_samples": 400})
    rnd = Round(head=runs.read_head(r, RUN), last_id="0-0")
    per_step = cfg.grad_accum * cfg.batch_size // cfg.unit_samples
    assert check(_ann(cfg, "w0", 0, [0], 0, inner_steps=2), cfg, rnd) is None
    assert "outside DyLU's [h_min 2, sync_every 5]" in check(_ann(cfg, "w0", 0, [0], 0, inner_steps=1), cfg, rnd)
    assert "outside DyLU's" in check(_ann(cfg, "w0", 0, [0], 0, inner_steps=6), cfg, rnd)
    sync = cfg.replace(mode="sync", dylu=False)
    assert "the run's sync_every is 5" in check(_ann(cfg, "w0", 0, [0], 0, inner_steps=2), sync, rnd)
    plan = units.plan_for(r, cfg)
    from aggregator.units_check import units_problem

    two = _ann(cfg, "w0", 0, list(range(2 * per_step)), 0, inner_steps=2)
    assert units_problem(r, cfg, plan, two) is None
    assert "a round trains on" in units_problem(r, cfg, plan, dataclasses.replace(two, inner_steps=3))
    # Redis wiped under the round (units meta gone, or half restored by `recover`): the round waits for
    # the run to come back instead of rejecting the worker's delta as out of the epoch window
    r.hdel(keys.units_meta(RUN, cfg.dataset_id), "epoch_lo", "epoch_hi")
    with pytest.raises(RunNotFound, match="no work-unit window"):
        units_problem(r, cfg, plan, two)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_dylu_worker_slower_than_the_fastest_live_one_trains_h_min_steps_and_the_run_replays(
        redis_url, file_url, r, mode):
    # A sync round waits for every live worker, the fake one below too, until its timeout.
    harness.init(redis_url, file_url, mode=mode, dylu=True, h_min=2, task_options={"num_samples": 400},
                 **({"round_timeout_s": 2.0} if mode == "sync" else {}))
    # A live worker measured at a million steps/s: every real worker is slower than it.
    r.sadd(keys.workers(RUN), "fast")
    r.set(keys.worker_alive(RUN, "fast"), "1", ex=600)
    r.hset(keys.worker_stats(RUN, "fast"), "steps_per_s", "1000000")
    assert dylu.speeds(r, RUN) == {"fast": 1e6}
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=2)
    assert w0.result() == 2 and agg.result() == 2
    entries = [f for _, f in r.xrange(keys.versions(RUN))]
    anns = [Announcement.from_fields(r.xrange(keys.deltas(RUN), e["entries"], e["entries"])[0][1]) for e in entries]
    # Round 1: no rate of its own yet, so sync_every; round 2: its measured rate is far below the fastest.
    assert [a.inner_steps for a in anns] == [5, 2]
    assert [a.samples for a in anns] == [5 * 8, 2 * 8] and [len(a.units) for a in anns] == [5, 2]
    result = replay(r, open_store(file_url), RUN)
    assert (result.versions, result.mismatched) == (2, [])


def test_a_sync_run_with_token_weights_records_them_and_replays_bit_for_bit(redis_url, file_url, r):
    harness.init(redis_url, file_url, min_workers=2, aggregation="tokens", task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    assert agg.result() == 2 and [w.result() for w in ws] == [2, 2]
    entries = [f for _, f in r.xrange(keys.versions(RUN))]
    assert [(e["n"], e["aggregation"], e["staleness"], e["delta_scales"]) for e in entries] == [
        ("2", "tokens", "0,0", "1.0,1.0")] * 2
    assert all(e["delta_weights"] == "40.0,40.0" for e in entries)   # 5 steps of 8 samples of 1 token (tiny)
    result = replay(r, open_store(file_url), RUN)
    assert (result.versions, result.mismatched) == (2, [])


def test_status_shows_each_dylu_workers_h_and_other_runs_do_not():
    from rich.console import Console

    from diloco.view import workers_table

    workers = [{"id": "w0", "alive": True, "rejected": 0, "inner_steps": 7, "state": "training",
                "heartbeat_age_s": 0.1}]

    def render(dylu: bool) -> str:
        console = Console(record=True, width=250)
        console.print(workers_table({"config": {"dylu": dylu}, "workers": workers}))
        return console.export_text()

    assert "┃ H ┃" in render(True) and "│ 7 │" in render(True)
    assert "┃ H ┃" not in render(False) and "│ 7 │" not in render(False)


@pytest.mark.parametrize("width", [160, 70])
def test_the_monitor_shows_each_dylu_workers_h_and_other_runs_do_not(width):
    from rich.console import Console

    from diloco.view import live_workers_table

    workers = [{"id": "w0", "alive": True, "inner_steps": 7, "state": "training", "heartbeat_age_s": 0.1,
                "loss": 1.5}]

    def render(dylu: bool) -> str:
        console = Console(record=True, width=width)
        console.print(live_workers_table({"config": {"dylu": dylu}, "workers": workers}, width))
        return console.export_text()

    header, row = render(True).splitlines()[:2]
    assert header.split()[header.split().index("loss") - 1] == "H", header
    assert re.search(r"\b7\s+1\.5000\b", row), row
    assert "H" not in render(False).splitlines()[0].split() and not re.search(r"\b7\b", render(False))

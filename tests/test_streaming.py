"""Streaming DiLoCo (issue 16): fragments as lanes with their own versions, locks and aggregators; the
worker's overlap (tau) and merge (alpha) against references computed here; a killed fragment
aggregator redone by another process; announcements for a fragment that does not exist rejected.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from aggregator.collect import Round, check
from diloco import export, fragments, keys, model, runs, snapshot
from diloco.audit import audit
from diloco.config import ENV_CRASH_AT, RunConfig
from diloco.errors import ConfigError, ModelMismatch
from diloco.faults import CRASH_EXIT_CODE
from diloco.messages import Announcement
from diloco.replay import replay
from diloco.store import digest_of, open_store
from tests import harness
from tests.harness import wait_until
from tests.test_faults import FAST, ThreadLog, procs_for  # noqa: F401  (procs_for: a fixture)
from workers.streaming import MergeInfo, merge_
from workers.worker import RoundInfo

RUN = "t"
STREAM = {"sync_every": 4, "num_fragments": 2, "overlap_steps": 1, "merge_alpha": 0.5, "min_workers": 2}


def _lanes(cfg: RunConfig) -> list[str]:
    return [keys.lane(RUN, f) for f in range(cfg.num_fragments)]


# --- init and settings ---------------------------------------------------------------------------

def test_init_writes_each_fragments_version_zero_with_exactly_its_entries(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, **STREAM)
    store = open_store(file_url)
    assert cfg.lanes == ["t@f0", "t@f1"] and cfg.fragment_plan
    assert not r.exists(keys.head(RUN)), "a streaming run has no whole-model head"
    parts = [runs.load_weights(store, runs.read_head(r, lane)) for lane in cfg.lanes]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    joined = fragments.join({**parts[0], **parts[1]})
    assert model.model_hash(joined) == cfg.model_hash, "the fragments join into the run's model"
    assert runs.read_head(r, "t@f1").weights.startswith("runs/t/f1/weights/v00000000")


def test_a_worker_whose_model_cuts_into_other_fragments_is_refused(redis_url, file_url, r):
    harness.init(redis_url, file_url, **STREAM)
    r.hset(keys.config(RUN), "fragment_plan", "0123456789abcdef")
    with pytest.raises(ModelMismatch, match="cuts into other fragments"):
        harness.worker(redis_url, file_url, "w0", start=False)


def test_an_aggregator_for_a_fragment_the_run_does_not_have_is_refused(redis_url, file_url):
    harness.init(redis_url, file_url, **STREAM)
    with pytest.raises(ConfigError, match="has fragments 0-1, not 2"):
        harness.aggregator(redis_url, file_url, fragment=2, start=False)


@pytest.mark.parametrize(("fragment", "lane", "reason"), [
    (9, "t@f0", "fragment 9 does not exist: run 't' has 2 (0-1)"),
    (1, "t@f0", "announced for fragment 1 on the deltas stream of fragment 0"),
    (0, "t@f0", None),
])
def test_an_announcement_for_another_or_a_missing_fragment_is_rejected_with_its_reason(fragment, lane, reason):
    cfg = RunConfig.from_options(RUN, {**STREAM, "codec": "fp32"})
    head = runs.parse_head(lane, {"version": "0", "weights": "w", "weights_digest": "0" * 64, "momentum": "m",
                                  "momentum_digest": "0" * 64, "token": "0", "committed_ms": "0",
                                  "deltas_since": "0-0"})
    prefix = keys.delta_prefix(lane, 0, "w0")
    ann = Announcement(run=RUN, worker="w0", nonce="n0", version=0, codec="fp32", shards=(prefix + "x-0000",),
                       sizes=(10,), digest=("0" * 64,), samples=16, tokens=16, inner_steps=2, loss=1.0,
                       fragment=fragment)
    assert check(ann, cfg, Round(head=head, last_id="0-0", lane=lane)) == reason


def test_error_feedback_keeps_each_fragments_residual_across_the_others_syncs(redis_url, file_url):
    harness.init(redis_url, file_url, **{**STREAM, "codec": "int8"})
    w = harness.worker(redis_url, file_url, "w0", start=False).service
    parts = w.streaming.lanes
    g = torch.Generator().manual_seed(0)
    for lane in parts:   # fragment 0's delta, then fragment 1's
        delta = {n: torch.randn(t.shape, generator=g) for n, t in fragments.part(w.model.state_dict(),
                                                                                 lane.names).items()}
        w._encode_with_feedback(delta, 0)
    assert set(w.residual) == {n for lane in parts for n in lane.names}, "both fragments' residuals are kept"
    assert all(bool(r.abs().sum() > 0) for r in w.residual.values())


def test_merge_is_alpha_local_plus_one_minus_alpha_global_and_copies_what_is_not_floating():
    g = torch.Generator().manual_seed(0)
    local = {"w": torch.randn(50, generator=g), "n": torch.tensor(3)}
    glob = {"w": torch.randn(50, generator=g), "n": torch.tensor(7)}
    expected = 0.3 * local["w"].double() + 0.7 * glob["w"].double()
    merge_(local, glob, 0.3)
    torch.testing.assert_close(local["w"].double(), expected, rtol=1e-6, atol=1e-7)
    assert local["n"].item() == 7
    merge_(local, glob, 0.0)
    assert torch.equal(local["w"], glob["w"]), "alpha 0 takes the global fragment exactly"


# --- a streaming run, end to end -------------------------------------------------------------------

def test_a_streaming_run_overlaps_tau_steps_merges_with_alpha_and_commits_each_fragment_exactly_once(
        redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, **STREAM, **FAST)
    store = open_store(file_url)
    events: dict[str, list] = {"w0": [], "w1": []}
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    ws = [harness.worker(redis_url, file_url, w, max_rounds=6, observer=events[w].append) for w in events]
    try:
        assert [w.result() for w in ws] == [6, 6]
        entries = {lane: harness.wait_for_version(r, lane, 3) for lane in _lanes(cfg)}
    finally:
        for a in aggs:
            a.stop()
    for f, lane in enumerate(_lanes(cfg)):
        assert [int(e["version"]) for e in entries[lane]] == [1, 2, 3], "every fragment version once"
        assert {e["aggregator"] for e in entries[lane]} == {f"agg{f}"}
        assert all(e["n"] == "2" for e in entries[lane])
        assert replay(r, store, lane).mismatched == []
    interval = cfg.sync_every // cfg.num_fragments
    for evs in events.values():
        sends = [e for e in evs if isinstance(e, RoundInfo)]
        merges = [e for e in evs if isinstance(e, MergeInfo)]
        assert len(sends) == 6 and all(s.optimizer_steps == interval for s in sends)
        # fragment 1 syncs after step 2, fragment 0 after step 4, ...; each merges tau = 1 step later
        assert [m.fragment for m in merges] == [1, 0, 1, 0, 1, 0]
        assert [m.step for m in merges] == [3, 5, 7, 9, 11, 12], "the last merges when the worker ends"
        assert [m.version for m in merges] == [1, 1, 2, 2, 3, 3]
        for m in merges:
            committed = runs.load_weights(store, _head_of(r, store, keys.lane(RUN, m.fragment), m.version))
            assert committed.keys() == m.global_.keys()
            assert all(torch.equal(committed[n], m.global_[n]) for n in committed), "merged the committed bits"
            for n, merged in m.merged.items():
                if merged.is_floating_point():
                    expected = 0.5 * m.local[n].double() + 0.5 * m.global_[n].double()
                    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)
                else:
                    assert torch.equal(merged, m.global_[n])
    _check_units_exactly_once(r, cfg, entries, expected_units=2 * 6 * interval)


def test_with_gradient_accumulation_the_schedule_counts_optimizer_steps_and_updates_arrive_compressed(
        redis_url, file_url, r):
    harness.init(redis_url, file_url, **{**STREAM, "min_workers": 1, "grad_accum": 2, "overlap_steps": 0,
                                         "merge_alpha": 0.0, "codec": "int8"}, **FAST)
    store = open_store(file_url)
    events: list = []
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    w = harness.worker(redis_url, file_url, "w0", max_rounds=4, observer=events.append)
    try:
        assert w.result() == 4
    finally:
        for a in aggs:
            a.stop()
    sends = [e for e in events if isinstance(e, RoundInfo)]
    merges = [e for e in events if isinstance(e, MergeInfo)]
    assert [(s.optimizer_steps, s.micro_batches) for s in sends] == [(2, 4)] * 4
    assert [(m.fragment, m.step) for m in merges] == [(1, 2), (0, 4), (1, 6), (0, 8)], "tau 0: merged at once"
    assert all(torch.equal(m.merged[n], m.global_[n]) for m in merges for n in m.merged)
    anns = [f for lane in ("t@f0", "t@f1") for _, f in r.xrange(keys.deltas(lane))]
    assert sorted(int(f["inner_steps"]) for f in anns) == [2] * 4
    # int8 uploads, int8 updates down: version 0 of each fragment read whole, every later version as its
    # published update, bit for bit the committed weights object
    stats = r.hgetall(keys.worker_stats(RUN, "w0"))
    assert (stats["updates_applied"], stats["update_fallbacks"], stats["full_downloads"]) == ("4", "0", "2")
    for m in merges:
        committed = runs.load_weights(store, _head_of(r, store, keys.lane(RUN, m.fragment), m.version))
        assert all(torch.equal(committed[n], m.global_[n]) for n in committed)


def _head_of(r, store, lane: str, version: int):
    entry = next(f for _, f in r.xrange(keys.versions(lane)) if int(f["version"]) == version)
    return runs.parse_head(lane, {"version": entry["version"], "weights": entry["weights"],
                                  "weights_digest": entry["weights_digest"], "momentum": entry["momentum"],
                                  "momentum_digest": entry["momentum_digest"], "token": "0", "committed_ms": "0",
                                  "deltas_since": "0-0"})


def _check_units_exactly_once(r, cfg: RunConfig, entries: dict[str, list[dict]], expected_units: int) -> None:
    """Every committed unit's done bit is set once: the versions' unit counts add up to the bits set."""
    committed = sum(int(e["units"]) for lane in entries for e in entries[lane])
    meta = r.hgetall(keys.units_meta(RUN, cfg.dataset_id))
    done = sum(r.bitcount(keys.units_done(RUN, cfg.dataset_id, ep)) for ep in
               range(int(meta["epoch_lo"]), int(meta["epoch_hi"]) + 1))
    assert committed == done == expected_units // (cfg.unit_samples // cfg.batch_size)


def test_export_joins_every_fragment_at_its_newest_version(redis_url, file_url, r, tmp_path):
    cfg = harness.init(redis_url, file_url, **{**STREAM, "min_workers": 1}, **FAST)
    store = open_store(file_url)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    w = harness.worker(redis_url, file_url, "w0", max_rounds=3)   # fragment 1 twice, fragment 0 once
    try:
        assert w.result() == 3
    finally:
        for a in aggs:
            a.stop()
    heads = runs.read_heads(r, cfg)
    assert [h.version for h in heads] == [1, 2]
    out = export.export(r, store, RUN, tmp_path / "m.safetensors")
    assert out.metadata["fragment_versions"] == [1, 2] and out.version == 1
    loaded, _ = export.load_model(tmp_path / "m.safetensors")
    expected = runs.load_full_weights(store, heads)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in expected.items())
    with pytest.raises(ConfigError, match="leave --version out"):
        export.export(r, store, RUN, tmp_path / "v.safetensors", version=1)
    assert store.list(keys.snapshot_prefix("t@f1")), "each fragment's commits write its own snapshots"
    before = {lane: (r.hgetall(keys.head(lane)), r.xrange(keys.versions(lane))) for lane in cfg.lanes}
    units_before = r.hgetall(keys.units_meta(RUN, cfg.dataset_id))
    r.flushdb()
    assert snapshot.recover(r, store, RUN) == 1, "the run's version: its least advanced fragment's"
    for lane, (head, versions) in before.items():
        assert r.hgetall(keys.head(lane)) == {**head, "deltas_since": "0-0"}
        assert r.xrange(keys.versions(lane)) == versions
    assert r.hgetall(keys.units_meta(RUN, cfg.dataset_id)) == units_before



def test_status_shows_each_fragment_the_monitor_renders_them_and_a_late_worker_takes_up_the_order(
        redis_url, file_url, r):
    from rich.console import Console

    from diloco import status, view

    harness.init(redis_url, file_url, **{**STREAM, "min_workers": 1}, **FAST)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    w = harness.worker(redis_url, file_url, "w0", max_rounds=3)
    try:
        assert w.result() == 3
        snap = status.snapshot(r, RUN)
        # a worker that joins now takes up the group's order: 3 syncs so far (f1, f0, f1), so f0 is next
        late = harness.worker(redis_url, file_url, "w1", max_rounds=1)
        assert late.result() == 1
        assert [(f["worker"], f["fragment"]) for _, f in r.xrange(keys.deltas("t@f0"))][-1] == ("w1", "0")
        assert r.xlen(keys.deltas("t@f1")) == 2, "w1 announced nothing for fragment 1"
    finally:
        for a in aggs:
            a.stop()
    assert [(fr["fragment"], fr["version"]) for fr in snap["fragments"]] == [(0, 1), (1, 2)]
    assert [fr["lock"]["holder"] for fr in snap["fragments"]] == ["agg0", "agg1"]
    assert snap["version"] == 1 and [rd["version"] for rd in snap["rounds"]] == [1], "fragment 0's own"
    assert snap["workers"][0]["fragment_versions"] == "1,2"
    console = Console(record=True, width=200)
    view.print_status(snap, console)
    console.print(view.aggregator_text(snap))
    text = console.export_text()
    assert "fragments (the versions above are fragment 0's)" in text and "versions 1, 2" in text


def test_gc_applies_retention_to_every_fragment(redis_url, file_url, r):
    from diloco.cli import main

    harness.init(redis_url, file_url, **{**STREAM, "min_workers": 1, "keep_last": 1, "keep_every": 0,
                                         "retention_every": 0}, **FAST)
    store = open_store(file_url)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    w = harness.worker(redis_url, file_url, "w0", max_rounds=3)   # fragment 1 to version 2, fragment 0 to 1
    try:
        assert w.result() == 3
    finally:
        for a in aggs:
            a.stop()
    f1_v1 = _head_of(r, store, "t@f1", 1).weights
    assert store.exists(f1_v1)
    assert main(["gc", "--run", RUN, "--redis-url", redis_url, "--store", file_url]) == 0
    assert not store.exists(f1_v1), "fragment 1's version 1 is past keep_last 1"
    for lane, version in (("t@f1", 2), ("t@f0", 1)):
        head = runs.read_head(r, lane)
        assert head.version == version and store.exists(head.weights) and store.exists(head.momentum)


# --- aggregators in processes ------------------------------------------------------------------------

def test_two_aggregators_commit_different_fragments_and_a_killed_ones_fragment_is_redone_by_the_other(
        redis_url, file_url, r, procs_for):  # noqa: F811
    cfg = harness.init(redis_url, file_url, **STREAM, **FAST)
    store = open_store(file_url)
    procs = procs_for(redis_url, file_url)
    a = procs.aggregator("aggA", "--fragments", "1", env={ENV_CRASH_AT: "after_write"})  # dies before f1 v1
    harness.wait_for_key(r, keys.lock_token("t@f1"))   # A holds fragment 1
    b = procs.aggregator("aggB", "--fragments", "0,1")   # fragment 0 at once; fragment 1 once A's lock is gone
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=4) for i in range(2)]
    try:
        assert a.wait(timeout=120) == CRASH_EXIT_CODE
        assert [w.result() for w in ws] == [4, 4]
        entries = {lane: harness.wait_for_version(r, lane, 2) for lane in _lanes(cfg)}
    finally:
        procs.stop(b)
    for lane in _lanes(cfg):
        assert [int(e["version"]) for e in entries[lane]] == [1, 2]
        assert {e["aggregator"] for e in entries[lane]} == {"aggB"}
        assert replay(r, store, lane).mismatched == []
    # A wrote fragment 1's version 1 under its token and died: B's redo is the same bits
    orphan = keys.weights_object("t@f1", 1, 1)
    assert digest_of(store.get(orphan)) == entries["t@f1"][0]["weights_digest"]
    _check_units_exactly_once(r, cfg, entries, expected_units=2 * 4 * 2)


# --- a wipe under a running streaming run, then recover -----------------------------------------------

def _newest_then_wipe(r, cfg: RunConfig, archive: dict[str, dict[str, str]]) -> dict[str, int]:
    """FLUSHALL, with each fragment's newest committed version and its announcements (into `archive`:
    diloco.audit and the replay find the wiped ones there) read in the same transaction."""
    pipe = r.pipeline(transaction=True)
    for lane in cfg.lanes:
        pipe.xrevrange(keys.versions(lane), count=1)
        pipe.xrange(keys.deltas(lane))
    pipe.flushall()
    out = pipe.execute()
    for deltas in out[1:-1:2]:
        archive.update(deltas)
    return {lane: int(newest[0][1]["version"]) for lane, newest in zip(cfg.lanes, out[0:-1:2], strict=True)}


@pytest.mark.parametrize("snapshots_lost", [False, True], ids=["all-snapshots", "newest-snapshots-lost"])
def test_a_streaming_run_wiped_under_running_services_recovers_one_consistent_cut_and_carries_on(
        redis_url, file_url, r, snapshots_lost):
    """With `snapshots_lost` only each fragment's first snapshot is left for the recovery (as if the wipe
    came between the commits and their snapshots): fragments go back, and the workers follow."""
    cfg = harness.init(redis_url, file_url, **{**STREAM, "merge_alpha": 0.0}, **FAST)
    store = open_store(file_url)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    try:
        for lane in cfg.lanes:
            harness.wait_for_version(r, lane, 2)
        archive: dict[str, dict[str, str]] = {}
        with contextlib.ExitStack() as stack:
            noticed = [stack.enter_context(ThreadLog("diloco.connect", "waiting for the run to reappear",
                                                     lambda a=a: a.ident)) for a in aggs]
            before = _newest_then_wipe(r, cfg, archive)
            for seen in noticed:   # so each aggregator is past its last commit and that commit's snapshot
                seen.wait_for(1)
        if snapshots_lost:   # every snapshot but each fragment's first
            for lane in cfg.lanes:
                for key in store.list(keys.snapshot_prefix(lane))[1:]:
                    store.delete(key)
        recovered = snapshot.recover(r, store, RUN)
        restored = {lane: int(r.xrange(keys.versions(lane))[-1][1]["version"]) for lane in cfg.lanes}
        assert recovered == min(restored.values()) >= 1
        assert all(restored[lane] <= before[lane] for lane in cfg.lanes), "only versions committed before"
        if snapshots_lost:
            assert any(restored[lane] < before[lane] for lane in cfg.lanes), "a fragment went back"
        # Nobody is restarted: each fragment's aggregator takes its lock again and its versions go on.
        for lane in cfg.lanes:
            entries = harness.wait_for_version(r, lane, restored[lane] + 2, timeout_s=90)
            assert [int(e["version"]) for e in entries] == list(range(1, restored[lane] + 3))
        assert all(s.is_alive() for s in (*ws, *aggs))
    finally:
        for s in (*ws, *aggs):
            s.service.stop()
    # One consistent cut: the units done are exactly those of the restored versions (as committed before
    # the wipe) and of the versions committed since, each once.
    a = audit(r, cfg, archive)
    assert a.unresolved == []
    assert a.twice == [], "no unit committed twice across the wipe"
    assert a.mismatched == [], "the done units are those of the committed versions, no more, no fewer"
    assert all(replay(r, store, lane, archive).mismatched == [] for lane in cfg.lanes)


def test_a_recovery_that_puts_back_another_fragment_than_the_one_waited_on_restarts_the_groups_order(
        redis_url, file_url, r):
    """The worker waits on fragment 1, whose version the recovery keeps, while fragment 0 goes back: it must
    reload every fragment and sync fragment 0 next, the group's order from the recovered versions (fragment
    (1 + 2) + 1 mod 2), as a worker that restarts would. Syncing fragment 1 again, as after a rejection,
    would leave it waiting on fragment 1 while the others wait on fragment 0 for it (found by CI)."""
    cfg = harness.init(redis_url, file_url, **{**STREAM, "min_workers": 1, "merge_alpha": 0.0}, **FAST)
    store = open_store(file_url)
    agg0 = harness.aggregator(redis_url, file_url, "agg0", fragment=0)
    agg1 = harness.aggregator(redis_url, file_url, "agg1", fragment=1, max_rounds=2)
    w = harness.worker(redis_url, file_url, "w0")
    try:
        assert agg1.result() == 2   # fragment 1 commits versions 1 and 2 (with their snapshots), then no more
        harness.wait_for_version(r, "t@f0", 2)
        # the worker's fifth sync (fragment 1 at version 2) waits for a version nobody commits
        harness.wait_for_field(r, keys.worker_stats(RUN, "w0"), "waiting_for", "fragment 1 version 3")
        newest = keys.snapshot_object("t@f0", 2)
        wait_until(lambda: store.exists(newest), "fragment 0's snapshot of version 2")
        store.delete(newest)   # as if the wipe came before it was written: fragment 0 goes back to version 1
        assert snapshot.recover(r, store, RUN, force=True) == 1
        assert [runs.read_head(r, lane).version for lane in cfg.lanes] == [1, 2]
        f0 = harness.wait_for_version(r, "t@f0", 2, timeout_s=60)   # again, from the worker's delta
        assert len(f0) == 2 and f0[-1]["aggregator"] == "agg0"
    finally:
        for s in (w, agg0):
            s.service.stop()
    sent = sorted((entry_id, lane, int(fields["version"])) for lane in cfg.lanes
                  for entry_id, fields in r.xrange(keys.deltas(lane)))
    assert sent and sent[0][1:] == ("t@f0", 1), f"the first sync after the recovery is fragment 0's: {sent}"


def test_a_rejected_fragment_delta_is_sent_again_for_the_same_fragment_and_its_round_closes(
        redis_url, file_url, r, monkeypatch):
    """The fragment's round still counts on a worker whose delta it rejected (here an outlier): the worker
    syncs that fragment again instead of moving on, or every worker would wait until the deadline."""
    import workers.worker as worker_module

    cfg = harness.init(redis_url, file_url, **{**STREAM, "min_workers": 3, "merge_alpha": 0.0}, **FAST)
    real, blown = worker_module.Worker._encode_with_feedback, []

    def blow_up_once(self, delta, version):
        if self.s.worker_id == "w2" and not blown:   # w2's first delta (fragment 1, version 0) is 1000x too large
            blown.append(version)
            delta = {n: t * 1000 for n, t in delta.items()}
        return real(self, delta, version)

    monkeypatch.setattr(worker_module.Worker, "_encode_with_feedback", blow_up_once)
    aggs = [harness.aggregator(redis_url, file_url, f"agg{f}", fragment=f) for f in range(2)]
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(3)]
    try:
        entries = {lane: harness.wait_for_version(r, lane, 2, timeout_s=60) for lane in cfg.lanes}
    finally:
        for s in (*ws, *aggs):
            s.service.stop()
    ((_, rej),) = r.xrange(keys.rejections("t@f1"))
    assert rej["worker"] == "w2" and rej["reason"].startswith("outlier"), rej
    w2 = [(f["fragment"], f["version"]) for _, f in r.xrange(keys.deltas("t@f1")) if f["worker"] == "w2"]
    assert w2[:2] == [("1", "0"), ("1", "0")], "w2 sent fragment 1's delta for version 0 again"
    assert entries["t@f1"][0]["participants"] == "w0,w1,w2", "and the round counted the second one"

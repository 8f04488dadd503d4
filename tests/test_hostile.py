"""Hostile and broken announcements: each one is rejected with a reason, counted, and never stops the aggregator.

Forged announcements are well-formed where the case needs it: they come from a worker id that holds
real leases on its work units (claimed with `diloco.units.Leases`) and carry shards made with
`encode_delta` from a delta shaped like the model's float tensors, so each is rejected for the one
fault it carries. The services run in-process (tests/harness.py); after the faults the aggregator
must still be alive and commit versions that hold only the honest deltas (checked with replay).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save as st_save

from diloco import keys, runs, shards, units
from diloco.codecs import get_codec
from diloco.messages import Announcement
from diloco.replay import replay
from diloco.shards import encode_delta, l2_norm, max_shard_object_bytes
from diloco.store import digest_of, open_store
from tests import harness

H = harness.TINY["sync_every"]
NORM = 1.0  # announced by forgers: the honest deltas of the tiny task start near 1.7, so no rule flags either


def sha(data: bytes) -> str:
    return digest_of(data)


class Forger:
    """Announcements as a hostile or broken worker makes them: real leases, shards it chose."""

    def __init__(self, r, store_url: str) -> None:
        self.r, self.store = r, open_store(store_url)
        self.cfg = runs.load_config(r, "t")
        weights = runs.load_weights(self.store, runs.read_head(r, "t"))
        self.floats = {n: t for n, t in weights.items() if t.is_floating_point()}
        self.names = sorted(self.floats)

    def delta(self, norm: float = NORM) -> dict[str, torch.Tensor]:
        """A delta of the model's float tensors, every element equal, with L2 norm `norm`."""
        n = sum(t.numel() for t in self.floats.values())
        return {name: torch.full_like(t, norm / n**0.5) for name, t in self.floats.items()}

    def encode(self, delta: dict[str, torch.Tensor]) -> list[bytes]:
        return encode_delta(delta, get_codec("fp32"), self.cfg.shard_bytes)

    def claim(self, worker: str) -> tuple[tuple[int, int], ...]:
        leases = units.Leases(self.r, "t", units.plan_for(self.r, self.cfg), worker, lease_ms=120_000)
        return tuple(leases.claim(units.units_per_round(self.cfg), threading.Event()))

    def announce(self, worker: str, payloads: list[bytes], *, nonce: str = "n1", upload: bool = True,
                 **changes) -> Announcement:
        """Upload `payloads` under the worker's prefix and announce them; `changes` override any field."""
        names = tuple(keys.delta_shard("t", 0, worker, nonce, i) for i in range(len(payloads)))
        if upload:
            for key, data in zip(names, payloads, strict=True):
                self.store.put(key, data)
        fields = dict(run="t", worker=worker, nonce=nonce, version=0, codec="fp32", shards=names,
                      sizes=tuple(len(p) for p in payloads), digest=tuple(sha(p) for p in payloads),
                      samples=H * 8, tokens=H * 8, inner_steps=H, loss=0.5, norm=NORM)
        fields.update(changes)
        if "units" not in fields:
            fields["units"] = self.claim(worker)
        return Announcement(**fields)


def run_round(redis_url: str, store_url: str, r, forged: list[dict[str, str]], *, honest: tuple[str, ...] = ("w1",),
              versions: int = 1) -> list[dict[str, str]]:
    """Put `forged` on the deltas stream, run the aggregator and honest workers for `versions` versions.

    Checks what every hostile test needs: the aggregator is still running after the versions commit,
    and a fault-free replay of the committed deltas reproduces every committed version.
    """
    for fields in forged:
        r.xadd(keys.deltas("t"), fields)
    agg = harness.aggregator(redis_url, store_url)
    ws = [harness.worker(redis_url, store_url, w, max_rounds=versions) for w in honest]
    try:
        for w in ws:
            assert w.result() == versions
        entries = harness.wait_for_version(r, "t", versions)
        assert agg.is_alive(), "the aggregator keeps running after bad input"
    finally:
        committed = agg.stop()
    assert committed == versions
    result = replay(r, open_store(store_url), "t")
    assert result.versions == versions and result.mismatched == []
    return entries


def rejections(r) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, f in r.xrange(keys.rejections("t")):
        out.setdefault(f["worker"], []).append(f["reason"])
    return out


def assert_rejected(r, expected: dict[str, str]) -> None:
    """Each worker in `expected` rejected exactly once, its reason matching the regex; counted per worker."""
    got = rejections(r)
    assert sorted(got) == sorted(expected), got
    for worker, pattern in expected.items():
        assert len(got[worker]) == 1 and re.search(pattern, got[worker][0]), (worker, got[worker])
    assert r.hgetall(keys.rejected_counts("t")) == dict.fromkeys(expected, "1")


# --- the cases: each builds forged entries, and says how each forger's entry is rejected --------------

Case = Callable[[Forger], tuple[list[dict[str, str]], dict[str, str]]]


def malformed(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    template = f.announce("template", f.encode(f.delta())).to_fields()

    def entry(worker: str, drop: str | None = None, **values: str) -> dict[str, str]:
        fields = {**template, "worker": worker, **values}
        if drop:
            del fields[drop]
        return fields

    cases = {
        "no-run": (entry("no-run", drop="run"), r"field 'run' is missing"),
        "no-shards": (entry("no-shards", drop="shards"), r"field 'shards' is missing"),
        "no-kind": (entry("no-kind", drop="kind"), r"field 'kind' is missing"),
        "kind": (entry("kind", kind="weights"), r"unknown kind 'weights'"),
        "version-text": (entry("version-text", version="zero"), r"field 'version' is not an integer: 'zero'"),
        "version-negative": (entry("version-negative", version="-1"), r"field 'version' must be >= 0, got -1"),
        "steps-zero": (entry("steps-zero", inner_steps="0"), r"field 'inner_steps' must be >= 1, got 0"),
        "loss-nan": (entry("loss-nan", loss="nan"), r"field 'loss' is not finite"),
        "norm-text": (entry("norm-text", norm="big"), r"field 'norm' is not a number"),
        "sizes-text": (entry("sizes-text", sizes="many"), r"field 'sizes' holds a non-integer"),
        "sizes-negative": (entry("sizes-negative", sizes="-5"), r"field 'sizes' holds a negative size"),
        "sha-upper": (entry("sha-upper", digest=template["digest"].upper()),
                      r"field 'digest' holds a value that is not 'blake3:' and 64 lowercase hex digits"),
        "lengths": (entry("lengths", sizes="1,2"), r"shards, sizes and digest have different lengths"),
        "units-text": (entry("units-text", units="0-1"), r"field 'units' holds '0-1', not 'epoch:bit'"),
        "units-twice": (entry("units-twice", units="0:1,0:1"), r"field 'units' lists a unit twice"),
        "nonce": (entry("nonce", nonce="../n1"), r"invalid nonce '\.\./n1'"),
        "../w1": (entry("../w1"), r"invalid worker id '\.\./w1'"),
    }
    return ([e for e, _ in cases.values()],
            {w: "^malformed announcement: " + pattern for w, (_, pattern) in cases.items()})


def inconsistent(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    payload = f.encode(f.delta())
    someone_elses = f.claim("someone-else")
    anns = {
        "other-run": (f.announce("other-run", payload, run="other"), r"^announcement is for run 'other'"),
        "ahead": (f.announce("ahead", payload, version=3), r"^base version 3 is ahead of the committed version 0"),
        "codec": (f.announce("codec", payload, codec="bf16"), r"^codec 'bf16' is not the run's codec 'fp32'"),
        "steps": (f.announce("steps", payload, inner_steps=H + 2), rf"^trained {H + 2} inner steps, the run's "
                                                                     rf"sync_every is {H}"),
        "few-units": (f.announce("few-units", payload, units=f.claim("few-units")[:2]),
                      r"^lists 2 work units, a round trains on \d+"),
        "not-my-units": (f.announce("not-my-units", payload, units=someone_elses),
                         r"^work unit \d+:\d+ is leased to someone-else, not to not-my-units \(its lease ended\)"),
        "far-units": (f.announce("far-units", payload, units=((7, 0), *f.claim("far-units")[1:])),
                      r"^work unit 7:0 is out of range"),
    }
    return [a.to_fields() for a, _ in anns.values()], {w: p for w, (_, p) in anns.items()}


def outside_prefix(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    payload = f.encode(f.delta())
    inside = keys.delta_prefix("t", 0, "dotdot")
    forged = {
        "other-worker": keys.delta_shard("t", 0, "w1", "n1", 0),         # another worker's upload
        "dotdot": f"{inside}../w1/n1-0000.safetensors",                   # climbs out of its own prefix
        "weights": keys.weights_object("t", 0, 0),                        # the committed weights
        "other-version": keys.delta_shard("t", 1, "other-version", "n1", 0),
    }
    anns = [f.announce(w, payload, upload=False, shards=(key,)) for w, key in forged.items()]
    return ([a.to_fields() for a in anns],
            {w: rf"^shard key '{re.escape(key)}' is outside the worker's prefix" for w, key in forged.items()})


def bad_objects(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    payload, = f.encode(f.delta())
    limit = max_shard_object_bytes(f.cfg.shard_bytes)
    big = b"\0" * (limit + 1)
    cut = payload[: len(payload) // 2]
    anns = {
        "missing": (f.announce("missing", [payload], upload=False), r"^ObjectMissing: no object "),
        "checksum": (f.announce("checksum", [payload], digest=(sha(b"other bytes"),)),
                     r"^ChecksumMismatch: object .* has digest blake3:[0-9a-f]{64} .* expected "),
        "truncated": (f.announce("truncated", [cut]), r"^BadShard: not a safetensors object"),
        "big-announced": (f.announce("big-announced", [big]),
                          rf"^a shard of {limit + 1} bytes exceeds the run's limit of {limit} bytes"),
        "big-actual": (f.announce("big-actual", [big], sizes=(len(payload),)),
                       rf"^ObjectTooLarge: object .* is {limit + 1} bytes, more than the {limit} allowed"),
    }
    return [a.to_fields() for a, _ in anns.values()], {w: p for w, (_, p) in anns.items()}


def wrong_tensors(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    first, last = f.names[0], f.names[-1]
    good = f.delta()
    extra = {**good, "bogus.weight": torch.zeros(4)}
    int_buffer = {**good, "1.num_batches_tracked": torch.zeros(1)}
    longer = {**good, first: torch.zeros(good[first].numel() + 8)}
    missing = {n: t for n, t in good.items() if n != last}
    n = f.floats[first].numel()
    segments = [[name, 0, f.floats[name].numel()] for name in f.names]
    meta = json.dumps({"format": shards.FORMAT, "codec": "fp32", "segments": segments})
    float64 = st_save({"v": torch.zeros(sum(e[2] for e in segments), dtype=torch.float64)},
                      metadata={"diloco": meta})
    anns = {
        "extra-name": (f.encode(extra), r"^BadShard: tensor 'bogus\.weight' is not a floating tensor of the model"),
        "int-buffer": (f.encode(int_buffer),
                       r"^BadShard: tensor '1\.num_batches_tracked' is not a floating tensor of the model"),
        "longer": (f.encode(longer), rf"^BadShard: slice {re.escape(first)}\[0:{n + 8}\] is out of bounds "
                                     rf"\(numel {n}\)"),
        "missing-tensor": (f.encode(missing), rf"^BadShard: tensor '{re.escape(last)}' covers 0 of \d+ elements"),
        "float64": ([float64], r"^BadShard: part 'v' is torch.float64 .*, expected torch.float32"),
    }
    return ([f.announce(w, payloads).to_fields() for w, (payloads, _) in anns.items()],
            {w: p for w, (_, p) in anns.items()})


def non_finite(f: Forger) -> tuple[list[dict[str, str]], dict[str, str]]:
    out, expected = [], {}
    for worker, value in (("nan", float("nan")), ("inf", float("inf")), ("minus-inf", float("-inf"))):
        delta = f.delta()
        delta[f.names[0]].view(-1)[3] = value
        out.append(f.announce(worker, f.encode(delta)).to_fields())  # the announced norm stays finite
        expected[worker] = rf"^BadShard: slice {re.escape(f.names[0])}\[0:\d+\] holds NaN or Inf"
    return out, expected


CASES: dict[str, Case] = {
    "missing or ill-typed fields": malformed,
    "well-formed but inconsistent": inconsistent,
    "shard key outside the worker's prefix": outside_prefix,
    "missing, corrupt, truncated or oversize object": bad_objects,
    "tensor names, shapes or dtypes of another model": wrong_tensors,
    "NaN or Inf values": non_finite,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_announcement_is_rejected_with_a_reason_and_counted(case, redis_url, file_url, r):
    # shard_mb tiny, so an oversize object is cheap to make (the honest delta of the tiny model still fits).
    harness.init(redis_url, file_url, shard_mb=0.01)
    forged, expected = CASES[case](Forger(r, file_url))
    entries = run_round(redis_url, file_url, r, forged)
    assert [e["participants"] for e in entries] == ["w1"], "only the honest delta is in the average"
    assert_rejected(r, expected)


def test_outlier_norm_and_lying_norm_are_rejected(redis_url, file_url, r, caplog):
    caplog.set_level(logging.WARNING, logger="aggregator.collect")
    harness.init(redis_url, file_url, min_workers=3)  # outlier_factor: the default, 10
    f = Forger(r, file_url)
    huge = f.encode(f.delta(norm=1700.0))  # about 1000 times an honest delta of the first round
    forged = [
        f.announce("loud", huge, norm=l2_norm(f.delta(norm=1700.0).values())).to_fields(),  # honest about it
        f.announce("liar", huge, norm=NORM).to_fields(),  # claims a normal norm to pass the outlier rule
    ]
    entries = run_round(redis_url, file_url, r, forged, honest=("w0", "w1", "w2"))
    assert [e["participants"] for e in entries] == ["w0,w1,w2"]
    assert_rejected(r, {
        "loud": r"^outlier: delta norm 1700 is \d{3,4}\.\dx the round's median [\d.]+ \(limit 10\.0x\)",
        "liar": r"^BadShard: the delta's norm is 1700, the announcement claims 1$",
    })
    honest = [float(fields["norm"]) for _, fields in r.xrange(keys.deltas("t")) if fields["worker"].startswith("w")]
    assert 1700 / max(honest) > 100, "the outlier is far out, the honest deltas are not"
    # Both were dropped after the collect, by the reduce: each rejection names the version, and the
    # version's stats count both (kills the mutants of the aggregator's `_drop` bookkeeping).
    assert [f["version"] for _, f in r.xrange(keys.rejections("t"))] == ["0", "0"]
    assert entries[0]["rejected"] == "2"
    # ...and the aggregator's log says which entry of which worker it rejected, and why
    logged = [m for m in caplog.messages if m.startswith("rejected announcement ")]
    assert logged == [f"rejected announcement {f['entry']} from {f['worker']}: {f['reason']}"
                      for _, f in r.xrange(keys.rejections("t"))]


def test_same_worker_twice_for_one_version(redis_url, file_url, r):
    harness.init(redis_url, file_url, min_workers=2)
    f = Forger(r, file_url)
    delta = f.delta()
    first = f.announce("twice", f.encode(delta), norm=l2_norm(delta.values()))
    other = f.encode(f.delta(norm=2 * NORM))
    second = f.announce("twice", other, nonce="n2", norm=l2_norm(f.delta(norm=2 * NORM).values()))
    first_id = r.xadd(keys.deltas("t"), first.to_fields())
    repeat_id = r.xadd(keys.deltas("t"), first.to_fields())  # e.g. a retried XADD that had landed
    second_id = r.xadd(keys.deltas("t"), second.to_fields())
    entries = run_round(redis_url, file_url, r, [])
    assert entries[0]["participants"] == "twice,w1", "the first announcement counts"
    included = entries[0]["entries"].split(",")
    assert first_id in included and repeat_id not in included and second_id not in included
    assert_rejected(r, {"twice": r"^duplicate: worker already announced for version 0 \(the first counts\)$"})
    (_, rej), = r.xrange(keys.rejections("t"))
    assert rej["entry"] == second_id, "the identical repeat is ignored silently; the different one is rejected"


def test_broken_announcements_cannot_make_an_honest_delta_an_outlier(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    f = Forger(r, file_url)
    w = harness.worker(redis_url, file_url, "w1", max_rounds=1)
    agg = None
    try:
        assert r.xread({keys.deltas("t"): "0-0"}, block=60_000), "w1 announced its delta"
        payload = f.encode(f.delta())
        for worker in ("tiny1", "tiny2"):  # never uploaded; each claims a norm 100 times below an honest one
            r.xadd(keys.deltas("t"), f.announce(worker, payload, upload=False, norm=0.017).to_fields())
        agg = harness.aggregator(redis_url, file_url)  # reads the three announcements at once

        def verdict() -> str | None:
            if any(fields["worker"] == "w1" for _, fields in r.xrange(keys.rejections("t"))):
                return "w1 rejected"
            return "committed" if r.xlen(keys.versions("t")) else None
        deadline = time.monotonic() + 60
        while not (outcome := verdict()):
            assert time.monotonic() < deadline, "no verdict on w1's delta within 60 s"
            time.sleep(0.05)  # two streams to watch: poll with a deadline
        assert outcome == "committed", r.xrange(keys.rejections("t"))
        (_, entry), = r.xrange(keys.versions("t"))
        assert entry["participants"] == "w1"
        assert_rejected(r, {"tiny1": r"^ObjectMissing: ", "tiny2": r"^ObjectMissing: "})
    finally:
        w.service.stop()
        if agg is not None:
            agg.stop()


def test_an_announced_norm_is_checked_to_a_relative_1e_4(redis_url, file_url, r):
    """A delta of norm 1.5 announced 1.0e-4 off passes (the tolerance is 1e-4 * max(1, norm) = 1.5e-4),
    one announced 1.8e-4 off is rejected. Kills the mutants of the tolerance (`1e-4 / max(...)`,
    `max(2.0, norm)`), which the honest workers, whose norms agree exactly, never reach."""
    harness.init(redis_url, file_url, min_workers=2)  # the round waits for both live honest workers
    f = Forger(r, file_url)
    delta = f.delta(norm=1.5)
    norm = l2_norm(delta.values())
    forged = [f.announce("near", f.encode(delta), norm=norm + 1.0e-4).to_fields(),
              f.announce("far", f.encode(delta), norm=norm + 1.8e-4).to_fields()]
    entries = run_round(redis_url, file_url, r, forged, honest=("w0", "w1"))
    assert [e["participants"] for e in entries] == ["near,w0,w1"]
    assert_rejected(r, {"far": r"^BadShard: the delta's norm is 1\.5, the announcement claims 1\.50018$"})

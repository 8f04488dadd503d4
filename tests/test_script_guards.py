"""Every guard of the work-unit scripts (COMMIT's units, CLAIM_UNITS, RENEW_UNITS, RELEASE_UNITS)
and of REJECT, called directly against the real redis-server.

The services never reach some of these guards: the aggregator checks units before it commits, so
COMMIT's own refusals answer only a race or a bug elsewhere; that is why each is tested here, with
the state it guards against written by hand where no sequence of script calls makes it. Each test
names the mutant it kills: the guard deleted (or weakened) in `diloco/scripts.py`; every one was
applied by hand, seen to fail the test, and reverted (the lock, head and worker-registration
guards are in tests/test_scripts.py).
"""

from __future__ import annotations

import hashlib

import pytest
import redis

from diloco import keys
from diloco.errors import LockLost, UnitConflict
from diloco.scripts import Scripts
from diloco.units import UnitPlan

RUN = "r1"
DS = "ds"
N = 4          # units per epoch: small, so claims cross into the next epoch
SHA = hashlib.sha256(b"x").hexdigest()
LEASE_MS = 600_000


@pytest.fixture
def s(r) -> Scripts:
    r.hset(keys.units_meta(RUN, DS), mapping=UnitPlan(DS, N * 8, 8, 0).meta())
    r.hset(keys.head(RUN), mapping={"version": "0", "token": "0", "committed_ms": "1", "deltas_since": "0-0"})
    return Scripts(r)


def _lock(s: Scripts) -> str:
    token = s.acquire_lock(RUN, "agg", LEASE_MS)
    return f"{token}:agg"


def _commit(s: Scripts, units: dict[int, list[tuple[int, str]]], lock_value: str | None = None) -> int:
    lock_value = lock_value or _lock(s)
    token = int(lock_value.split(":")[0])
    return s.commit(RUN, lock_value=lock_value, base_version=0, token=token,
                    weights=(keys.weights_object(RUN, 1, token), SHA),
                    momentum=(keys.momentum_object(RUN, 1, token), SHA),
                    stats={"n": "1"}, dataset=DS, units=units)


@pytest.fixture
def state(redis_url):
    """Every key of the run, serialized (DUMP), to show that a refused call changed nothing."""
    raw = redis.Redis.from_url(redis_url)

    def read() -> dict[bytes, bytes]:
        return {k: raw.dump(k) for k in sorted(raw.scan_iter(match=f"diloco:{{{RUN}}}:*"))}

    yield read
    raw.close()


def _bits(r: redis.Redis, key: str) -> set[int]:
    return {b for b in range(2 * N) if r.getbit(key, b)}


def _claimed(s: Scripts, want: int, worker: str = "w", lease_ms: int = LEASE_MS) -> list[tuple[int, int]] | None:
    lo, hi = (int(x) for x in s.client.hmget(keys.units_meta(RUN, DS), "epoch_lo", "epoch_hi"))
    return s.claim_units(RUN, DS, lo, hi, want, worker, lease_ms)


# --- COMMIT with units --------------------------------------------------------------------------

def test_commit_marks_the_units_of_two_epochs_done_and_ends_only_their_leases(r, s):
    """Two workers' units in one commit: x's in epoch 0, w's in epoch 1 (the same bits in both).

    Kills the mutants that address an epoch's keys wrongly (each epoch checked or written in the
    first one's keys, `KEYS[4 + 3 * e]` -> `KEYS[4]`) and that skip the ZREM or HDEL of a committed
    unit, and the mutant that does not mark a committed unit claimed (a unit committed while leased
    to nobody could be claimed and trained again)."""
    assert _claimed(s, N, worker="x") == [(0, b) for b in range(N)]
    assert _claimed(s, 2) == [(1, 0), (1, 1)]
    committed = {0: [(b, "x") for b in range(N)], 1: [(1, "w")]}     # epoch 1's unit 0 is not in this round
    assert _commit(s, committed) == 1
    assert _bits(r, keys.units_done(RUN, DS, 0)) == set(range(N))
    assert _bits(r, keys.units_done(RUN, DS, 1)) == {1}
    assert r.zcard(keys.units_leases(RUN, DS, 0)) == 0 and r.hgetall(keys.units_owners(RUN, DS, 0)) == {}
    assert r.zrange(keys.units_leases(RUN, DS, 1), 0, -1) == ["0"], "the uncommitted unit keeps its lease"
    assert r.hgetall(keys.units_owners(RUN, DS, 1)) == {"0": "w"}
    assert _bits(r, keys.units_claimed(RUN, DS, 1)) == {0, 1}, "committed units stay claimed"
    assert r.hget(keys.head(RUN), "version") == "1"


def test_commit_accepts_a_unit_leased_to_nobody_and_marks_it_claimed(r, s):
    """A unit whose lease ended (or that a recover freed) while its worker trained: nobody else took
    it, so the work counts. Kills the mutant that refuses an unowned unit (the delta would be
    trained again) and the mutant that does not set its claimed bit (a later claim would hand out a
    done unit: trained twice)."""
    r.hset(keys.units_meta(RUN, DS), "epoch_hi", "0")
    assert _commit(s, {0: [(2, "w")]}) == 1
    assert _bits(r, keys.units_done(RUN, DS, 0)) == {2}
    assert _bits(r, keys.units_claimed(RUN, DS, 0)) == {2}
    assert _claimed(s, 3) == [(0, 0), (0, 1), (0, 3)], "the committed unit is never offered again"


def test_commit_refuses_a_unit_already_done_and_changes_nothing(r, s, state):
    """A unit that is done and still leased to the worker (no script sequence makes that state; a bug
    elsewhere could) must not be committed a second time; the other, valid unit listed first is not
    committed either: the script checks every unit before it writes any.

    Kills the mutant without COMMIT's `already done` guard: the owner check alone lets it through,
    the unit's done bit is set again and the version advances. The aggregator's own check
    (aggregator/units_check.py) answers first in a service, so only this test sees the guard."""
    assert _claimed(s, 2) == [(0, 0), (0, 1)]
    r.setbit(keys.units_done(RUN, DS, 0), 1, 1)
    lock_value = _lock(s)
    before = state()
    with pytest.raises(UnitConflict, match="unit 1 already done") as info:
        _commit(s, {0: [(0, "w"), (1, "w")]}, lock_value)
    assert info.value.worker == "w"
    assert state() == before


def test_commit_refuses_a_unit_leased_to_another_worker_and_changes_nothing(r, s, state):
    """Kills the mutant without the owner guard (a unit leased to another worker would be committed
    for w, and trained again by its owner), and the mutant that writes each unit as it checks it
    (unit 0 would be done although the commit failed on unit 1)."""
    assert _claimed(s, 1) == [(0, 0)]
    assert _claimed(s, 1, worker="other") == [(0, 1)]
    lock_value = _lock(s)
    before = state()
    with pytest.raises(UnitConflict, match="unit 1 leased to other") as info:
        _commit(s, {0: [(0, "w"), (1, "w")]}, lock_value)
    assert info.value.worker == "w"
    assert state() == before


def test_a_commit_without_the_lock_is_refused_before_its_units_are_looked_at(r, s, state):
    """A zombie holder's commit says LOCK_LOST even when its units conflict too: the caller must go
    back to standby, not drop a worker and retry under a lock it no longer holds."""
    assert _claimed(s, 1, worker="other") == [(0, 0)]
    lock_value = _lock(s)
    r.delete(keys.lock(RUN))
    before = state()
    with pytest.raises(LockLost, match="LOCK_LOST"):
        _commit(s, {0: [(0, "w")]}, lock_value)
    assert state() == before


# --- CLAIM_UNITS --------------------------------------------------------------------------------

def test_claim_with_a_stale_epoch_lo_claims_nothing_and_says_retry(r, s):
    """Kills the mutant without the RETRY guard on epoch_lo: it would claim in the epochs the caller
    named, and the one without it on epoch_hi (another claim opened an epoch since the caller read
    the meta: the caller's window no longer ends in a fresh epoch)."""
    r.hset(keys.units_meta(RUN, DS), mapping={"epoch_lo": "1", "epoch_hi": "1"})
    assert s.claim_units(RUN, DS, 0, 1, 2, "w", LEASE_MS) is None
    assert s.claim_units(RUN, DS, 1, 0, 2, "w", LEASE_MS) is None
    for e in (0, 1, 2):
        assert _bits(r, keys.units_claimed(RUN, DS, e)) == set()
        assert r.zcard(keys.units_leases(RUN, DS, e)) == 0


def test_a_claim_stays_in_the_oldest_epoch_while_it_has_enough_units(r, s):
    """Kills the mutant without the `#out >= want` break: the next epoch's bitmap would be created
    (sized for BITPOS) although nothing of it was claimed."""
    assert _claimed(s, N) == [(0, b) for b in range(N)]
    assert r.hmget(keys.units_meta(RUN, DS), "epoch_lo", "epoch_hi") == ["0", "0"]
    assert not r.exists(keys.units_claimed(RUN, DS, 1)), "the fresh epoch of the window was touched"


def test_a_claim_takes_all_it_asks_for_crossing_into_the_next_epochs_and_never_part(r, s):
    """Kills the mutants without the `e > hi` opening of the next epoch, without the `p < 0` break
    (a SETBIT at -1 fails the script) and without the count of free units (a claim the window cannot
    fill would take part of a round: the partial claims that deadlocked two workers)."""
    assert _claimed(s, 3) == [(0, 0), (0, 1), (0, 2)]
    assert _claimed(s, 3, worker="x") == [(0, 3), (1, 0), (1, 1)]
    assert r.hget(keys.units_meta(RUN, DS), "epoch_hi") == "1"
    assert _claimed(s, 4, worker="y") == [(1, 2), (1, 3), (2, 0), (2, 1)]
    assert r.hget(keys.units_meta(RUN, DS), "epoch_hi") == "2"
    assert r.hgetall(keys.units_owners(RUN, DS, 1)) == {"0": "x", "1": "x", "2": "y", "3": "y"}
    # A window that cannot hold the claim takes nothing: here the window's last epoch is (by hand)
    # not fresh, so epochs 0..3 have 2 free units for a claim of 3.
    r.setrange(keys.units_claimed(RUN, DS, 3), 0, b"\xf0")
    before = [_bits(r, keys.units_claimed(RUN, DS, e)) for e in range(4)]
    assert s.claim_units(RUN, DS, 0, 2, 3, "z", LEASE_MS) is None
    assert [_bits(r, keys.units_claimed(RUN, DS, e)) for e in range(4)] == before
    assert _claimed(s, 2, worker="z") == [(2, 2), (2, 3)]


def test_claims_find_free_units_past_the_end_of_a_short_claimed_bitmap(r, s):
    """BITPOS with an explicit range finds no clear bit past the end of the string. Kills the mutant
    without the STRLEN guard: once the first byte is all claimed, no unit past bit 8 is found."""
    r.hset(keys.units_meta(RUN, DS), mapping=UnitPlan(DS, 20 * 8, 8, 0).meta())   # 20 units: 3 bytes
    r.setrange(keys.units_claimed(RUN, DS, 0), 0, b"\xff")    # units 0-7 claimed: a one-byte string
    assert s.claim_units(RUN, DS, 0, 0, 2, "w", LEASE_MS) == [(0, 8), (0, 9)]


def test_a_finished_epoch_moves_epoch_lo_and_the_claim_retries_in_the_next(r, s):
    """Kills the mutants without the epoch-finished block (epoch_lo would never move past epoch 0)
    and without `if hi < lo + 1` (epoch_hi would stay below epoch_lo)."""
    r.setrange(keys.units_done(RUN, DS, 0), 0, b"\xf0")   # all four units of epoch 0 done
    r.setrange(keys.units_claimed(RUN, DS, 0), 0, b"\xf0")
    assert s.claim_units(RUN, DS, 0, 0, 2, "w", LEASE_MS) is None
    assert r.hmget(keys.units_meta(RUN, DS), "epoch_lo", "epoch_hi") == ["1", "1"]
    assert _claimed(s, 2) == [(1, 0), (1, 1)]


def test_an_expired_lease_gives_its_unit_to_the_next_claim_unless_the_unit_is_done(r, s):
    """Unit 0's lease expired before it was done: it is issued again. Unit 1's lease expired but the
    unit is done (a commit that raced the expiry): it stays claimed and is never issued again.

    Kills the mutant without the release of expired leases (unit 0 would wait forever) and the
    mutant without its `done` check (unit 1 would be trained and offered for commit twice)."""
    assert _claimed(s, 2, worker="dead", lease_ms=1) == [(0, 0), (0, 1)]
    r.setbit(keys.units_done(RUN, DS, 0), 1, 1)
    r.zadd(keys.units_leases(RUN, DS, 0), {"0": 1, "1": 1})    # both leases long over, whatever the clock
    assert _claimed(s, 3, worker="w") == [(0, 0), (0, 2), (0, 3)]
    assert r.hgetall(keys.units_owners(RUN, DS, 0)) == {"0": "w", "2": "w", "3": "w"}
    assert r.zscore(keys.units_leases(RUN, DS, 0), "1") is None, "the done unit's old lease is gone"
    assert 1 in _bits(r, keys.units_claimed(RUN, DS, 0))


# --- RENEW_UNITS and RELEASE_UNITS --------------------------------------------------------------

def test_renew_extends_only_the_leases_the_worker_still_holds(r, s):
    """Kills the mutant without the owner check (w would extend x's lease) and the mutant without
    `XX` (a unit w is recorded as owning but whose lease is gone would get a lease back)."""
    assert _claimed(s, 2, lease_ms=1_000) == [(0, 0), (0, 1)]
    assert _claimed(s, 1, worker="x", lease_ms=1_000) == [(0, 2)]
    r.zrem(keys.units_leases(RUN, DS, 0), "1")
    before = dict(r.zrange(keys.units_leases(RUN, DS, 0), 0, -1, withscores=True))
    assert s.renew_units(RUN, DS, 0, "w", [0, 1, 2], LEASE_MS) == 2
    after = dict(r.zrange(keys.units_leases(RUN, DS, 0), 0, -1, withscores=True))
    assert set(after) == {"0", "2"}
    assert after["0"] > before["0"] + LEASE_MS / 2
    assert after["2"] == before["2"], "another worker's lease is not ours to extend"


def test_release_gives_back_only_the_workers_own_units_that_are_not_done(r, s):
    """Kills the mutant without the owner check (w would free x's unit) and the mutant without the
    `done` check (a done unit still recorded as w's would be freed and issued again)."""
    assert _claimed(s, 2) == [(0, 0), (0, 1)]
    assert _claimed(s, 1, worker="x") == [(0, 2)]
    r.setbit(keys.units_done(RUN, DS, 0), 1, 1)
    assert s.release_units(RUN, DS, 0, "w", [0, 1, 2]) == 1
    assert _bits(r, keys.units_claimed(RUN, DS, 0)) == {1, 2}
    assert r.hgetall(keys.units_owners(RUN, DS, 0)) == {"1": "w", "2": "x"}
    assert r.zrange(keys.units_leases(RUN, DS, 0), 0, -1) == ["1", "2"]


# --- REJECT -------------------------------------------------------------------------------------

def test_a_rejection_is_recorded_once_per_entry(r, s):
    """Kills the mutant without the SADD guard: a round redone after a crash would count the same
    bad announcement again."""
    fields = {"worker": "w", "entry": "1-0", "reason": "bad"}
    assert s.reject(RUN, "1-0", "w", fields)
    assert not s.reject(RUN, "1-0", "w", fields)
    assert s.reject(RUN, "2-0", "w", {**fields, "entry": "2-0"})
    assert [f["entry"] for _, f in r.xrange(keys.rejections(RUN))] == ["1-0", "2-0"]
    assert r.hgetall(keys.rejected_counts(RUN)) == {"w": "2"}


def test_a_commit_without_an_update_clears_the_previous_versions_update_from_the_head(r, s):
    """A worker applies the head's update to the version before: a stale one would be applied to the
    wrong base (the sha check would catch it, at the cost of a full download every round). Kills the
    Lua mutant "COMMIT: the head keeps an older version's update" (update fields set only when given)."""
    lock_value = _lock(s)
    token = int(lock_value.split(":")[0])
    for base, update in ((0, (("u/a", "u/b"), ("1" * 64, "2" * 64))), (1, ((), ()))):
        s.commit(RUN, lock_value=lock_value, base_version=base, token=token,
                 weights=(keys.weights_object(RUN, base + 1, token), SHA),
                 momentum=(keys.momentum_object(RUN, base + 1, token), SHA), stats={"n": "1"}, update=update)
        head = r.hgetall(keys.head(RUN))
        assert (head["update"], head["update_digest"]) == (",".join(update[0]), ",".join(update[1]))
    entries = [f for _, f in r.xrange(keys.versions(RUN))]
    assert [(e["update"], e["update_digest"]) for e in entries] == [("u/a,u/b", "1" * 64 + "," + "2" * 64), ("", "")]

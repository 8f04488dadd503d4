"""The Lua scripts against a real redis-server: lock, commit, worker registration, run creation."""

from __future__ import annotations

import pytest

from diloco import keys
from diloco.errors import LockLost
from diloco.messages import Head
from diloco.scripts import Scripts
from diloco.store import digest_of

RUN = "r1"
SHA_W = digest_of(b"w")
SHA_M = digest_of(b"m")
TTL_MS = 60_000


@pytest.fixture
def s(r) -> Scripts:
    return Scripts(r)


def _write_head(r, version: int = 0, token: int = 0) -> dict[str, str]:
    head = {
        "version": str(version), "token": str(token),
        "weights": keys.weights_object(RUN, version, token), "weights_digest": SHA_W,
        "momentum": keys.momentum_object(RUN, version, token), "momentum_digest": SHA_M,
        "committed_ms": "1", "deltas_since": "0-0",
    }
    r.hset(keys.head(RUN), mapping=head)
    return head


def _commit(s: Scripts, lock_value: str, base_version: int, token: int, stats=None, deltas_read="0-0") -> int:
    v = base_version + 1
    return s.commit(RUN, lock_value=lock_value, base_version=base_version, token=token,
                    weights=(keys.weights_object(RUN, v, token), SHA_W),
                    momentum=(keys.momentum_object(RUN, v, token), SHA_M),
                    stats=stats if stats is not None else {"workers": "2", "loss": "1.5"}, deltas_read=deltas_read)


# --- lock --------------------------------------------------------------------------------------

def test_acquire_returns_increasing_tokens_and_refuses_while_held(r, s):
    t1 = s.acquire_lock(RUN, "agg1", TTL_MS)
    assert t1 == 1
    assert r.get(keys.lock(RUN)) == "1:agg1"
    assert 0 < r.pttl(keys.lock(RUN)) <= TTL_MS
    assert s.acquire_lock(RUN, "agg2", TTL_MS) == 0
    assert s.acquire_lock(RUN, "agg1", TTL_MS) == 0  # not re-entrant either
    assert r.get(keys.lock(RUN)) == "1:agg1"
    assert r.get(keys.lock_token(RUN)) == "1"  # a refused acquire hands out no token

    assert s.release_if_owner(keys.lock(RUN), "1:agg1")
    t2 = s.acquire_lock(RUN, "agg2", TTL_MS)
    assert t2 == 2
    assert r.get(keys.lock(RUN)) == "2:agg2"
    r.delete(keys.lock(RUN))  # as if it expired
    assert s.acquire_lock(RUN, "agg1", TTL_MS) == 3


def test_tokens_are_per_run(s):
    assert s.acquire_lock("r1", "a", TTL_MS) == 1
    assert s.acquire_lock("r2", "a", TTL_MS) == 1


def test_renew_only_by_owner(r, s):
    token = s.acquire_lock(RUN, "agg1", 5_000)
    value = f"{token}:agg1"
    assert not s.renew_if_owner(keys.lock(RUN), "999:agg1", TTL_MS)
    assert not s.renew_if_owner(keys.lock(RUN), f"{token}:agg2", TTL_MS)
    assert r.pttl(keys.lock(RUN)) <= 5_000
    assert s.renew_if_owner(keys.lock(RUN), value, TTL_MS)
    assert 5_000 < r.pttl(keys.lock(RUN)) <= TTL_MS
    r.delete(keys.lock(RUN))
    assert not s.renew_if_owner(keys.lock(RUN), value, TTL_MS)
    assert not r.exists(keys.lock(RUN))  # renewing a lost lock does not recreate it


def test_release_only_by_owner(r, s):
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    assert not s.release_if_owner(keys.lock(RUN), f"{token}:agg2")
    assert not s.release_if_owner(keys.lock(RUN), f"{token + 1}:agg1")
    assert r.get(keys.lock(RUN)) == f"{token}:agg1"
    assert s.release_if_owner(keys.lock(RUN), f"{token}:agg1")
    assert not r.exists(keys.lock(RUN))
    assert not s.release_if_owner(keys.lock(RUN), f"{token}:agg1")


# --- commit ------------------------------------------------------------------------------------

def test_commit_advances_head_and_records_the_version(r, s):
    _write_head(r, version=0)
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    delta_id = r.xadd(keys.deltas(RUN), {"kind": "delta", "worker": "w1"})

    assert _commit(s, f"{token}:agg1", 0, token, deltas_read=delta_id) == 1

    head = r.hgetall(keys.head(RUN))
    parsed = Head.from_fields(head)
    assert parsed.version == 1 and parsed.token == token
    assert parsed.weights == keys.weights_object(RUN, 1, token) and parsed.weights_digest == SHA_W
    assert parsed.momentum == keys.momentum_object(RUN, 1, token) and parsed.momentum_digest == SHA_M
    assert parsed.deltas_since == delta_id  # the next round reads the deltas stream after what this one read
    assert parsed.committed_ms > 1_600_000_000_000  # the server's clock, in ms

    entries = r.xrange(keys.versions(RUN))
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["version"] == "1" and fields["token"] == str(token)
    assert fields["weights"] == parsed.weights and fields["momentum_digest"] == SHA_M
    assert fields["committed_ms"] == head["committed_ms"]
    assert fields["workers"] == "2" and fields["loss"] == "1.5"  # the round stats ride along


def test_a_commit_over_a_legacy_head_drops_its_sha256_fields(r, s):
    """A run started before BLAKE3 digests: its head's *_sha256 fields give way to *_digest ones."""
    legacy = "0" * 64
    head = {k: v for k, v in _write_head(r).items() if not k.endswith("_digest")}
    r.delete(keys.head(RUN))
    r.hset(keys.head(RUN), mapping={**head, "weights_sha256": legacy, "momentum_sha256": legacy,
                                    "update_sha256": ""})
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    assert _commit(s, f"{token}:agg1", 0, token) == 1
    fields = r.hgetall(keys.head(RUN))
    assert not [k for k in fields if k.endswith("_sha256")]
    assert (fields["weights_digest"], fields["momentum_digest"]) == (SHA_W, SHA_M)


def test_consecutive_commits(r, s):
    _write_head(r, version=0)
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    lock_value = f"{token}:agg1"
    assert _commit(s, lock_value, 0, token) == 1
    assert _commit(s, lock_value, 1, token, stats={}) == 2
    assert r.hget(keys.head(RUN), "version") == "2"
    assert [f["version"] for _, f in r.xrange(keys.versions(RUN))] == ["1", "2"]


def test_commit_with_empty_deltas_stream(r, s):
    _write_head(r, version=5)
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    assert _commit(s, f"{token}:agg1", 5, token) == 6
    assert r.hget(keys.head(RUN), "deltas_since") == "0-0"


def _snapshot(r) -> tuple:
    return (r.hgetall(keys.head(RUN)), r.xrange(keys.versions(RUN)), r.get(keys.lock(RUN)))


@pytest.mark.parametrize("lock_value", ["{token}:agg2", "{other}:agg1", "", "{token}"])
def test_commit_with_wrong_lock_value_changes_nothing(r, s, lock_value):
    _write_head(r, version=0)
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    before = _snapshot(r)
    with pytest.raises(LockLost, match="LOCK_LOST"):
        _commit(s, lock_value.format(token=token, other=token + 1), 0, token)
    assert _snapshot(r) == before
    assert r.hget(keys.head(RUN), "version") == "0"


def test_commit_after_lock_expired_or_taken_over(r, s):
    _write_head(r, version=0)
    old = s.acquire_lock(RUN, "agg1", TTL_MS)
    r.delete(keys.lock(RUN))  # expired
    with pytest.raises(LockLost):
        _commit(s, f"{old}:agg1", 0, old)
    new = s.acquire_lock(RUN, "agg2", TTL_MS)
    with pytest.raises(LockLost):
        _commit(s, f"{old}:agg1", 0, old)  # a zombie must not commit over the new holder
    assert r.xlen(keys.versions(RUN)) == 0
    assert _commit(s, f"{new}:agg2", 0, new) == 1


@pytest.mark.parametrize("base", [1, 3, 10])
def test_commit_with_stale_base_version_changes_nothing(r, s, base):
    _write_head(r, version=2)
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    before = _snapshot(r)
    with pytest.raises(LockLost, match="STALE 2"):
        _commit(s, f"{token}:agg1", base, token)
    assert _snapshot(r) == before


def test_commit_without_head_is_stale(r, s):
    token = s.acquire_lock(RUN, "agg1", TTL_MS)
    with pytest.raises(LockLost, match="STALE"):
        _commit(s, f"{token}:agg1", 0, token)
    assert not r.exists(keys.head(RUN)) and not r.exists(keys.versions(RUN))


# --- workers -----------------------------------------------------------------------------------

def test_register_worker(r, s):
    assert s.register_worker(RUN, "w1", "nonceA", TTL_MS, "host-a")
    assert r.get(keys.worker_alive(RUN, "w1")) == "nonceA"
    assert 0 < r.pttl(keys.worker_alive(RUN, "w1")) <= TTL_MS
    assert r.smembers(keys.workers(RUN)) == {"w1"}
    stats = r.hgetall(keys.worker_stats(RUN, "w1"))
    assert stats["nonce"] == "nonceA" and stats["host"] == "host-a" and stats["state"] == "starting"
    assert int(stats["registered_ms"]) > 1_600_000_000_000


def test_register_refuses_a_second_session_while_the_first_is_alive(r, s):
    assert s.register_worker(RUN, "w1", "nonceA", TTL_MS, "host-a")
    assert not s.register_worker(RUN, "w1", "nonceB", TTL_MS, "host-b")
    assert r.get(keys.worker_alive(RUN, "w1")) == "nonceA"
    assert r.hget(keys.worker_stats(RUN, "w1"), "host") == "host-a"
    # the same session may re-register (renew)
    assert s.register_worker(RUN, "w1", "nonceA", TTL_MS, "host-a")
    # once the first session's key is gone (expired), the id is free again
    r.delete(keys.worker_alive(RUN, "w1"))
    assert s.register_worker(RUN, "w1", "nonceB", TTL_MS, "host-b")
    assert r.get(keys.worker_alive(RUN, "w1")) == "nonceB"
    assert r.hget(keys.worker_stats(RUN, "w1"), "nonce") == "nonceB"
    assert r.smembers(keys.workers(RUN)) == {"w1"}


def test_other_worker_ids_do_not_conflict(r, s):
    assert s.register_worker(RUN, "w1", "n1", TTL_MS, "h")
    assert s.register_worker(RUN, "w2", "n2", TTL_MS, "h")
    assert r.smembers(keys.workers(RUN)) == {"w1", "w2"}


# --- init_run ----------------------------------------------------------------------------------

def test_init_run_creates_only_once(r, s):
    config = {"run": RUN, "sync_every": "5", "codec": "fp32"}
    head = {"version": "0", "token": "0", "weights": "wk", "weights_digest": SHA_W}
    assert s.init_run(RUN, {keys.config(RUN): config, keys.head(RUN): head, keys.datasets(RUN): {"ds1": "100"}})
    assert r.hgetall(keys.config(RUN)) == config
    assert r.hgetall(keys.head(RUN)) == head
    assert r.hgetall(keys.datasets(RUN)) == {"ds1": "100"}

    assert not s.init_run(RUN, {keys.config(RUN): {"run": RUN, "sync_every": "9"}, keys.head(RUN): {"version": "7"},
                                keys.datasets(RUN): {"ds2": "5"}})
    assert r.hgetall(keys.config(RUN)) == config
    assert r.hgetall(keys.head(RUN)) == head
    assert r.hgetall(keys.datasets(RUN)) == {"ds1": "100"}


def test_init_run_needs_the_config_first(s):
    with pytest.raises(ValueError, match="config"):
        s.init_run(RUN, {keys.head(RUN): {"version": "0"}, keys.config(RUN): {"run": RUN}})


def test_init_run_with_values_holding_separators(r, s):
    config = {"task_options": '{"a": [1, 2], "b": "x:y"}', "run": RUN}
    assert s.init_run(RUN, {keys.config(RUN): config, keys.head(RUN): {}})
    assert r.hgetall(keys.config(RUN)) == config
    assert not r.exists(keys.head(RUN))

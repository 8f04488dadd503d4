"""The key names are an interface (operators read them, the docs list them): pin them exactly."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco import keys

RUN, WORKER = "r1", "w1"

# Arguments by parameter name, so every public key function can be called generically.
ARGS = {"run": RUN, "worker": WORKER, "version": 3, "token": 7, "nonce": "n1", "index": 2, "dataset": "ds1",
        "epoch": 2}


def _public_key_functions():
    return [
        (name, fn) for name, fn in inspect.getmembers(keys, inspect.isfunction)
        if not name.startswith("_") and fn.__module__ == keys.__name__
        and name not in ("check_name", "epoch_keys", "lane", "split_lane")
    ]


def _call(fn):
    return fn(**{p: ARGS[p] for p in inspect.signature(fn).parameters})


REDIS_KEYS = {
    "config": "diloco:{r1}:config",
    "head": "diloco:{r1}:head",
    "deltas": "diloco:{r1}:deltas",
    "versions": "diloco:{r1}:versions",
    "rejections": "diloco:{r1}:rejections",
    "rejected_counts": "diloco:{r1}:rejected",
    "lock": "diloco:{r1}:lock",
    "round_state": "diloco:{r1}:round",
    "eval_losses": "diloco:{r1}:eval",
    "control": "diloco:{r1}:control",
    "rejected_entries": "diloco:{r1}:rejected:entries",
    "audit": "diloco:{r1}:audit",
    "worker_kicked": "diloco:{r1}:worker:w1:kicked",
    "lock_token": "diloco:{r1}:lock:token",
    "recovered": "diloco:{r1}:recovered",
    "workers": "diloco:{r1}:workers",
    "worker_alive": "diloco:{r1}:worker:w1:alive",
    "worker_stats": "diloco:{r1}:worker:w1",
    "datasets": "diloco:{r1}:datasets",
    "units_meta": "diloco:{r1}:units:ds1",
    "units_claimed": "diloco:{r1}:units:ds1:2:claimed",
    "units_done": "diloco:{r1}:done:ds1:2",
    "units_leases": "diloco:{r1}:units:ds1:2:leases",
    "units_owners": "diloco:{r1}:units:ds1:2:owners",
}

OBJECT_KEYS = {
    "run_prefix": "runs/r1/",
    "weights_object": "runs/r1/weights/v00000003-t7.safetensors",
    "momentum_object": "runs/r1/momentum/v00000003-t7.safetensors",
    "delta_prefix": "runs/r1/deltas/v00000003/w1/",
    "delta_shard": "runs/r1/deltas/v00000003/w1/n1-0002.safetensors",
    "snapshot_object": "runs/r1/state/v00000003.msgpack",
    "snapshot_prefix": "runs/r1/state/",
    "weights_prefix": "runs/r1/weights/",
    "update_prefix": "runs/r1/updates/v00000003/",
    "update_shard": "runs/r1/updates/v00000003/t7-0002.safetensors",
}


def test_epoch_keys_are_the_four_unit_keys_in_script_order():
    assert keys.epoch_keys(RUN, "ds1", 2) == [REDIS_KEYS[k] for k in
                                              ("units_claimed", "units_done", "units_leases", "units_owners")]


@pytest.mark.parametrize(("name", "expected"), sorted(REDIS_KEYS.items()))
def test_redis_key_names_are_pinned(name, expected):
    assert _call(getattr(keys, name)) == expected


@pytest.mark.parametrize(("name", "expected"), sorted(OBJECT_KEYS.items()))
def test_object_key_names_are_pinned(name, expected):
    assert _call(getattr(keys, name)) == expected


def test_every_public_function_is_pinned():
    """A new key function must be added to the pinned tables above (and to the docs)."""
    names = {name for name, _ in _public_key_functions()}
    assert names == set(REDIS_KEYS) | set(OBJECT_KEYS)


def test_every_redis_key_carries_the_run_hash_tag():
    redis_keys = []
    for _name, fn in _public_key_functions():
        key = _call(fn)
        if key.startswith("runs/"):
            continue  # an object-store key
        redis_keys.append(key)
        assert key.startswith("diloco:{r1}:"), key
        # Redis Cluster hashes the first {...}: there must be exactly one, and it must be the run.
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert key[key.index("{") + 1:key.index("}")] == RUN
    assert len(redis_keys) == len(REDIS_KEYS)


def test_redis_keys_of_two_runs_never_collide():
    for _name, fn in _public_key_functions():
        a = fn(**{p: ("r1" if p == "run" else ARGS[p]) for p in inspect.signature(fn).parameters})
        b = fn(**{p: ("r2" if p == "run" else ARGS[p]) for p in inspect.signature(fn).parameters})
        assert a != b


def test_redis_keys_are_distinct():
    values = [_call(getattr(keys, name)) for name in REDIS_KEYS]
    assert len(set(values)) == len(values)


def test_object_names_sort_by_version():
    versions = [0, 1, 2, 9, 10, 11, 99, 100, 999, 1000, 12345, 99_999_999]
    tokens = [50, 3, 1000, 1, 7, 2, 9, 10, 4, 100, 8, 6]  # tokens must not disturb the order
    for fn in (keys.weights_object, keys.momentum_object):
        names = [fn(RUN, v, t) for v, t in zip(versions, tokens, strict=True)]
        assert sorted(names) == names
    prefixes = [keys.delta_prefix(RUN, v, WORKER) for v in versions]
    assert sorted(prefixes) == prefixes


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**8 - 1), st.integers(0, 10**8 - 1), st.integers(0, 10**6), st.integers(0, 10**6))
def test_weights_object_order_matches_version_order(v1, v2, t1, t2):
    a, b = keys.weights_object(RUN, v1, t1), keys.weights_object(RUN, v2, t2)
    if v1 < v2:
        assert a < b
    elif v1 > v2:
        assert a > b


def test_delta_shards_sort_by_index():
    names = [keys.delta_shard(RUN, 3, WORKER, "n1", i) for i in (0, 1, 9, 10, 99, 100, 999, 4095)]
    assert sorted(names) == names
    assert all(n.startswith(keys.delta_prefix(RUN, 3, WORKER)) for n in names)


def test_object_keys_live_under_the_run_prefix():
    for name in OBJECT_KEYS:
        assert _call(getattr(keys, name)).startswith(keys.run_prefix(RUN))


@pytest.mark.parametrize("value", [
    "r1", "a", "A", "0", "run-1", "run_1", "run.1", "x" * 64, "0.9-beta_2", "a..b",
])
def test_check_name_accepts_good_names(value):
    assert keys.check_name("run name", value) == value


@pytest.mark.parametrize("value", [
    "", "x" * 65, "a/b", "/a", "a:b", "{r1}", "a{b", "a}b", "a b", " a", "a ", ".hidden", "-a", "_a",
    "a\tb", "a*", "ä", "a\x00",
])
def test_check_name_rejects_bad_names(value):
    with pytest.raises(ValueError, match="invalid run name"):
        keys.check_name("run name", value)


@pytest.mark.parametrize("value", [None, 1, b"r1"])
def test_check_name_rejects_non_strings(value):
    with pytest.raises(ValueError):
        keys.check_name("worker id", value)


def test_check_name_message_names_kind_and_value():
    with pytest.raises(ValueError) as e:
        keys.check_name("worker id", "a/b")
    assert "worker id" in str(e.value) and "'a/b'" in str(e.value)


def test_check_name_rejects_trailing_newline():
    with pytest.raises(ValueError):
        keys.check_name("worker id", "w1\n")


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80))
def test_check_name_accepts_exactly_the_safe_alphabet(value):
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    ok = (1 <= len(value) <= 64 and set(value) <= allowed and value[0] not in "_.-")
    if ok:
        assert keys.check_name("run name", value) == value
    else:
        with pytest.raises(ValueError):
            keys.check_name("run name", value)


# A fragment's lane (streaming): its own round state and objects, the run's shared state unchanged.
LANE_KEYS = {
    "head": "diloco:{r1}:f2:head",
    "deltas": "diloco:{r1}:f2:deltas",
    "versions": "diloco:{r1}:f2:versions",
    "rejections": "diloco:{r1}:f2:rejections",
    "rejected_counts": "diloco:{r1}:f2:rejected",
    "rejected_entries": "diloco:{r1}:f2:rejected:entries",
    "round_state": "diloco:{r1}:f2:round",
    "lock": "diloco:{r1}:f2:lock",
    "lock_token": "diloco:{r1}:f2:lock:token",
    "run_prefix": "runs/r1/f2/",
    "weights_object": "runs/r1/f2/weights/v00000003-t7.safetensors",
    "delta_shard": "runs/r1/f2/deltas/v00000003/w1/n1-0002.safetensors",
    "update_shard": "runs/r1/f2/updates/v00000003/t7-0002.safetensors",
    "snapshot_prefix": "runs/r1/f2/state/",
}


def test_lane_names_round_trip():
    assert keys.lane(RUN, None) == RUN and keys.split_lane(RUN) == (RUN, None)
    assert keys.lane(RUN, 2) == "r1@f2" and keys.split_lane("r1@f2") == (RUN, 2)


@pytest.mark.parametrize("name", sorted(REDIS_KEYS) + sorted(OBJECT_KEYS))
def test_a_fragment_lane_has_its_own_round_keys_and_the_runs_shared_ones(name):
    fn = getattr(keys, name)
    got = fn(**{p: (keys.lane(RUN, 2) if p == "run" else ARGS[p]) for p in inspect.signature(fn).parameters})
    expected = LANE_KEYS.get(name, REDIS_KEYS.get(name, OBJECT_KEYS.get(name)))
    if name in OBJECT_KEYS and name not in LANE_KEYS:   # every object of a lane lives under its prefix
        expected = expected.replace("runs/r1/", "runs/r1/f2/")
    assert got == expected

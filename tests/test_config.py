"""RunConfig and the per-service settings: round trip through Redis fields, defaults, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco.config import SCHEMA_VERSION, AggregatorSettings, RunConfig, WorkerSettings
from diloco.errors import ConfigError


def _worker(**kw) -> WorkerSettings:
    return WorkerSettings(**{"redis_url": "redis://x", "store_url": "file:///tmp/s", "run": "r1",
                             "worker_id": "w1", **kw})


# --- round trip --------------------------------------------------------------------------------

def test_to_fields_are_plain_strings_and_round_trip():
    cfg = RunConfig(run="r1", task="toy", task_options={"b": [1, 2], "a": {"x": 1.5}, "s": "t"},
                    model_hash="abc", dataset_id="ds", seed=3, sync_every=7, inner_lr=2.5e-4,
                    nesterov=False, codec="fp32", shard_mb=0.5, heartbeat_timeout_s=12.5)
    fields = cfg.to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert set(fields) == {f.name for f in dataclasses.fields(RunConfig)}
    assert fields["nesterov"] == "false"
    assert fields["sync_every"] == "7"
    assert fields["schema_version"] == str(SCHEMA_VERSION)
    assert json.loads(fields["task_options"]) == {"b": [1, 2], "a": {"x": 1.5}, "s": "t"}
    assert fields["task_options"] == json.dumps(cfg.task_options, sort_keys=True)
    assert RunConfig.from_fields(fields) == cfg


def test_default_config_round_trips_and_bool_is_lowercase():
    cfg = RunConfig(run="r1")
    fields = cfg.to_fields()
    assert fields["nesterov"] == "true"
    assert fields["task_options"] == "{}"
    assert RunConfig.from_fields(fields) == cfg


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=8,
)
_pos = st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(
    run=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
    task_options=st.dictionaries(st.text(max_size=8), _json, max_size=4),
    seed=st.integers(0, 2**40), sync_every=st.integers(1, 10**6), inner_lr=_pos, outer_lr=_pos,
    outer_momentum=st.floats(min_value=0.0, max_value=0.999), nesterov=st.booleans(),
    codec=st.sampled_from(["fp32", "bf16"]), shard_mb=_pos, heartbeat_timeout_s=_pos,
    inner_weight_decay=st.floats(min_value=0.0, max_value=10.0),
)
def test_round_trip_property(**kw):
    cfg = RunConfig(**kw)
    fields = cfg.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert RunConfig.from_fields(fields) == cfg


# --- defaults ----------------------------------------------------------------------------------

def test_defaults():
    cfg = RunConfig(run="r1")
    assert cfg.sync_every == 500
    assert cfg.outer_lr == 0.7
    assert cfg.outer_momentum == 0.9
    assert cfg.nesterov is True
    assert cfg.codec == "bf16"
    assert cfg.num_fragments == 1
    assert cfg.schema_version == SCHEMA_VERSION
    assert cfg.task_options == {}
    assert cfg.shard_bytes == 64 * 1024 * 1024


def test_default_task_options_are_not_shared():
    a, b = RunConfig(run="r1"), RunConfig(run="r2")
    a.task_options["x"] = 1
    assert b.task_options == {}


def test_shard_bytes_from_shard_mb():
    assert RunConfig(run="r1", shard_mb=0.5).shard_bytes == 512 * 1024
    assert RunConfig(run="r1", shard_mb=2).shard_bytes == 2 * 1024 * 1024


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "field"), [
    ({"sync_every": -1}, "sync_every"),
    ({"sync_every": 0}, "sync_every"),
    ({"sync_every": 1.5}, "sync_every"),
    ({"sync_every": True}, "sync_every"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"min_workers": 0}, "min_workers"),
    ({"outer_momentum": 1.0}, "outer_momentum"),
    ({"outer_momentum": -0.1}, "outer_momentum"),
    ({"outer_momentum": float("nan")}, "outer_momentum"),
    ({"outer_lr": 0.0}, "outer_lr"),
    ({"outer_lr": float("inf")}, "outer_lr"),
    ({"inner_lr": -1e-3}, "inner_lr"),
    ({"shard_mb": 0}, "shard_mb"),
    ({"round_timeout_s": float("nan")}, "round_timeout_s"),
    ({"heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
    ({"inner_weight_decay": -0.1}, "inner_weight_decay"),
    ({"seed": -1}, "seed"),
    ({"cooldown_from": -1}, "cooldown_from"),
    ({"cooldown_from": 5, "cooldown_to": 5}, "cooldown_to"),
    ({"codec": "int3"}, "codec"),
    ({"codec": "topk", "codec_options": {"densty": 0.1}}, "densty"),
    ({"num_fragments": 3}, "num_fragments"),
    ({"num_fragments": 2, "overlap_steps": 250}, "overlap_steps"),
    ({"overlap_steps": 1}, "overlap_steps"),
    ({"num_fragments": 2, "merge_alpha": 1.5}, "merge_alpha"),
    ({"num_fragments": 2, "fragment_layout": "random"}, "fragment_layout"),
    ({"num_fragments": 2, "mode": "async"}, "mode=async"),
    ({"num_fragments": 2, "dylu": True}, "dylu"),
    ({"num_fragments": 4, "sync_every": 8, "batch_size": 3, "unit_samples": 12}, "unit_samples"),
    ({"run": "bad/name"}, "run name"),
    ({"run": ""}, "run name"),
])
def test_validation_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**{"run": "r1", **changes})


def test_unknown_codec_lists_known_codecs():
    with pytest.raises(ConfigError) as e:
        RunConfig(run="r1", codec="int3")
    assert "'int3'" in str(e.value) and all(c in str(e.value) for c in ("fp32", "bf16", "int8", "int4", "topk"))


def test_replace_validates():
    cfg = RunConfig(run="r1")
    assert cfg.replace(sync_every=10).sync_every == 10
    with pytest.raises(ConfigError, match="sync_every"):
        cfg.replace(sync_every=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_decay_is_rejected(value):
    with pytest.raises(ConfigError, match="inner_weight_decay"):
        RunConfig(run="r1", inner_weight_decay=value)


# --- from_fields -------------------------------------------------------------------------------

def test_from_fields_rejects_unknown_fields():
    fields = {**RunConfig(run="r1").to_fields(), "zeta": "1", "alpha": "2"}
    with pytest.raises(ConfigError, match="unknown settings: alpha, zeta"):
        RunConfig.from_fields(fields)


def test_from_fields_missing_fields_take_defaults():
    cfg = RunConfig.from_fields({"run": "r1", "sync_every": "9"})
    assert cfg == RunConfig(run="r1", sync_every=9)


def test_unknown_schema_version_reports_the_version():
    fields = {**RunConfig(run="r1").to_fields(), "schema_version": "2"}
    with pytest.raises(ConfigError) as e:
        RunConfig.from_fields(fields)
    msg = str(e.value)
    assert "schema version 2" in msg and "unknown settings" not in msg


def test_newer_schema_with_new_fields_reports_the_version():
    fields = {**RunConfig(run="r1").to_fields(), "schema_version": "2", "new_setting": "x"}
    with pytest.raises(ConfigError, match="schema version 2"):
        RunConfig.from_fields(fields)


@pytest.mark.parametrize(("field", "raw"), [
    ("sync_every", "abc"),
    ("sync_every", "1.5"),
    ("sync_every", ""),
    ("seed", "1e3"),
    ("nesterov", "maybe"),
    ("nesterov", "True"),
    ("nesterov", "1"),
    ("outer_lr", "nan"),
    ("outer_lr", "inf"),
    ("outer_lr", "-inf"),
    ("outer_lr", "fast"),
    ("inner_weight_decay", "nan"),
    ("task_options", "[1, 2]"),
    ("task_options", "{not json"),
    ("schema_version", "abc"),
])
def test_ill_typed_values_name_the_field(field, raw):
    fields = {**RunConfig(run="r1").to_fields(), field: raw}
    with pytest.raises(ConfigError, match=field):
        RunConfig.from_fields(fields)


def test_from_fields_still_validates():
    fields = {**RunConfig(run="r1").to_fields(), "outer_momentum": "1.0"}
    with pytest.raises(ConfigError, match="outer_momentum"):
        RunConfig.from_fields(fields)


# --- from_options ------------------------------------------------------------------------------

def test_from_options_builds_config():
    cfg = RunConfig.from_options("r1", {"sync_every": 10, "codec": "fp32"})
    assert cfg == RunConfig(run="r1", sync_every=10, codec="fp32")


@pytest.mark.parametrize("name", ["sync_evry", "run", "schema_version"])
def test_from_options_rejects_unknown_names(name):
    with pytest.raises(ConfigError, match=f"unknown run settings: {name}"):
        RunConfig.from_options("r1", {name: 1})


def test_from_options_validates_run_name():
    with pytest.raises(ConfigError, match="run name"):
        RunConfig.from_options("a b", {})


# --- differences -------------------------------------------------------------------------------

def test_differences():
    a = RunConfig(run="r1")
    b = a.replace(sync_every=10, codec="fp32", outer_lr=0.5)
    assert a.differences(a) == []
    assert a.differences(b) == ["sync_every: 500 -> 10", "outer_lr: 0.7 -> 0.5", "codec: 'bf16' -> 'fp32'"]
    assert b.differences(a) == ["sync_every: 10 -> 500", "outer_lr: 0.5 -> 0.7", "codec: 'fp32' -> 'bf16'"]
    assert a.differences(b, names={"codec", "nesterov"}) == ["codec: 'bf16' -> 'fp32'"]
    assert a.differences(b, names=set()) == []


def test_differences_outside_tunable():
    a = RunConfig(run="r1")
    b = a.replace(outer_lr=0.1, min_workers=3, seed=5)
    fixed = {f.name for f in dataclasses.fields(RunConfig)} - RunConfig.TUNABLE
    assert a.differences(b, names=fixed) == ["seed: 0 -> 5"]


# --- WorkerSettings / AggregatorSettings -------------------------------------------------------

def test_heartbeat_interval_above_a_third_of_the_timeout_is_rejected():
    cfg = RunConfig(run="r1", heartbeat_timeout_s=30.0)
    with pytest.raises(ConfigError) as e:
        _worker(heartbeat_interval_s=10.5).check_against(cfg)
    msg = str(e.value)
    assert "10.5" in msg and "30.0" in msg


@pytest.mark.parametrize("interval", [0.1, 2.0, 9.99, 10.0])
def test_heartbeat_interval_at_most_a_third_is_accepted(interval):
    cfg = RunConfig(run="r1", heartbeat_timeout_s=30.0)
    assert _worker(heartbeat_interval_s=interval).check_against(cfg) is None


@pytest.mark.parametrize(("changes", "what"), [
    ({"run": "a/b"}, "run name"),
    ({"worker_id": "w:1"}, "worker id"),
    ({"worker_id": ""}, "worker id"),
    ({"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
    ({"heartbeat_interval_s": float("nan")}, "heartbeat_interval_s"),
])
def test_worker_settings_validation(changes, what):
    with pytest.raises(ConfigError, match=what):
        _worker(**changes)


@pytest.mark.parametrize(("changes", "what"), [
    ({"aggregator_id": "a b"}, "aggregator id"),
    ({"run": "{r1}"}, "run name"),
    ({"lock_ttl_s": 0}, "lock_ttl_s"),
    ({"standby_poll_s": -1}, "standby_poll_s"),
    ({"concurrency": 0}, "concurrency"),
])
def test_aggregator_settings_validation(changes, what):
    base = {"redis_url": "redis://x", "store_url": "file:///tmp/s", "run": "r1", "aggregator_id": "a1"}
    AggregatorSettings(**base)  # the base is valid
    with pytest.raises(ConfigError, match=what):
        AggregatorSettings(**{**base, **changes})

"""`diloco export`: a committed version, out as a plain safetensors file that loads into the task's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diloco import export, keys, model, runs
from diloco.cli import main as cli_main
from diloco.errors import ConfigError
from diloco.evaluate import eval_loss
from diloco.store import open_store
from diloco.tasks import load_task
from tests import harness

RUN = "t"


def _export(redis_url: str, store_url: str, out: Path, *extra: str, run: str = RUN) -> int:
    return cli_main(["export", "--run", run, "--redis-url", redis_url, "--store", store_url, str(out), *extra])


@pytest.fixture
def trained(redis_url, store_url, r):
    """A run of three committed versions; yields (config, store url, versions stream entries)."""
    cfg = harness.init(redis_url, store_url, min_workers=2, retention_every=0)
    agg = harness.aggregator(redis_url, store_url, max_rounds=3)
    ws = [harness.worker(redis_url, store_url, f"w{i}", max_rounds=3) for i in range(2)]
    assert agg.result() == 3 and all(w.result() == 3 for w in ws)
    entries = {int(f["version"]): f for _, f in r.xrange(keys.versions(RUN))}
    return cfg, store_url, entries


def test_export_round_trips_into_the_tasks_model(redis_url, r, trained, tmp_path, capsys):
    cfg, store_url, _ = trained
    out = tmp_path / "model.safetensors"
    assert _export(redis_url, store_url, out) == 0
    assert "exported version 3" in capsys.readouterr().out

    head = runs.read_head(r, RUN)
    committed = runs.load_weights(open_store(store_url), head)
    # What a user does with nothing but the file: read the metadata, build the model, load.
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["diloco"])
    assert meta["run"] == RUN and meta["version"] == 3 and meta["task"] == "tiny"
    assert meta["task_options"] == cfg.task_options and meta["model_hash"] == cfg.model_hash
    assert meta["source_digest"] == head.weights_digest
    net = load_task(meta["task"], meta["task_options"]).build_model()
    net.load_state_dict(load_file(str(out)))
    state = net.state_dict()
    assert state.keys() == committed.keys()
    for name, t in committed.items():
        assert torch.equal(state[name], t), name
    assert model.model_hash(state) == cfg.model_hash

    reference = load_task(cfg.task, cfg.task_options).build_model()
    reference.load_state_dict(committed)
    task = load_task(cfg.task, cfg.task_options)
    assert eval_loss(task, net) == eval_loss(task, reference)

    loaded, meta2 = export.load_model(out)
    assert meta2 == meta and eval_loss(task, loaded) == eval_loss(task, reference)


def test_export_of_an_earlier_version_and_of_v0(redis_url, r, trained, tmp_path):
    cfg, store_url, entries = trained
    store = open_store(store_url)
    out = tmp_path / "v1.safetensors"
    assert _export(redis_url, store_url, out, "--version", "1") == 0
    v1 = model.from_bytes(store.get(entries[1]["weights"], digest=entries[1]["weights_digest"]), "v1")
    got = load_file(str(out))
    assert got.keys() == v1.keys() and all(torch.equal(got[n], v1[n]) for n in v1)
    assert export.read_metadata(out)["version"] == 1

    out0 = tmp_path / "v0.safetensors"
    assert _export(redis_url, store_url, out0, "--version", "0") == 0
    initial = runs.build_model(load_task(cfg.task, cfg.task_options), cfg.seed).state_dict()
    got = load_file(str(out0))
    assert all(torch.equal(got[n], initial[n]) for n in initial)
    assert export.read_metadata(out0)["source_digest"] is None  # v0's checksum is only in the head at v0


def test_export_errors_are_clear(redis_url, r, trained, tmp_path, capsys):
    _, store_url, entries = trained
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.safetensors"

    assert _export(redis_url, store_url, out, "--version", "7") == 2
    assert "has no version 7: its versions are 0 to 3" in capsys.readouterr().err
    assert _export(redis_url, store_url, out, run="nope") == 2
    assert "run 'nope' does not exist" in capsys.readouterr().err
    assert _export(redis_url, store_url, tmp_path / "no" / "m.safetensors") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _export(redis_url, store_url, out.parent, "--force") == 2
    assert "is a directory" in capsys.readouterr().err
    assert not out.exists()

    out.write_bytes(b"mine")
    assert _export(redis_url, store_url, out) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert _export(redis_url, store_url, out, "--force") == 0
    assert export.read_metadata(out)["version"] == 3
    assert list(out.parent.iterdir()) == [out], "no temp file left behind"

    # Weights that retention deleted: say so, and which versions can be exported.
    store = open_store(store_url)
    store.delete(entries[2]["weights"])
    assert _export(redis_url, store_url, tmp_path / "v2.safetensors", "--version", "2") == 2
    err = capsys.readouterr().err
    assert "weights of version 2" in err and "retention" in err and "Versions with weights: 0-1, 3" in err
    assert "Traceback" not in err


def test_export_verifies_the_checksum(redis_url, r, file_url, tmp_path, capsys):
    harness.init(redis_url, file_url)
    store = open_store(file_url)
    head = runs.read_head(r, RUN)
    path = store.root / head.weights
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip a bit of the last tensor: still valid safetensors, other weights
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    out = tmp_path / "m.safetensors"
    assert _export(redis_url, file_url, out) == 1
    assert "digest" in capsys.readouterr().err and not out.exists()


def test_read_metadata_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(model.to_bytes({"x": torch.zeros(2)}, run="r", version="0"))
    with pytest.raises(ConfigError, match="not a diloco export"):
        export.read_metadata(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        export.read_metadata(junk)

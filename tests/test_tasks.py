"""Tasks: the registry, option checking, determinism of models and data, and that they train."""

from __future__ import annotations

import json

import pytest
import torch

from diloco.errors import ConfigError
from diloco.tasks import gpt, load_task, tiny, to_device

SMALL_GPT = {"n_layer": 1, "n_embd": 32, "seq_len": 32, "corpus_mb": 0.25}


@pytest.mark.parametrize("name", ["gpt", "tiny"])
def test_load_builtin_with_defaults(name):
    task = load_task(name)
    defaults = {"gpt": gpt.GPTOptions(), "tiny": tiny.TinyOptions()}[name]
    assert task.name == name
    assert task.options == defaults.__dict__
    again = load_task(name, json.loads(json.dumps(task.options)))  # options survive a JSON round trip
    assert again.options == task.options


def test_load_with_options():
    task = load_task("gpt", SMALL_GPT)
    assert task.options["seq_len"] == 32 and task.options["n_head"] == 4
    assert load_task("tiny", {"hidden": 16}).options["hidden"] == 16
    assert load_task("gpt", {"corpus_mb": 1}).options["corpus_mb"] == 1.0  # int accepted for float


@pytest.mark.parametrize("name", ["gpt", "tiny"])
def test_unknown_option_names_it(name):
    with pytest.raises(ConfigError, match="'n_layers'") as e:
        load_task(name, {"n_layers": 3})
    assert "valid options" in str(e.value)


@pytest.mark.parametrize("options", [
    {"n_layer": "2"}, {"n_layer": True}, {"n_layer": 2.5}, {"n_layer": 0},
    {"eval_fraction": 1.5}, {"n_embd": 30, "n_head": 4}, {"corpus_mb": -1},
])
def test_bad_option_values(options):
    with pytest.raises(ConfigError):
        load_task("gpt", options)


@pytest.mark.parametrize("spec", [
    "nope", "no_such_module_xyz:make_task", "diloco.tasks.tiny:nope", "diloco.tasks.tiny:FORMAT",
    "diloco.tasks.tiny:", ":make_task",
])
def test_bad_spec(spec):
    with pytest.raises(ConfigError, match="task"):
        load_task(spec)


def test_user_factory_spec():
    task = load_task("diloco.tasks.tiny:make_task", {"in_dim": 4})
    assert task.options["in_dim"] == 4
    assert task.train_data().batch([0])["x"].shape == (1, 4)


@pytest.mark.parametrize("name,options", [("gpt", SMALL_GPT), ("tiny", {})])
def test_model_is_deterministic_under_seed(name, options):
    task = load_task(name, options)
    torch.manual_seed(7)
    a = task.build_model().state_dict()
    torch.manual_seed(7)
    b = task.build_model().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_is_cached_and_leaves_global_rng_alone():
    task = load_task("tiny")
    state = torch.get_rng_state()
    assert task.train_data() is task.train_data()
    assert task.eval_data() is task.eval_data()
    assert torch.equal(state, torch.get_rng_state())


def test_dataset_ids():
    base = load_task("gpt", SMALL_GPT)
    same = load_task("gpt", SMALL_GPT)
    other = load_task("gpt", {**SMALL_GPT, "seq_len": 16})
    ids = {base.train_data().dataset_id, base.eval_data().dataset_id, other.train_data().dataset_id}
    assert len(ids) == 3
    assert base.train_data().dataset_id == same.train_data().dataset_id
    assert base.eval_data().dataset_id == same.eval_data().dataset_id
    assert len(base.train_data().dataset_id) == 24

    t1, t2, t3 = load_task("tiny"), load_task("tiny"), load_task("tiny", {"data_seed": 99})
    assert t1.train_data().dataset_id == t2.train_data().dataset_id
    assert t1.train_data().dataset_id != t3.train_data().dataset_id
    assert t1.train_data().dataset_id != t1.eval_data().dataset_id
    assert t1.train_data().dataset_id == load_task("tiny", {"hidden": 8}).train_data().dataset_id


def test_gpt_batch():
    task = load_task("gpt", SMALL_GPT)
    data = task.train_data()
    assert data.tokens_per_sample == 32
    batch = data.batch([0, 3, len(data) - 1])
    assert batch["x"].shape == batch["y"].shape == (3, 32)
    assert batch["x"].dtype == batch["y"].dtype == torch.int64
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    # sample i is the window at i * seq_len; neighbouring samples share one byte only
    corpus = data.data.long()
    assert torch.equal(batch["x"][1], corpus[96:128]) and torch.equal(batch["y"][1], corpus[97:129])
    assert torch.equal(data.batch([0, 3])["x"], batch["x"][:2])  # deterministic


def test_tiny_batch():
    data = load_task("tiny").train_data()
    assert len(data) == 4096 and len(load_task("tiny").eval_data()) == 512
    batch = data.batch(range(5))
    assert batch["x"].shape == (5, 8) and batch["y"].shape == (5, 1)
    assert batch["x"].dtype == batch["y"].dtype == torch.float32


@pytest.mark.parametrize("name,options", [("gpt", SMALL_GPT), ("tiny", {})])
def test_out_of_range_ids(name, options):
    data = load_task(name, options).train_data()
    with pytest.raises(IndexError):
        data.batch([len(data)])
    with pytest.raises(IndexError):
        data.batch([0, -1])
    with pytest.raises(ValueError):
        data.batch([])


def test_splits_are_disjoint():
    task = load_task("gpt", SMALL_GPT)
    train, ev = task.train_data(), task.eval_data()
    assert ev.data.storage_offset() == train.data.storage_offset() + len(train.data)
    total = len(train.data) + len(ev.data)
    assert total == int(0.25 * 2**20)
    assert len(ev.data) == int(total * 0.05)

    task = load_task("tiny")
    train_rows = {tuple(r) for r in task.train_data().x.tolist()}
    assert not train_rows & {tuple(r) for r in task.eval_data().x.tolist()}


@pytest.mark.parametrize("name,options,lr", [("gpt", SMALL_GPT, 1e-3), ("tiny", {}, 1e-2)])
def test_training_reduces_loss(name, options, lr):
    task = load_task(name, options)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = to_device(task.train_data().batch(range(16)), "cpu")
    losses = []
    for _ in range(20):
        loss = task.loss(model, batch)
        assert loss.ndim == 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_gpt_state_dict_has_no_shared_storage():
    torch.manual_seed(0)
    state = load_task("gpt").build_model().state_dict()
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert "lm_head.weight" in state and "tok_emb.weight" in state


def test_tiny_model_has_int64_buffer():
    state = load_task("tiny").build_model().state_dict()
    assert any(t.dtype == torch.int64 for t in state.values())
    assert any(k.endswith("running_mean") for k in state)


def test_gpt_without_stdlib_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(gpt.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="stdlib"):
        load_task("gpt").train_data()

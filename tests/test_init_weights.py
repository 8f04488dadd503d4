"""Starting a run from a weights file (`--init-weights`), and refusing files that do not fit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diloco import keys, model, runs
from diloco.config import RunConfig
from diloco.connect import connect_redis
from diloco.errors import ConfigError
from diloco.store import open_store
from diloco.tasks import load_task
from tests import harness

DILOCO = [sys.executable, "-m", "diloco"]


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    return model.state_to_cpu(runs.build_model(load_task("tiny", {}), seed))


def _init_cli(redis_url: str, file_url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DILOCO, "init", "--run", "t", "--redis-url", redis_url, "--store", file_url,
                           "--task", "tiny", "--sync-every", "5", *extra], capture_output=True, text=True, timeout=120)


def test_run_starts_from_the_file_and_a_second_init_must_name_the_same_file(redis_url, file_url, r, tmp_path):
    state = _tiny_state(seed=7)
    assert any(not torch.equal(state[n], t) for n, t in _tiny_state(seed=0).items()), "seeds give other weights"
    path = tmp_path / "pretrained.safetensors"
    save_file(state, path)
    out = _init_cli(redis_url, file_url, "--init-weights", str(path))
    assert out.returncode == 0, out.stderr
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.hget(keys.config("t"), "init_weights") == sha
    v0 = runs.load_weights(open_store(file_url), runs.read_head(r, "t"))
    assert v0.keys() == state.keys() and all(torch.equal(v0[n], t) for n, t in state.items())

    assert _init_cli(redis_url, file_url, "--init-weights", str(path)).returncode == 0, "same file: idempotent"
    assert _init_cli(redis_url, file_url).returncode == 0, "no flag: the run's setting is adopted"
    other = tmp_path / "other.safetensors"
    save_file(_tiny_state(seed=8), other)
    refused = _init_cli(redis_url, file_url, "--init-weights", str(other))
    assert refused.returncode == 2 and f"init_weights: '{sha}' -> '" in refused.stderr, refused.stderr


def _refused(redis_url, file_url, r, path: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        runs.init_run(connect_redis(redis_url), open_store(file_url), "t", dict(harness.TINY),
                      runs.read_init_weights(path))
    assert not r.keys("diloco:*"), "a refused init creates nothing"


def test_files_that_do_not_fit_the_model_are_refused_naming_the_problem(redis_url, file_url, r, tmp_path):
    state = _tiny_state(seed=0)
    name = sorted(state)[0]
    wrong_shape = {**state, name: torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)}
    save_file(wrong_shape, tmp_path / "shape.safetensors")
    _refused(redis_url, file_url, r, tmp_path / "shape.safetensors", rf"do not fit the task's model: {name}: task has")
    save_file({n: t for n, t in state.items() if n != name}, tmp_path / "missing.safetensors")
    _refused(redis_url, file_url, r, tmp_path / "missing.safetensors", f"{name}: missing from the file")
    save_file({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    _refused(redis_url, file_url, r, tmp_path / "extra.safetensors", "extra.weight: not in the task's model")
    nan = {**state, name: torch.full_like(state[name], float("nan"))}
    save_file(nan, tmp_path / "nan.safetensors")
    _refused(redis_url, file_url, r, tmp_path / "nan.safetensors", f"NaN or infinite values in {name}")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="is not a valid safetensors object"):
        runs.read_init_weights(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match=r"cannot read the initial weights .*nope\.safetensors"):
        runs.read_init_weights(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="give the file itself"):
        harness.init(redis_url, file_url, init_weights="0" * 64)
    with pytest.raises(ConfigError, match="init_weights must be a sha256"):
        RunConfig(run="t", init_weights="not-a-hash")

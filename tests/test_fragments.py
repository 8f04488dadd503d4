"""Streaming DiLoCo's fragment plans and their staggered schedule (diloco/fragments.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from diloco import fragments, runs
from diloco.config import RunConfig
from diloco.errors import ConfigError
from diloco.tasks import load_task


def _blocks(n_blocks: int) -> dict[str, int]:
    names = {"tok_emb.weight": 100, "pos_emb.weight": 10}
    for i in range(n_blocks):
        names |= {f"blocks.{i}.fc.weight": 50, f"blocks.{i}.fc.bias": 5}
    return names | {"ln_f.weight": 4, "lm_head.weight": 100}


def test_the_gpt_task_splits_at_its_blocks_with_embeddings_first_and_the_head_last():
    model = runs.build_model(load_task("gpt", {}), 0)
    numels = {n: t.numel() for n, t in model.state_dict().items() if t.is_floating_point()}
    plan = fragments.plan(numels, 2)
    assert plan.fragments[0][:2] == ("tok_emb.weight", "pos_emb.weight")
    assert {n.split(".")[1] for n in plan.fragments[0][2:]} == {"0"}
    assert plan.fragments[1][-3:] == ("ln_f.weight", "ln_f.bias", "lm_head.weight")
    assert {n.split(".")[1] for n in plan.fragments[1][:-3]} == {"1"}


@pytest.mark.parametrize(("layout", "want"), [("strided", [[0, 2], [1, 3]]), ("sequential", [[0, 1], [2, 3]])])
def test_blocks_go_to_fragments_strided_or_sequential(layout, want):
    plan = fragments.plan(_blocks(4), 2, layout)
    got = [sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")}) for names in plan.fragments]
    assert got == want
    assert plan.of("tok_emb.weight") == 0 and plan.of("lm_head.weight") == 1


@pytest.mark.parametrize("layout", fragments.LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_every_parameter_is_in_exactly_one_fragment_and_none_is_empty(layout, n):
    numels = _blocks(6)
    plan = fragments.plan(numels, n, layout)
    assert len(plan.fragments) == n and all(plan.fragments)
    flat = [name for names in plan.fragments for name in names]
    assert sorted(flat) == sorted(numels) and len(flat) == len(set(flat))


def test_a_model_without_blocks_is_cut_into_runs_of_about_equal_size():
    # the sync benchmark's workload: nn.Sequential of 6 Linear(2048, 2048) (names "0.weight", "2.bias", ...)
    net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())][:-1])
    numels = {n: t.numel() for n, t in net.state_dict().items()}
    plan = fragments.plan(numels, 3)
    assert [len(f) for f in plan.fragments] == [4, 4, 4], "two Linear layers (weight and bias) each"
    flat = [name for names in plan.fragments for name in names]
    assert flat == list(numels), "contiguous, in state-dict order"
    # one huge parameter and small ones: still one parameter at least per fragment
    skewed = fragments.plan({"a": 1000, "b": 1, "c": 1, "d": 1}, 3)
    assert skewed.fragments == (("a",), ("b",), ("c", "d"))


def test_plans_that_cannot_be_made_say_why():
    with pytest.raises(ConfigError, match=r"the model has 2 repeated blocks, fewer than num_fragments \(3\)"):
        fragments.plan(_blocks(2), 3)
    with pytest.raises(ConfigError, match=r"the model has 2 parameters, fewer than num_fragments \(3\)"):
        fragments.plan({"a": 5, "b": 5}, 3)
    between = {"blocks.0.w": 1, "mid.w": 1, "blocks.1.w": 1}
    with pytest.raises(ConfigError, match=r"'mid\.w' lies between the model's repeated blocks"):
        fragments.plan(between, 2)


@pytest.mark.parametrize(("args", "message"), [
    ((10, 4, 0, 0.5, "strided"), r"sync_every \(10\) must be divisible by num_fragments \(4\)"),
    ((12, 4, 3, 0.5, "strided"), r"overlap_steps must be in \[0, sync_every / num_fragments = 3\), got 3"),
    ((12, 4, -1, 0.5, "strided"), r"overlap_steps must be in"),
    ((12, 4, 1, 1.5, "strided"), r"merge_alpha must be in \[0, 1\]"),
    ((12, 4, 1, 0.5, "random"), r"fragment_layout must be one of strided, sequential, got 'random'"),
    ((12, 0, 0, 0.5, "strided"), r"num_fragments must be a positive integer"),
])
def test_streaming_settings_are_checked_against_each_other(args, message):
    with pytest.raises(ConfigError, match=message):
        fragments.check_settings(*args)
    fragments.check_settings(12, 4, 2, 0.5, "sequential")   # and a valid set passes


def test_fragments_sync_staggered_every_h_over_n_steps_each_once_per_h():
    h, n = 12, 4
    schedule = {s: fragments.syncs_after(s, h, n) for s in range(0, 3 * h + 1)}
    synced = {s: f for s, f in schedule.items() if f is not None}
    assert list(synced) == list(range(3, 3 * h + 1, 3)), "one fragment every H/N = 3 optimizer steps"
    assert list(synced.values())[:5] == [1, 2, 3, 0, 1], "fragment f at f*H/N + k*H"
    for f in range(n):
        steps = [s for s, g in synced.items() if g == f]
        assert all(b - a == h for a, b in itertools.pairwise(steps)), f"fragment {f} once every H steps"
    assert fragments.syncs_after(0, h, n) is None
    assert all(fragments.syncs_after(s, h, 1) == (0 if s % h == 0 else None) for s in range(1, 40)), "N=1 is DiLoCo"


def test_the_fingerprint_tells_assignments_apart():
    a, b = fragments.plan(_blocks(4), 2, "strided"), fragments.plan(_blocks(4), 2, "sequential")
    assert a.fingerprint() == fragments.plan(_blocks(4), 2, "strided").fingerprint()
    assert a.fingerprint() != b.fingerprint()
    with pytest.raises(KeyError, match="in no fragment"):
        a.of("nope")


def test_with_row_counts_a_model_without_blocks_is_cut_into_equal_element_counts_between_rows():
    state = {f"{i}.{kind}": torch.zeros(2048, 2048) if kind == "weight" else torch.zeros(2048)
             for i in range(6) for kind in ("weight", "bias")}   # the sync benchmark's model
    cfg = RunConfig.from_options("r", {"num_fragments": 4, "sync_every": 20})
    plan = fragments.plan_of_state(state, cfg)
    sizes = [sum(t.numel() for t in fragments.part(state, names).values()) for names in plan.fragments]
    total = sum(t.numel() for t in state.values())
    assert max(sizes) - min(sizes) <= 2048 and sum(sizes) == total, "equal to within a row"
    assert plan.fragments[0] == ("0.weight", "0.bias", "1.weight[0:1024]")
    assert plan.fragments[1][0] == "1.weight[1024:2048]"
    assert fragments.plan({n: t.numel() for n, t in state.items()}, 4).fragments != plan.fragments, \
        "without row counts: whole entries"


def test_pieces_are_views_and_join_puts_split_entries_back():
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(10, 3, generator=g), "b": torch.randn(7, generator=g), "c": torch.tensor(1)}
    rows = {"a": 10, "b": 7, "c": 1}
    plan = fragments.plan({n: t.numel() for n, t in state.items()}, 3, rows=rows)
    parts = {k: v for names in plan.fragments for k, v in fragments.part(state, names).items()}
    assert any("[" in k for k in parts), plan.fragments
    joined = fragments.join({k: v.clone() for k, v in parts.items()})
    assert joined.keys() == state.keys() and all(torch.equal(joined[n], state[n]) for n in state)
    key = next(k for k in parts if k.startswith("a["))
    parts[key].add_(1.0)   # a view: the model's tensor changes
    name, (lo, hi) = fragments.piece(key)
    assert name == "a" and torch.equal(state["a"][lo:hi], parts[key])
    with pytest.raises(ValueError, match="do not cover its rows"):
        fragments.join({"a[0:3]": torch.zeros(3), "a[4:10]": torch.zeros(6)})


def test_a_model_too_small_to_cut_into_equal_rows_falls_back_to_whole_entries():
    plan = fragments.plan({"a": 1, "b": 1, "c": 1}, 3, rows={"a": 1, "b": 1, "c": 1})
    assert plan.fragments == (("a",), ("b",), ("c",))


def test_a_model_with_fewer_blocks_than_fragments_is_cut_by_size_when_rows_are_known():
    numels = _blocks(2)
    plan = fragments.plan(numels, 3, rows={n: 1 for n in numels})   # rows known: equal sizes, no error
    assert len(plan.fragments) == 3 and all(plan.fragments)

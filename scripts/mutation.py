"""Mutation testing of the core with mutmut, one module group at a time, each with its own fast tests.

mutmut reads one test selection per run, and the lock's tests wait out real TTLs: with one
selection every mutant of the aggregator would run them. So each group below runs in its own copy
of the working tree (under mutation-runs/, git-ignored; a second run of a group reuses its cached
verdicts unless the code changed), with [tool.mutmut] of pyproject.toml narrowed to the group's
modules and tests. Then it prints killed and surviving mutants per module. Not in CI: it takes about
40 minutes on 2 cores.

    nice -n 15 .venv/bin/python scripts/mutation.py                # every group
    nice -n 15 .venv/bin/python scripts/mutation.py outer reduce   # some groups
    nice -n 15 .venv/bin/python scripts/mutation.py --rerun-survivors codecs   # after adding tests
    .venv/bin/python scripts/mutation.py --show outer NAME ...     # the diff of mutants as they were tested

docs/mutation.md has the scores and the surviving mutants judged equivalent.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "mutation-runs"
UNITS = "tests/test_units.py::test_"
# The round loop's fast end-to-end tests (each under about 4 s on 2 idle cores): every one runs
# _round and _step_and_commit, so a surviving mutant of those waits for all of them. Left out:
# test_control's pause test (10-60 s) and the fault tests that restart servers.
ROUND_TESTS = (
    "tests/test_hostile.py", "tests/test_nesterov.py", "tests/test_replay_reference.py",
    "tests/test_control.py::test_set_outer_lr_applies_at_the_next_round",
    "tests/test_control.py::test_kick_removes_a_worker_and_the_round_goes_on",
    "tests/test_control.py::test_version_budget_stops_the_run_cleanly",
    "tests/test_pipeline.py::test_inner_state_persists_and_exact_steps_with_accumulation",
    "tests/test_pipeline.py::test_two_aggregators_commit_each_version_once",
    UNITS + "commit_refused_for_a_unit_whose_lease_moved_drops_that_worker_and_commits_the_rest",
    UNITS + "a_late_delta_landing_during_the_reduce_is_still_rejected_with_a_reason",
    UNITS + "malformed_or_foreign_unit_ids_are_rejected_with_a_reason_and_change_no_bitmap",
    "tests/test_faults.py::test_min_workers_holds_the_round_until_enough_workers",
    "tests/test_bad_input.py::test_undecodable_shard_with_valid_checksum_is_rejected",
)
AGGREGATOR_TESTS = (
    *ROUND_TESTS, "tests/test_sync_path.py", "tests/test_async.py",
    "tests/test_faults.py::test_units_of_a_dead_worker_do_not_stall_the_next_rounds",
    "tests/test_faults.py::test_redis_outage_between_write_and_commit_redoes_the_round",
    "tests/test_retention.py::test_the_aggregator_applies_retention_every_n_commits",
    "tests/test_wipe.py",
)


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]
    # A mutant that makes a service wait forever burns no CPU, so mutmut's CPU-time limit never ends
    # it: groups running services give each test a wall-clock limit (pytest-timeout) instead.
    timeout_s: int | None = None
    # Tests left out of the selection, by a part of their name (pytest -k "not ...").
    leave_out: tuple[str, ...] = ()


GROUPS = (
    Group("outer", ("diloco/outer.py",),
          ("tests/test_outer.py", "tests/test_nesterov.py", "tests/test_replay_reference.py",
           "tests/test_async.py::test_delayed_nesterov_with_a_buffer_of_one_is_nesterov_bit_for_bit",
           "tests/test_async.py::test_delayed_nesterov_with_a_buffer_of_three_matches_the_reference_over_seven_deltas",
           "tests/test_async.py::test_delayed_nesterov_counts_the_deltas_of_a_grace_batch_not_the_versions",
           "tests/test_async.py::test_delayed_nesterov_with_every_version_a_batch_of_n_is_the_sync_nesterov_step",
           "tests/test_async.py::test_delayed_nesterov_keeps_each_tensors_dtype",
           "tests/test_async.py::test_an_async_run_commits_a_version_per_delta_with_stale_ones_weighted_and_replays_bit_for_bit"),
          30),
    Group("codecs", ("diloco/codecs/*",),
          ("tests/test_codecs.py", "tests/test_feedback.py", "tests/test_shards.py")),
    Group("shards", ("diloco/shards.py",),
          ("tests/test_shards.py", "tests/test_feedback.py", "tests/test_codecs.py", "tests/test_replay_reference.py",
           "tests/test_reduce.py",   # the streamed reduce: DeltaBuffer.stream_shard
           "tests/test_bad_input.py::test_undecodable_shard_with_valid_checksum_is_rejected")),
    Group("reduce", ("diloco/reduce.py",),
          ("tests/test_reduce.py", "tests/test_replay_reference.py", "tests/test_hostile.py", "tests/test_nesterov.py",
           "tests/test_bad_input.py::test_undecodable_shard_with_valid_checksum_is_rejected"), 30),
    # The units tests that take under about 2 s; the slower ones (killed, stalled or restarted
    # workers) wait out leases and heartbeats and would kill no mutant these do not.
    Group("units", ("diloco/units.py",),
          ("tests/test_units.py",
           "tests/test_claims_liveness.py::test_every_schedule_finishes_the_epoch_with_every_unit_committed_once",
           "tests/test_faults.py::test_units_of_a_dead_worker_do_not_stall_the_next_rounds"), 30,
          ("killed_worker_are_reissued", "stalled_worker_keeps_its_lease", "blocked_while_redis_is_wiped",
           "restart_of_aggregator_and_workers")),
    Group("collect", ("aggregator/collect.py",), ("tests/test_collect.py", "tests/test_async.py", *ROUND_TESTS), 30),
    Group("aggregator", ("aggregator/aggregator.py",), AGGREGATOR_TESTS, 30),
    Group("lock", ("aggregator/lock.py",),
          ("tests/test_lock.py", "tests/test_pipeline.py::test_two_aggregators_commit_each_version_once",
           "tests/test_wipe.py::test_a_holder_whose_round_loop_hangs_gives_the_lock_up_and_a_standby_commits"), 90),
)


# A pytest plugin written into each copy's tests/ (never into the tree itself): a mutant's tests run
# fastest first, by the durations mutmut measured, so a mutant a unit test kills ends in well under a
# second instead of after whichever end-to-end tests pytest happened to start with (mutmut passes a
# set, in no useful order).
FASTEST_FIRST = '''"""Written by scripts/mutation.py into a mutation copy: run the selected tests fastest first."""
import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")
    if stats.is_file():
        took = json.loads(stats.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: took.get(item.nodeid, 0.0))
'''


def prepare(group: Group) -> Path:
    """The group's copy of the working tree (kept between runs, refreshed), its config narrowed."""
    tree = RUNS / group.name
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src, dst = ROOT / rel, tree / rel
        if src.is_file() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (tree / "tests" / "mutation_fastest_first.py").write_text(FASTEST_FIRST)
    text = (ROOT / "pyproject.toml").read_text()
    base = tomllib.loads(text)["tool"]["mutmut"]
    head = text[:text.index("[tool.mutmut]")]
    timeout = [f"--timeout={group.timeout_s}"] if group.timeout_s else []
    leave_out = ["-k", " and ".join(f"not {name}" for name in group.leave_out)] if group.leave_out else []
    (tree / "pyproject.toml").write_text(head + "[tool.mutmut]\n" + "\n".join([
        f"source_paths = {base['source_paths']!r}",
        f"only_mutate = {list(group.modules)!r}",
        f"process_isolation = {base['process_isolation']!r}",
        f"pytest_add_cli_args = {[*base['pytest_add_cli_args'], '-p', 'tests.mutation_fastest_first', *timeout]!r}",
        f"pytest_add_cli_args_test_selection = {[*leave_out, *group.tests]!r}",
    ]) + "\n")
    return tree


def stop_servers_under(directory: Path) -> None:
    """SIGTERM every process whose working directory lies under `directory` (redis-server runs in
    its data directory; moto_server in the test's), then SIGKILL what is left after 10 s."""
    def under() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(directory):
                    found.append(int(proc.name))
            except OSError:
                continue   # gone, or not ours to read
        return found

    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in under():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while under() and time.monotonic() < deadline:
            time.sleep(0.2)


def results(tree: Path) -> list[tuple[str, str]]:
    """(mutant, status) of every mutant mutmut has a verdict for in `tree`."""
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=tree, capture_output=True, text=True,
                             check=True).stdout
    return [(name, status.strip()) for name, status in re.findall(r"^\s+(\S+): (.+)$", listing, re.M)]


def run(group: Group, max_children: int, rerun_survivors: bool) -> dict[str, Counter]:
    """Run mutmut on the group; per module, how many mutants ended in each state."""
    tree = prepare(group)
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    print(f"== {group.name}: {', '.join(group.modules)}", flush=True)
    # mutmut keeps a verdict until the mutated function changes; after new tests, name the survivors
    again = [name for name, status in results(tree) if status == "survived"] if rerun_survivors else []
    # Tests start redis-server and moto_server in their own sessions; a mutant's run that mutmut kills
    # leaves them behind. Their directories lie under this group's TMPDIR, which tells them apart.
    tmp = RUNS / f"{group.name}-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([mutmut, "run", "--max-children", str(max_children), *again], cwd=tree,
                              capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    finally:
        stop_servers_under(tmp)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"mutmut run failed in {tree}")
    counts: dict[str, Counter] = {}
    for name, status in results(tree):
        counts.setdefault(name.split(".x", 1)[0], Counter())[status] += 1
        if status != "killed":
            print(f"   {status:10} {name}")
    return counts


def show(group: str, names: list[str]) -> None:
    """Print each mutant's changed lines as mutmut tested them: from the group's mutants/ file, its
    function against the function's `_mutmut_orig` copy. (mutmut 3.8.1's own `mutmut show`
    regenerates the diff and names the wrong mutant for functions whose names end in `_`, such as
    `outer_step_` beside `outer_step`.)"""
    root = RUNS / group / "mutants"
    for full in names:
        module, _, function = full.rpartition(".x")
        src = (root / (module.replace(".", "/") + ".py")).read_text()
        mutant = "x" + function
        orig = re.sub(r"mutmut_\d+$", "mutmut_orig", mutant)
        print(f"-- {full}")
        for line in difflib.unified_diff(_function_lines(src, orig), _function_lines(src, mutant), lineterm="", n=0):
            if line[:1] in "+-" and line[:3] not in ("+++", "---"):
                print("   " + line)


def _function_lines(src: str, name: str) -> list[str]:
    """The body of function `name` in a mutants/ file (its def line left out: the names differ)."""
    found = re.search(rf"^(    )?def {re.escape(name)}\(.*?(?=^(    )?def |^class |^[a-zA-Z_@])", src, re.S | re.M)
    return found.group(0).splitlines()[1:] if found else [f"<{name} not found>"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"of: {', '.join(g.name for g in GROUPS)} (default: all)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--rerun-survivors", action="store_true", help="test the surviving mutants again (new tests)")
    ap.add_argument("--show", action="store_true", help="GROUP NAME...: print those mutants' diffs, run nothing")
    args = ap.parse_args(argv)
    if args.show:
        show(args.groups[0], args.groups[1:])
        return 0
    chosen = [g for g in GROUPS if not args.groups or g.name in args.groups]
    print(f"{'module':28} {'mutants':>8} {'killed':>7} {'survived':>9} {'other':>6}")
    rows = []
    for group in chosen:
        for module, c in sorted(run(group, args.max_children, args.rerun_survivors).items()):
            rows.append(f"{module:28} {sum(c.values()):8} {c['killed']:7} {c['survived']:9} "
                        f"{sum(c.values()) - c['killed'] - c['survived']:6}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

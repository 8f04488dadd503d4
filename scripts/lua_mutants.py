"""Mutation testing of the Lua scripts, by hand: each guard of each script in diloco/scripts.py is
deleted or weakened in turn, and the script tests must fail on every such mutant.

mutmut mutates Python, and a Lua script is one string literal to it (a mutated string is a syntax
error, which says nothing about the tests), so the guards are listed here. Each mutant is applied
to a copy of the working tree (the tree itself is never touched), and the tests run there:

    .venv/bin/python scripts/lua_mutants.py            # every mutant; exit 1 if one survives
    .venv/bin/python scripts/lua_mutants.py -k COMMIT  # those whose name contains COMMIT

A mutant whose text is not found fails too: the script changed and this list must follow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_scripts.py", "tests/test_script_guards.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    old: str
    new: str


MUTANTS = [
    Mutant("ACQUIRE_LOCK: no EXISTS guard", "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\nlocal token",
           "local token"),
    Mutant("RENEW_IF_OWNER: no owner check", "if redis.call('GET', KEYS[1]) == ARGV[1] then\n  redis.call('PEXPIRE'",
           "if true then\n  redis.call('PEXPIRE'"),
    Mutant("DELETE_IF_OWNER: no owner check", "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL'",
           "if true then return redis.call('DEL'"),
    Mutant("REGISTER_WORKER: no live-session check", "if current and current ~= ARGV[2] then return 0 end", ""),
    Mutant("REGISTER_WORKER: a free id counts as taken", "if current and current ~= ARGV[2]", "if current ~= ARGV[2]"),
    Mutant("INIT_RUN: no EXISTS guard", "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\nlocal i = 1",
           "local i = 1"),
    Mutant("COMMIT: no lock check",
           "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LOCK_LOST') end", ""),
    Mutant("COMMIT: no base-version check",
           "if current ~= ARGV[2] then return redis.error_reply('STALE ' .. tostring(current)) end", ""),
    Mutant("COMMIT: no already-done check", "if redis.call('GETBIT', done, bit) == 1 then", "if false then"),
    Mutant("COMMIT: no owner check", "if owner and owner ~= worker then", "if false then"),
    Mutant("COMMIT: a unit leased to nobody is refused", "if owner and owner ~= worker then",
           "if owner ~= worker then"),
    Mutant("COMMIT: a committed unit is not marked claimed", "  redis.call('SETBIT', KEYS[base + 3], u[2], 1)\n", ""),
    Mutant("COMMIT: writes each unit as it checks it", "    units[#units + 1] = {e, bit}",
           "    redis.call('SETBIT', done, bit, 1)\n    units[#units + 1] = {e, bit}"),
    Mutant("COMMIT: every epoch's units in the first epoch's keys",
           "local done, owners = KEYS[4 + 4 * e], KEYS[6 + 4 * e]", "local done, owners = KEYS[4], KEYS[6]"),
    Mutant("COMMIT: a committed unit keeps its lease", "  redis.call('ZREM', KEYS[base + 1], u[2])\n", ""),
    Mutant("COMMIT: the head keeps an older version's update",
           "'deltas_since', ARGV[8], 'update', ARGV[9], 'update_digest', ARGV[10])",
           "'deltas_since', ARGV[8])\nif ARGV[9] ~= '' then redis.call('HSET', KEYS[2], 'update', ARGV[9], "
           "'update_digest', ARGV[10]) end"),
    Mutant("COMMIT: a head first written before BLAKE3 digests keeps its sha256 fields",
           "redis.call('HDEL', KEYS[2], 'weights_sha256', 'momentum_sha256', 'update_sha256')\n", ""),
    Mutant("COMMIT: a committed unit keeps its owner", "  redis.call('HDEL', KEYS[base + 2], u[2])\n", ""),
    Mutant("CLAIM_UNITS: no RETRY when epoch_lo moved", "if lo ~= tonumber(ARGV[1]) or hi", "if false or hi"),
    Mutant("CLAIM_UNITS: no RETRY when epoch_hi moved", "or hi ~= tonumber(ARGV[2]) then", "then"),
    Mutant("CLAIM_UNITS: a claim the window cannot fill takes part of it",
           "if free < want then return {'RETRY'} end", ""),
    Mutant("CLAIM_UNITS: expired leases never released", "redis.call('ZRANGEBYSCORE', leases, '-inf', now)",
           "redis.call('ZRANGEBYSCORE', leases, '-inf', 0)"),
    Mutant("CLAIM_UNITS: an expired lease frees a done unit", "if redis.call('GETBIT', done, u) == 0 then redis.call",
           "if true then redis.call"),
    Mutant("CLAIM_UNITS: a finished epoch never closes",
           "if redis.call('BITCOUNT', ARGV[6], 0, n - 1, 'BIT') == n then", "if false then"),
    Mutant("CLAIM_UNITS: epoch_hi left below epoch_lo", "if hi < lo + 1 then", "if false then"),
    Mutant("CLAIM_UNITS: the next epoch never opens", "    if e > hi then  --", "    if false then  --"),
    Mutant("CLAIM_UNITS: no STRLEN guard", "if redis.call('STRLEN', claimed) < math.ceil(n / 8) then", "if false then"),
    Mutant("CLAIM_UNITS: no stop when no bit is free", "    if p < 0 then break end\n", ""),
    Mutant("CLAIM_UNITS: goes on to the next epoch with enough units", "  if #out >= want then break end\n", ""),
    Mutant("RENEW_UNITS: no owner check", "if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then", "if true then"),
    Mutant("RENEW_UNITS: renewing recreates a lease (no XX)", "redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])",
           "redis.call('ZADD', KEYS[1], expiry, ARGV[i])"),
    Mutant("RELEASE_UNITS: no owner check", "if redis.call('HGET', KEYS[3], u) == ARGV[1] and redis.call",
           "if redis.call"),
    Mutant("RELEASE_UNITS: no done check", "and redis.call('GETBIT', ARGV[2], u) == 0 then", "then"),
    Mutant("REJECT: no once-per-entry guard", "if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end",
           "redis.call('SADD', KEYS[1], ARGV[1])"),
]


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree, as they are now."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_mutant(mutant: Mutant, tree: Path, original: str) -> tuple[str, str]:
    """('killed' | 'SURVIVED' | 'NOT FOUND', the last line pytest printed)."""
    if original.count(mutant.old) != 1:
        return "NOT FOUND", f"{mutant.old!r} occurs {original.count(mutant.old)} times in diloco/scripts.py"
    (tree / "diloco" / "scripts.py").write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=600)
    last = (out.stdout.strip().splitlines() or [out.stderr.strip()])[-1]
    return ("killed" if out.returncode == 1 else "SURVIVED" if out.returncode == 0 else f"ERROR {out.returncode}"), last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the mutants whose name contains this")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="lua-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        original = (tree / "diloco" / "scripts.py").read_text()
        for mutant in chosen:
            verdict, last = run_mutant(mutant, tree, original)
            bad += verdict != "killed"
            print(f"{verdict:9} {mutant.name}  ({last})", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} Lua mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

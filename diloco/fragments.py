"""Streaming DiLoCo's fragments (Douillard et al. 2025, arXiv 2501.18512): which parameters sync
together, and when each fragment syncs (docs/architecture.md, "Streaming fragments").

A plan follows the model's repeated blocks: the parameters named `<prefix>.<i>.<rest>` under the
prefix with the most distinct indices `i` (a transformer's `blocks.0`, `blocks.1`, ...). Block i goes
to fragment `i mod N` (`strided`, the default: each fragment spans the depth) or `i * N // B`
(`sequential`: contiguous stacks); parameters before the first block (embeddings) join the first
fragment and parameters after the last (final norm, head) the last one, as the paper assigns them.
A model without repeated blocks, or with fewer than N, is cut, in state-dict order, into N runs of
equal element count: given the entries' row counts, an entry that straddles a cut is split between
rows into pieces named `name[a:b]` (rows a to b of dim 0, a view of the tensor), so that every
fragment, and so every sync event, carries 1/N of the model to within a row. The plan covers every
state-dict entry (a fragment's weights object holds exactly its pieces; `join` puts split entries
back together). Its fingerprint is the run's `fragment_plan` setting, checked by every worker, so
every worker cuts alike.

With H = `sync_every` and N fragments, fragment f syncs after the worker's optimizer step s whenever
s = f*H/N + k*H, s > 0: every H/N steps one fragment, each fragment once every H steps, staggered.
Steps are optimizer steps, so gradient accumulation does not move the schedule.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diloco.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from diloco.config import RunConfig

LAYOUTS = ("strided", "sequential")
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.")
_PIECE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


@dataclass(frozen=True)
class FragmentPlan:
    fragments: tuple[tuple[str, ...], ...]   # each fragment's parameter names, in state-dict order

    def of(self, name: str) -> int:
        for f, names in enumerate(self.fragments):
            if name in names:
                return f
        raise KeyError(f"{name!r} is in no fragment of this plan")

    def fingerprint(self) -> str:
        """A digest of the assignment, for the run's model check."""
        text = "\n".join(f"{f}\t{name}" for f, names in enumerate(self.fragments) for name in names)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_of_state(state: Mapping[str, torch.Tensor], cfg: RunConfig) -> FragmentPlan:
    """The run's plan for a model whose state dict is `state` (entries of more than one row may be split)."""
    rows = {name: t.shape[0] if t.dim() else 1 for name, t in state.items()}
    return plan({name: t.numel() for name, t in state.items()}, cfg.num_fragments, cfg.fragment_layout, rows)


def piece(key: str) -> tuple[str, tuple[int, int] | None]:
    """(entry name, (first row, end row) or None for the whole entry) of a plan's piece name."""
    m = _PIECE.match(key)
    return (m.group(1), (int(m.group(2)), int(m.group(3)))) if m else (key, None)


def part(state: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The pieces of `state` named in one fragment: views of its tensors, no copies (an in-place change
    of a piece changes `state`)."""
    out = {}
    for key in keys:
        name, rows = piece(key)
        out[key] = state[name] if rows is None else state[name][rows[0]:rows[1]]
    return out


def join(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from every fragment's pieces: split entries concatenated back in row order."""
    import torch  # here: config imports this module, and `diloco status` does not need torch

    out: dict[str, torch.Tensor] = {}
    split: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for key, t in parts.items():
        name, rows = piece(key)
        if rows is None:
            out[name] = t
        else:
            split.setdefault(name, []).append((*rows, t))
    for name, pieces in split.items():
        pieces.sort(key=lambda p: p[0])
        ends = [0] + [b for _, b, _ in pieces[:-1]]
        if [a for a, _, _ in pieces] != ends:
            raise ValueError(f"the pieces of {name!r} do not cover its rows in order: "
                             f"{[(a, b) for a, b, _ in pieces]}")
        out[name] = torch.cat([t for _, _, t in pieces])
    return out


def check_settings(sync_every: int, num_fragments: int, overlap_steps: int, merge_alpha: float, layout: str) -> None:
    """The streaming settings against each other; ConfigError naming the one that does not fit."""
    if num_fragments < 1:
        raise ConfigError(f"num_fragments must be a positive integer, got {num_fragments!r}")
    if sync_every % num_fragments:
        raise ConfigError(f"sync_every ({sync_every}) must be divisible by num_fragments ({num_fragments}): "
                          f"one fragment syncs every sync_every / num_fragments steps")
    interval = sync_every // num_fragments
    if not 0 <= overlap_steps < interval:
        raise ConfigError(f"overlap_steps must be in [0, sync_every / num_fragments = {interval}), got "
                          f"{overlap_steps!r}: a fragment's result must arrive before the next fragment syncs")
    if not 0.0 <= merge_alpha <= 1.0:
        raise ConfigError(f"merge_alpha must be in [0, 1] (0 = take the global fragment), got {merge_alpha!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"fragment_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def plan(numels: Mapping[str, int], num_fragments: int, layout: str = "strided",
         rows: Mapping[str, int] | None = None) -> FragmentPlan:
    """The fragments of a model whose state-dict entries are `numels` (name -> element count, in
    state-dict order). With `rows` (name -> rows of dim 0) a model without blocks is cut into equal
    element counts, splitting entries between rows; without, at whole entries."""
    names = list(numels)
    if num_fragments == 1:
        return FragmentPlan((tuple(names),))
    block_of = _blocks(names)
    blocks = len(set(block_of.values())) if block_of is not None else 0
    if blocks < num_fragments and rows is not None and (split := _by_rows(numels, rows, num_fragments)) is not None:
        return split   # no blocks, or fewer than fragments: equal element counts
    if block_of is None:
        return _by_size(numels, num_fragments)
    rank = {i: r for r, i in enumerate(sorted(set(block_of.values())))}
    if len(rank) < num_fragments:
        raise ConfigError(f"the model has {len(rank)} repeated blocks, fewer than num_fragments ({num_fragments}): "
                          f"every fragment needs a block")
    in_blocks = [pos for pos, name in enumerate(names) if name in block_of]
    first, last = in_blocks[0], in_blocks[-1]
    out: list[list[str]] = [[] for _ in range(num_fragments)]
    for pos, name in enumerate(names):
        if name in block_of:
            r = rank[block_of[name]]
            f = r % num_fragments if layout == "strided" else r * num_fragments // len(rank)
        else:
            f = 0 if pos < first else num_fragments - 1 if pos > last else _between(name)
        out[f].append(name)
    return FragmentPlan(tuple(tuple(ns) for ns in out))


def syncs_after(step: int, sync_every: int, num_fragments: int) -> int | None:
    """The fragment that syncs after optimizer step number `step` (1-based), or None."""
    interval = sync_every // num_fragments
    if step <= 0 or step % interval:
        return None
    return (step // interval) % num_fragments


def _blocks(names: list[str]) -> dict[str, int] | None:
    """{parameter name: its block index} under the prefix with the most distinct indices; None if no
    prefix repeats (fewer than two indices)."""
    by_prefix: dict[str, dict[str, int]] = {}
    for name in names:
        if m := _BLOCK.match(name):
            by_prefix.setdefault(m.group(1), {})[name] = int(m.group(2))
    best = max(by_prefix.values(), key=lambda found: len(set(found.values())), default=None)
    return best if best is not None and len(set(best.values())) >= 2 else None


def _between(name: str) -> int:
    raise ConfigError(f"parameter {name!r} lies between the model's repeated blocks: no fragment rule places it")


def _by_rows(numels: Mapping[str, int], rows: Mapping[str, int], num_fragments: int) -> FragmentPlan | None:
    """N runs of equal element count to within a row: each cut falls between the rows of the entry
    it crosses (that entry becomes two pieces). None if some fragment would be empty (a model of few,
    tiny entries), for `_by_size` to cut at whole entries instead."""
    total = sum(numels.values())
    cuts = [total * (f + 1) / num_fragments for f in range(num_fragments - 1)]
    out: list[list[str]] = [[] for _ in range(num_fragments)]
    done, f = 0, 0
    for name, numel in numels.items():
        n_rows = max(1, rows.get(name, 1))
        per_row = numel / n_rows
        start = 0
        while f < len(cuts) and done + (n_rows - start) * per_row > cuts[f]:
            cut = min(n_rows, max(start, round((cuts[f] - done) / per_row) + start)) if per_row else start
            if cut > start:
                out[f].append(name if (start, cut) == (0, n_rows) else f"{name}[{start}:{cut}]")
                done += (cut - start) * per_row
                start = cut
            f += 1
        if start < n_rows:
            out[f].append(name if start == 0 else f"{name}[{start}:{n_rows}]")
            done += (n_rows - start) * per_row
    if not all(out):
        return None
    return FragmentPlan(tuple(tuple(ns) for ns in out))


def _by_size(numels: Mapping[str, int], num_fragments: int) -> FragmentPlan:
    """N contiguous runs of parameters of about equal element count, none empty: each parameter goes
    to the share its middle element falls in, moving on by at most one fragment a parameter and
    leaving one parameter for each fragment after it."""
    names = list(numels)
    if len(names) < num_fragments:
        raise ConfigError(f"the model has {len(names)} parameters, fewer than num_fragments ({num_fragments})")
    total = max(1, sum(numels.values()))
    out: list[list[str]] = [[] for _ in range(num_fragments)]
    done, f = 0, 0
    for pos, name in enumerate(names):
        share = (2 * done + numels[name]) * num_fragments // (2 * total)
        lo, hi = max(f, num_fragments - len(names) + pos), min(f + 1 if pos else 0, num_fragments - 1)
        f = min(max(share, lo), hi)
        out[f].append(name)
        done += numels[name]
    return FragmentPlan(tuple(tuple(ns) for ns in out))

"""Streaming DiLoCo's fragments (Douillard et al. 2025, arXiv 2501.18512): which parameters sync
together, and when each fragment syncs (docs/architecture.md, "Streaming fragments").

A plan follows the model's repeated blocks: the parameters named `<prefix>.<i>.<rest>` under the
prefix with the most distinct indices `i` (a transformer's `blocks.0`, `blocks.1`, ...). Block i goes
to fragment `i mod N` (`strided`, the default: each fragment spans the depth) or `i * N // B`
(`sequential`: contiguous stacks); parameters before the first block (embeddings) join the first
fragment and parameters after the last (final norm, head) the last one, as the paper assigns them.
A model without repeated blocks is cut, in state-dict order, into N runs of about equal parameter
count. The plan covers every state-dict entry (a fragment's weights object holds exactly its
entries). Its fingerprint is the run's `fragment_plan` setting, checked by every worker, so every
worker cuts alike.

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
    """The run's plan for a model whose state dict is `state`."""
    return plan({name: t.numel() for name, t in state.items()}, cfg.num_fragments, cfg.fragment_layout)


def part(state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of `state` named in one fragment (no copies)."""
    return {name: state[name] for name in names}


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


def plan(numels: Mapping[str, int], num_fragments: int, layout: str = "strided") -> FragmentPlan:
    """The fragments of a model whose floating parameters are `numels` (name -> element count, in
    state-dict order)."""
    names = list(numels)
    if num_fragments == 1:
        return FragmentPlan((tuple(names),))
    block_of = _blocks(names)
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

"""Streaming DiLoCo on the worker (Douillard et al. 2025, arXiv 2501.18512; docs/architecture.md,
"Streaming fragments").

The model is cut into N fragments (diloco/fragments.py), each a lane with its own versions. The
worker trains in intervals of H/N optimizer steps. At the end of an interval the fragment whose turn
it is (fragment f after step s = f*H/N + k*H of a worker that started with the run; a worker that
joins later takes up the group's order from the fragments' versions) computes its pseudo-gradient
against its global copy,
and a background thread encodes, uploads and announces it, waits for the fragment's next version
and downloads it, while the worker trains on. `overlap_steps` (tau) steps into the next interval the
worker takes the result (waiting only if it is not there yet) and merges it:
`local = alpha * local + (1 - alpha) * global` for the fragment's entries (`merge_alpha`).

Work units are claimed per interval and announced with the fragment that syncs at its end; they are
done when that fragment's version commits (the others saw those steps too, but only one commit can
own a unit, and this keeps every unit exactly once).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diloco import fragments, keys, runs, stopping, units
from diloco.connect import Outage
from diloco.errors import ConfigError, ModelMismatch
from diloco.messages import Head
from diloco.shards import flat_delta

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class LaneState:
    """What the worker holds of one fragment's global state."""

    lane: str
    names: tuple[str, ...]
    version: int | None = None
    full: dict[str, torch.Tensor] = field(default_factory=dict)   # as committed (CPU)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # its floating entries, fp32 on the device


@dataclass
class Exchange:
    """What one fragment's background sync brought back."""

    entry_id: str
    rejected: str | None
    head: Head
    weights: dict[str, torch.Tensor] | None   # the new version's weights, None if the head did not move
    recovered: bool = False   # a `diloco recover` since the fragments were loaded: any of them may have gone back


@dataclass
class Pending:
    fragment: int
    version: int                     # the base version the delta was computed against
    claimed: list[units.Unit]
    future: Future[Exchange]


@dataclass
class MergeInfo:
    """A merge, handed to the worker's observer (tests)."""

    fragment: int
    version: int
    step: int                                 # optimizer steps done when it merged
    local: dict[str, torch.Tensor]            # the fragment's local entries before the merge (copies)
    global_: dict[str, torch.Tensor]          # the fragment's new global entries
    merged: dict[str, torch.Tensor]           # after the merge (copies)


def merge_(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor], alpha: float) -> None:
    """local = alpha * local + (1 - alpha) * global, in place; entries that are not floating take the
    global value."""
    with torch.no_grad():
        for name, g in global_.items():
            t = local[name]
            if t.is_floating_point() and alpha:
                t.mul_(alpha).add_(g.to(t.device, t.dtype), alpha=1.0 - alpha)
            else:
                t.copy_(g)


class Streaming:
    """The worker's rounds when the run has fragments: `round()` trains one interval of H/N steps."""

    def __init__(self, w: Worker) -> None:
        self.w, cfg = w, w.cfg
        if w.ranks.distributed:
            raise ConfigError("streaming runs (num_fragments > 1) train on one process per worker: start the "
                              "worker without torchrun")
        self.interval = cfg.sync_every // cfg.num_fragments
        self.plan = fragments.plan_of_state(w.model.state_dict(), cfg)
        if self.plan.fingerprint() != cfg.fragment_plan:
            raise ModelMismatch(f"the local model cuts into other fragments than run {cfg.run!r}'s (plan "
                                f"{self.plan.fingerprint()} vs {cfg.fragment_plan})")
        self.lanes = [LaneState(lane, names) for lane, names in zip(cfg.lanes, self.plan.fragments, strict=True)]
        self.pending: Pending | None = None
        # The group's sync events so far (the fragments' versions added up, counted on from there): the
        # next fragment to sync is `events + 1` mod N, so a worker that joins or restarts mid-run syncs the
        # fragments in the group's order (see _load_all), and its learning rate follows the run's cycles.
        self.events = 0
        # The recovery id (runs.heads_and_recovery) the fragments were loaded under. A recovery can put back any
        # fragment, not only the one being synced: a worker that went on with its own order while the
        # others reloaded would sync another fragment than theirs, and each would wait for the other.
        self.recovery = ""
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fragment-sync")
        # the background thread's own outage clock: the training thread's retries must not reset it
        self.outage = Outage(w.s.outage_limit_s, w.stop_event)
        self.train_s = 0.0      # inner steps, all intervals
        self.wait_s = 0.0       # blocked on a fragment's result at a merge
        self.send_s = 0.0       # computing the delta and handing it over

    def finish(self) -> None:
        """Merge the last fragment's result (the worker ends after a set number of intervals)."""
        if self.pending is not None:
            self._merge()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- one interval ----------------------------------------------------------------------------

    def round(self) -> bool:
        """Train one interval, merging the previous fragment's result after `overlap_steps`, and hand the
        next fragment's delta to the background; False if stopped."""
        w, cfg = self.w, self.w.cfg
        io = w.outage.call
        if not io("Redis", w._wait_while_paused):
            return False
        claimed = io("Redis", lambda: w.leases.claim(units.units_per_round(cfg, self.interval), w.stop_event,
                                                      keep=True))
        if claimed is None:
            return False
        if any(lane.version is None for lane in self.lanes):
            io("the object store", self._load_all)
        start, cycle, into = w.steps_done, self.events // cfg.num_fragments, self.events % cfg.num_fragments
        ids = w._round_samples(start, claimed)
        per_step = cfg.grad_accum * cfg.batch_size
        split = cfg.overlap_steps if self.pending is not None else 0
        losses: list[float] = []
        micro_batches, train_s = 0, 0.0
        w.heartbeat.update(state="training")
        on_step = self._on_step(start)   # one clock for the interval's two pieces
        for lo, hi in ((0, split), (split, self.interval)):
            if lo == split and self.pending is not None and not self._merge():
                return False
            if hi == lo:
                continue
            done = w.inner.train(cycle, ids[lo * per_step:hi * per_step], w._should_stop, on_step,
                                 first_step=into * self.interval + lo)
            if done is None:
                return False
            losses += done.losses
            micro_batches += done.micro_batches
            train_s += done.train_s
        self.train_s += train_s
        self.events += 1
        self._send(self.events % cfg.num_fragments, claimed, losses, micro_batches, train_s)
        return True

    def _on_step(self, start: int):
        w = self.w
        t0 = time.perf_counter()

        def on_step(step: int, loss: float, lr: float, elapsed: float) -> None:
            rate = (w.steps_done - start) / max(time.perf_counter() - t0, 1e-9)
            w.heartbeat.update(step=w.steps_done, loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}", lr=f"{lr:.3g}")
        return on_step

    def _send(self, f: int, claimed: list[units.Unit], losses: list[float], micro_batches: int,
              train_s: float) -> None:
        """The fragment's delta against its global copy, then its exchange in the background."""
        w, lane = self.w, self.lanes[f]
        t = time.perf_counter()
        local = fragments.part(w.model.state_dict(), lane.names)
        delta = flat_delta(lane.state, local)
        loss = sum(losses) / len(losses)
        if w.observer is not None:
            from workers.worker import RoundInfo

            w.observer(RoundInfo(lane.version, {n: local[n].detach().cpu().clone() for n in lane.names}, delta,
                                 w.optimizer, micro_batches // w.cfg.grad_accum, micro_batches, loss))
        version = lane.version
        assert version is not None
        future = self.pool.submit(self._exchange, f, version, delta, loss, train_s, micro_batches, claimed)
        self.pending = Pending(f, version, claimed, future)
        self.send_s += time.perf_counter() - t
        w.heartbeat.update(train_s_total=f"{self.train_s:.3f}", wait_s_total=f"{self.wait_s:.3f}",
                           send_s_total=f"{self.send_s:.3f}")

    def _exchange(self, f: int, version: int, delta: dict[str, torch.Tensor], loss: float, train_s: float,
                  micro_batches: int, claimed: list[units.Unit]) -> Exchange:
        """Background: encode, upload, announce; wait for the fragment's next version; download it."""
        w, lane = self.w, self.lanes[f]
        io = self.outage.call
        ann = w._upload(version, delta, loss, train_s, micro_batches, claimed, lane=lane.lane, fragment=f,
                        outage=self.outage)
        entry_id = io("Redis", lambda: w.r.xadd(keys.deltas(lane.lane), ann.to_fields(), maxlen=100_000,
                                                approximate=True))
        rejected = io("Redis", lambda: w._wait_for_version_after(version, entry_id, lane=lane.lane,
                                                                 recovery=self.recovery))
        (head,), recovery = io("Redis", lambda: runs.heads_and_recovery(w.r, w.cfg.run, [lane.lane]))
        if recovery != self.recovery:
            return Exchange(entry_id, rejected, head, None, recovered=True)
        weights = None
        if head.version != version and not w._should_stop():
            weights = io("the object store", lambda: w._fetch_weights(head, lane.full, lane.version))
        return Exchange(entry_id, rejected, head, weights)

    def _merge(self) -> bool:
        """Take the pending fragment's result (waiting if needed) and merge it; False if stopped."""
        w, p = self.w, self.pending
        assert p is not None
        t = time.perf_counter()
        if not p.future.done():
            w.heartbeat.update(state="waiting", waiting_for=f"fragment {p.fragment} version {p.version + 1}")
        try:
            # its exceptions (an outage past the limit, a wipe) are the worker's; a timed wait, so a SIGTERM
            # that lands on the background thread still stops the worker (diloco.stopping.result_of)
            got = stopping.result_of(p.future)
        except BaseException:
            self._start_over()
            raise
        self.wait_s += time.perf_counter() - t
        self.pending = None
        w.heartbeat.update(state="training", waiting_for="")
        if w._should_stop():
            return False
        if got.rejected is not None:
            log.warning("the aggregator rejected our delta for fragment %d version %d (%s)", p.fragment,
                        p.version, got.rejected)
            w.heartbeat.update(last_rejection=f"f{p.fragment} v{p.version}: {got.rejected}"[:300])
        if got.recovered or got.head.version < p.version:
            # Redis was recovered (to older versions, maybe): every fragment as the heads now say, and the
            # group's order taken up from their versions again, as every other worker does.
            log.warning("Redis was recovered (fragment %d is at version %d, was %d); reloading every fragment",
                        p.fragment, got.head.version, p.version)
            w.outage.call("the object store", self._load_all)
        elif got.weights is not None:
            self._merge_weights(p.fragment, got.head, got.weights)
        elif got.head.version == p.version:
            # The fragment's round is still open and counts on this worker (its delta was rejected, or
            # vanished with a wipe): sync the same fragment again at the end of this interval, or every
            # other worker would wait at its merge until the round's deadline, round after round.
            self.events -= 1
        if released := w.outage.call("Redis", lambda: w.leases.release(only=p.claimed)):
            log.warning("%d work units of fragment %d version %d were not committed; released", released,
                        p.fragment, p.version)
        return True

    def _start_over(self) -> None:
        """After a failed exchange (a wipe, most likely): the next interval reloads every fragment's head, as
        `diloco recover` left it, and claims its units afresh (the leases died with Redis). Without this the
        worker would raise the same error at every interval and claim ever more units."""
        self.pending = None
        for lane in self.lanes:
            lane.version = None
        self.w.leases.forget()

    def _merge_weights(self, f: int, head: Head, weights: dict[str, torch.Tensor]) -> None:
        w, lane = self.w, self.lanes[f]
        local = fragments.part(w.model.state_dict(), lane.names)   # views: the merge changes the model
        before = {n: local[n].detach().cpu().clone() for n in lane.names} if w.observer is not None else {}
        merge_(local, weights, w.cfg.merge_alpha)
        self._adopt(lane, head, weights)
        if w.observer is not None:
            w.observer(MergeInfo(f, head.version, w.steps_done, before, weights,
                                 {n: local[n].detach().cpu().clone() for n in lane.names}))

    # --- the lanes' global weights --------------------------------------------------------------

    def _load_all(self) -> None:
        """Every fragment's newest version into the model (at start, and after a restore)."""
        w = self.w
        heads, self.recovery = runs.heads_and_recovery(w.r, w.cfg.run, w.cfg.lanes)
        full: dict[str, torch.Tensor] = {}
        for lane, head in zip(self.lanes, heads, strict=True):
            weights = w._fetch_weights(head, {}, None)   # no base: the full object
            self._adopt(lane, head, weights)
            full.update(weights)
        w.model.load_state_dict(fragments.join(full))
        self.events = sum(h.version for h in heads)

    def _adopt(self, lane: LaneState, head: Head, weights: dict[str, torch.Tensor]) -> None:
        w = self.w
        lane.full, lane.version = weights, head.version
        lane.state = {n: t.to(w.device, torch.float32) for n, t in weights.items() if t.is_floating_point()}
        versions = [ln.version for ln in self.lanes]
        if all(v is not None for v in versions):
            w.heartbeat.update(version=min(versions), fragment_versions=",".join(map(str, versions)),
                               bytes_received=w.bytes_received, full_downloads=w.full_downloads,
                               updates_applied=w.updates_applied, update_fallbacks=w.update_fallbacks)

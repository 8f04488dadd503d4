"""The worker: adopt the run's config, train H inner steps, upload the pseudo-gradient, repeat.

One round: read the head version v, load its weights, claim the round's work units, train exactly
`sync_every` AdamW steps (each step `grad_accum` micro-batches) on their samples, compute
`delta = theta_v - theta_local` in fp32, encode and upload it as shards (create-only), announce it
on the deltas stream, then block on the versions stream until v+1 is committed. Units the commit
did not include are released. AdamW and its LR schedule persist across rounds and are never sent.

Under torchrun this class is rank 0 of the worker (the only rank that talks to Redis and the
store); the other ranks run `workers.follower.Follower` and train their shares of each batch
(workers/ranks.py, workers/inner.py).

In asynchronous mode (`mode=async`) the worker does not wait for the next version: after announcing
it waits only until a version includes its delta (or the delta is rejected), then trains from the
newest head, however many versions the others committed meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from diloco import control, dylu, keys, model, runs, schedule, units, update
from diloco.codecs import get_codec
from diloco.config import RunConfig, WorkerSettings
from diloco.connect import Outage, connect_redis
from diloco.errors import BadInput, BadShard, ConfigError, ModelMismatch, RunNotFound
from diloco.messages import Announcement
from diloco.shards import encode_delta_parts, encode_with_feedback, flat_delta, l2_norm
from diloco.store import Payload, digest_of, open_store, payload_size, put_idempotent
from workers.checkpoint import Checkpoint
from workers.heartbeat import Heartbeat
from workers.inner import InnerLoop
from workers.ranks import Ranks, RoundCommand
from workers.streaming import Streaming

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class RoundInfo:
    """What a round did, handed to an observer (tests, benchmarks) before upload."""

    version: int
    local_state: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    optimizer_steps: int
    micro_batches: int
    loss: float


class Worker:
    def __init__(self, settings: WorkerSettings, *, observer: Callable[[RoundInfo], None] | None = None,
                 ranks: Ranks | None = None):
        self.s = settings
        self.ranks = ranks or Ranks(device=settings.device)
        assert self.ranks.leader, "only rank 0 runs the Worker; the other ranks run a Follower"
        self.observer = observer
        self.stop_event = threading.Event()
        self.nonce = uuid.uuid4().hex[:12]
        self.r = connect_redis(settings.redis_url)  # unreachable now: a wrong URL, so fail at once
        self.store = open_store(settings.store_url)
        # Redis answered: from here an outage is a restart, waited out like one in the round loop.
        self.outage = Outage(settings.outage_limit_s, self.stop_event)
        self.cfg: RunConfig = self._starting("the run's config", lambda: runs.load_config(self.r, settings.run))
        settings.check_against(self.cfg)
        self.store.check()
        self.codec = self._make_codec()
        self.residual: dict[str, torch.Tensor] = {}   # error feedback: what lossy encoding did not send
        self.device = self.ranks.device
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.inner = InnerLoop(self.cfg, self.ranks)
        self.task, self.model, self.optimizer = self.inner.task, self.inner.model, self.inner.optimizer
        self._check_model()
        self.train = self.inner.train_data
        self._starting("the dataset's registration", self._check_dataset)
        self.plan = self._starting("the run's work units", lambda: units.plan_for(self.r, self.cfg))
        self.leases = units.Leases(self.r, settings.run, self.plan, settings.worker_id,
                                   lease_ms=int(self.cfg.heartbeat_timeout_s * 1000))
        self.heartbeat = Heartbeat(self.r, settings.run, settings.worker_id, self.nonce,
                                   timeout_s=self.cfg.heartbeat_timeout_s,
                                   interval_s=settings.heartbeat_interval_s, on_beat=self.leases.renew)
        self.checkpoint = Checkpoint(settings.checkpoint_dir, settings.worker_id) if settings.checkpoint_dir else None
        self.version: int | None = None       # the version whose weights the model was reset to
        self.global_state: dict[str, torch.Tensor] = {}
        # The last global weights downloaded (CPU, as committed) and their version: a version's
        # published update applies to them (diloco/update.py), even after the model trained away.
        self.global_full: dict[str, torch.Tensor] = {}
        self.global_version: int | None = None
        self.download_codec = update.download_codec(self.cfg)
        self.bytes_sent = self.bytes_received = 0
        self.full_downloads = self.updates_applied = self.update_fallbacks = 0
        self.warned_decayed = False
        self.steps_per_s: float | None = None   # the last round's measured rate (DyLU)
        # Checked: the other ranks may build the same model and data now, and join the model's group.
        self.ranks.send_config(self.cfg.to_fields())
        self.inner.distribute()
        self.followers_idle = True  # the other ranks wait for the next round (or stop) message
        self.streaming = Streaming(self) if self.cfg.is_streaming else None

    @property
    def steps_done(self) -> int:
        return self.inner.steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:  # a checkpoint restores it
        self.inner.steps_done = value

    def _starting(self, what: str, read: Callable[[], T]) -> T:
        return self.outage.call(f"Redis ({what})", read)

    def _make_codec(self):
        options = dict(self.cfg.codec_options)
        cls_options = get_codec(self.cfg.codec, options).option_types
        if "seed" in cls_options and options.get("seed") is None:
            # Stochastic rounding must differ between workers, or its errors would not average out.
            key = f"{self.cfg.seed}:{self.s.worker_id}".encode()
            options["seed"] = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
        return get_codec(self.cfg.codec, options)

    # --- checks at start --------------------------------------------------------------------

    def _check_model(self) -> None:
        local = self.model.state_dict()
        if model.model_hash(local) == self.cfg.model_hash:
            return
        diffs = model.describe_differences(runs.load_full_weights(self.store, runs.read_heads(self.r, self.cfg)), local)
        raise ModelMismatch(
            f"the local model does not match run {self.s.run!r} (model hash "
            f"{model.model_hash(local)} vs {self.cfg.model_hash}): " + "; ".join(diffs)
        )

    def _check_dataset(self) -> None:
        if self.train.dataset_id != self.cfg.dataset_id:
            raise ConfigError(
                f"the local dataset {self.train.dataset_id} is not the run's dataset "
                f"{self.cfg.dataset_id}: task data differs on this machine"
            )
        registered = self.r.hget(keys.datasets(self.s.run), self.cfg.dataset_id)
        if registered is not None and int(registered) != len(self.train):
            raise ConfigError(
                f"dataset {self.cfg.dataset_id} has {len(self.train)} samples here, but the run "
                f"registered {registered}"
            )

    # --- the loop ------------------------------------------------------------------------------

    def run(self, max_rounds: int | None = None) -> int:
        """Train rounds until stopped (or `max_rounds` announced); returns rounds announced."""
        if self.checkpoint is not None:
            self.checkpoint.load(self)
        self._starting("registering the worker", self.heartbeat.register)
        self.heartbeat.update(state="idle", version=-1, step=0, loss="", bytes_sent=0, bytes_received=0)
        self._starting("the first heartbeat", self.heartbeat.start)
        rounds, state = 0, "stopped"
        try:
            while not self._should_stop() and (max_rounds is None or rounds < max_rounds):
                try:
                    if not (self.streaming.round() if self.streaming else self._one_round()):
                        break
                    rounds += 1
                except RunNotFound as e:  # Redis was wiped: wait (within the limit) for `diloco recover`
                    self.outage.failed("the run to reappear in Redis (diloco recover)", e)
            if self.streaming is not None and not self._should_stop():
                self.streaming.finish()   # the last fragment's result, so its units are settled
        except BaseException:
            state = "failed"
            raise
        finally:
            if self.streaming is not None:
                self.stop_event.set()   # a fragment's background wait ends at once
                self.streaming.close()
            self._release_units()
            self._stop_followers()
            self.heartbeat.stop(state)
            if self.heartbeat.lost.is_set():
                raise ConfigError(self.heartbeat.lost_reason)
        return rounds

    def _one_round(self) -> bool:
        """Train, announce and wait for the next version; False if stopped during the round."""
        io = self.outage.call
        if not io("Redis", self._wait_while_paused):
            return False
        # Units first, the version after: a claim that hit an outage retries while versions move on,
        # and training on the version read before that would only produce a late delta.
        claimed = self._claim()
        if claimed is None:
            log.info("stop requested while claiming work units")
            return False
        head = io("Redis", lambda: runs.read_head(self.r, self.s.run))
        reset = io("the object store", lambda: self._sync_to(head))
        ids = self._round_samples(head.version, claimed)
        if self.ranks.distributed:
            self.followers_idle = False
            self.ranks.send_round(RoundCommand(head.version, self.steps_done, reset, ids))
            if reset:
                self.ranks.broadcast_state(self.model)
        ann = self._train_round(head.version, claimed, ids)
        if ann is None:
            log.info("stop requested; abandoning the round on version %d", head.version)
            return False
        # Async: the versions stream's end before we announce, so the commit that includes us is after it.
        since = io("Redis", self._versions_end) if self.cfg.is_async else ""
        entry_id = io("Redis", lambda: self.r.xadd(keys.deltas(self.s.run), ann.to_fields(), maxlen=100_000,
                                                   approximate=True))
        log.info("announced delta for version %d (loss %.4f, %d bytes)", ann.version, ann.loss, ann.nbytes)
        # The model now holds local weights: the next round starts from downloaded global ones, even
        # if it trains on this version again (our delta was rejected, or Redis was recovered to it).
        self.version = None
        if self.checkpoint is not None:
            self.checkpoint.save(self)
        if self.cfg.is_async:
            self.heartbeat.update(state="waiting", waiting_for=f"the commit of our delta on version {head.version}")
            rejected = io("Redis", lambda: self._wait_for_commit(head.version, entry_id, since))
        else:
            self.heartbeat.update(state="waiting", waiting_for=f"version {head.version + 1}")
            rejected = io("Redis", lambda: self._wait_for_version_after(head.version, entry_id))
        self.heartbeat.update(waiting_for="")
        if rejected is not None:
            log.warning("the aggregator rejected our delta for version %d (%s); training again", head.version,
                        rejected)
            self.heartbeat.update(last_rejection=f"v{head.version}: {rejected}"[:300])
        # Units the new version did not commit (our delta was dropped) go back to the pool.
        if released := io("Redis", self.leases.release):
            log.warning("%d work units of version %d were not committed; released", released, head.version)
        return True

    def _wait_while_paused(self) -> bool:
        """Operator control, read at the start of each round: False once the run is stopped."""
        said = False
        while not self._should_stop():
            st = control.state(self.r, self.s.run)
            if st == control.STOPPED:
                log.info("run %s is stopped (%s); exiting", self.s.run, self.r.hget(keys.control(self.s.run), "reason"))
                return False
            if st != control.PAUSED:
                return True
            if not said:  # once: only an operator ends this wait
                said = True
                log.info("run %s is paused; waiting for `diloco control --run %s resume`", self.s.run, self.s.run)
            self.heartbeat.update(state="paused")
            self.stop_event.wait(self.s.block_ms / 1000)
        return False

    def stop(self) -> None:
        self.stop_event.set()

    def _stop_followers(self) -> None:
        """Tell the other ranks to exit, if they wait for a message (not in a step: they left or will fail)."""
        if not self.ranks.distributed or not self.followers_idle:
            return
        try:
            self.ranks.send_round(None)
        except Exception as e:  # a rank already gone; torchrun stops the rest
            log.warning("could not tell the other ranks to stop: %s", e)

    def _release_units(self) -> None:
        try:
            self.leases.release()
        except Exception as e:  # leases end by themselves; never mask the real exit reason
            log.warning("could not release work units: %s", e)

    def _should_stop(self) -> bool:
        return self.stop_event.is_set() or self.heartbeat.lost.is_set()

    def _sync_to(self, head) -> bool:
        """Reset the model to the global weights of `head` (cached by version): by applying its
        published update to the version before when we hold that one, else from the full weights.
        True if it loaded new weights (the other ranks then need them)."""
        if self.version == head.version:
            return False
        weights = self._fetch_weights(head, self.global_full, self.global_version)
        self.model.load_state_dict(weights)
        self.global_full, self.global_version = weights, head.version
        # On a CPU fp32 model these are the same tensors as global_full (no copy).
        self.global_state = {n: t.to(self.device, torch.float32) for n, t in weights.items()
                             if t.is_floating_point()}
        self.version = head.version
        self.heartbeat.update(version=head.version, bytes_received=self.bytes_received,
                              full_downloads=self.full_downloads, updates_applied=self.updates_applied,
                              update_fallbacks=self.update_fallbacks)
        return True

    def _fetch_weights(self, head, base: dict[str, torch.Tensor], base_version: int | None) -> dict[str, torch.Tensor]:
        """The weights of `head` (the run's, or a fragment's): `base` (version `base_version`) plus the
        published update when it is the version before, else (or if the update is unusable) the full
        object. Counted in the bytes_received and full_downloads stats."""
        if head.update and base_version == head.version - 1 and self.download_codec is not None:
            weights = self._apply_update(head, base, base_version)
            if weights is not None:
                return weights
        weights, nbytes = runs.load_weights_counted(self.store, head, views=True)   # only read
        self.bytes_received += nbytes
        self.full_downloads += 1
        return weights

    def _apply_update(self, head, base: dict[str, torch.Tensor], base_version: int) -> dict[str, torch.Tensor] | None:
        """Version `head`'s weights from `base` (version `base_version`, the one before) and its update,
        checked to hash as its weights object; None (logged and counted in the `update_fallbacks` stat)
        if the update is unusable."""
        try:
            shards = update.fetch(self.store, head.update, head.update_digest, self.cfg.shard_bytes)
            weights = update.apply(base, update.decode(shards, base, self.download_codec))
            parts = model.to_parts(weights, run=self.s.run, version=str(head.version))
            if digest_of(parts, like=head.weights_digest) != head.weights_digest:
                raise BadShard(f"applied to version {base_version}, it does not give the bytes of "
                               f"{head.weights}")
        except BadInput as e:  # missing, corrupt, truncated or not ours: the full weights are the truth
            self.update_fallbacks += 1
            log.warning("the update to version %d is unusable (%s: %s); downloading the full weights",
                        head.version, type(e).__name__, e)
            return None
        self.bytes_received += sum(len(s) for s in shards)
        self.updates_applied += 1
        return weights

    def _round_samples(self, version: int, claimed: list[units.Unit]) -> list[int]:
        """The round's sample ids: its units' samples, shuffled with a seed of (run, worker, version)."""
        ids = [i for u in claimed for i in self.plan.samples(u)]
        key = f"{self.cfg.seed}:{self.s.worker_id}:{version}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        return [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]

    def _claim(self) -> list[units.Unit] | None:
        self.heartbeat.update(state="claiming")
        want = units.units_per_round(self.cfg, self._inner_steps())
        return self.outage.call("Redis", lambda: self.leases.claim(want, self.stop_event))

    def _inner_steps(self) -> int:
        """This round's H: sync_every, or with DyLU from the live workers' measured speeds (published as
        the stat `inner_steps`)."""
        if not self.cfg.dylu:
            return self.cfg.sync_every
        rates = self.outage.call("Redis", lambda: dylu.speeds(self.r, self.s.run))
        rates.pop(self.s.worker_id, None)   # ours as measured here: the stat in Redis lags by a heartbeat
        h = dylu.inner_steps(self.cfg, self.steps_per_s, list(rates.values()))
        self.heartbeat.update(inner_steps=h)
        return h

    def _train_round(self, version: int, claimed: list[units.Unit], ids: list[int]) -> Announcement | None:
        if self.cfg.cooldown_to and version >= self.cfg.cooldown_to and not self.warned_decayed:
            self.warned_decayed = True  # once: every later round would repeat it
            log.warning("run %r is at version %d, past cooldown_to %d: the inner lr is 0, so rounds no "
                        "longer train the parameters; stop the run or start a new one",
                        self.s.run, version, self.cfg.cooldown_to)
        self.heartbeat.update(state="training")

        def on_step(step: int, loss: float, lr: float, elapsed: float) -> None:
            self.heartbeat.update(step=self.steps_done, loss=f"{loss:.4f}",
                                  steps_per_s=f"{(step + 1) / elapsed:.2f}", lr=f"{lr:.3g}")

        done = self.inner.train(version, ids, self._should_stop, on_step)
        if done is None:  # every rank stopped at the same step
            return None
        self.followers_idle = True
        if done.train_s > 0:
            self.steps_per_s = done.micro_batches / self.cfg.grad_accum / done.train_s
        local = self.model.state_dict()
        delta = flat_delta(self.global_state, local)
        mean_loss = sum(done.losses) / len(done.losses)
        if self.observer is not None:
            self.observer(RoundInfo(version, model.state_to_cpu(self.model), delta, self.optimizer,
                                    done.micro_batches // self.cfg.grad_accum, done.micro_batches, mean_loss))
        return self._upload(version, delta, mean_loss, done.train_s, done.micro_batches, claimed)

    def _upload(self, version: int, delta: dict[str, torch.Tensor], loss: float, train_s: float,
                micro_batches: int, claimed: list[units.Unit], *, lane: str | None = None,
                fragment: int = 0, outage: Outage | None = None) -> Announcement:
        if lane is None:   # a streaming worker uploads in the background while it trains
            self.heartbeat.update(state="uploading")
        shards, norm = self._encode_with_feedback(delta, version)
        # A fresh upload id per round: after a Redis restore the same session may train the same
        # version again, and immutable keys must not collide with what it uploaded before.
        upload = f"{self.nonce}-{uuid.uuid4().hex[:8]}"
        names = [keys.delta_shard(lane or self.s.run, version, self.s.worker_id, upload, i)
                 for i in range(len(shards))]
        def put(key: str, data: Payload) -> str:
            # Not durable: shards are read with their digest checked, and a torn one only costs a retrain.
            return (outage or self.outage).call("the object store",
                                                lambda: put_idempotent(self.store, key, data, durable=False))

        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            shas = list(pool.map(put, names, shards))
        sizes = tuple(payload_size(s) for s in shards)
        self.bytes_sent += sum(sizes)
        self.heartbeat.update(bytes_sent=self.bytes_sent)
        samples = micro_batches * self.cfg.batch_size
        return Announcement(
            run=self.s.run, worker=self.s.worker_id, nonce=self.nonce, version=version,
            codec=self.codec.name, shards=tuple(names), sizes=sizes, digest=tuple(shas),
            samples=samples, tokens=samples * self.train.tokens_per_sample,
            inner_steps=micro_batches // self.cfg.grad_accum, loss=loss, train_s=train_s, units=tuple(claimed),
            norm=norm, fragment=fragment,
        )

    def _encode_with_feedback(self, delta: dict[str, torch.Tensor], version: int) -> tuple[list[Payload], float]:
        """Encode delta + decay * residual; keep as the new residual what the aggregator will not see.

        decay is the codec's feedback_decay times the run's cooldown factor at `version`, the round's base.
        Returns the shards and the L2 norm of what they decode to (announced, checked by the aggregator).
        """
        if self.codec.name == "fp32":
            return encode_delta_parts(delta, self.codec, self.cfg.shard_bytes), l2_norm(delta.values())
        decay = self.codec.feedback_decay * schedule.cooldown(self.cfg, version)
        shards, residual, norm = encode_with_feedback(delta, self.residual, self.codec, decay, self.cfg.shard_bytes)
        self.residual = {**self.residual, **residual}   # streaming: one fragment's delta keeps the others' residuals
        return shards, norm

    def _wait_for_version_after(self, version: int, entry_id: str, *, lane: str | None = None,
                                recovery: str | None = None) -> str | None:
        """Block on the versions stream until the head moves past `version` (or stop).

        Also returns, to train again, when our announcement was rejected (returns the reason), when
        the head went back (Redis restored from a snapshot) or our announcement vanished (Redis wiped
        and recovered to this very version). A wait that only an operator can end (no aggregator
        holds the lock) is logged once and shown in the worker's `waiting_for` stat. `lane`: a fragment's
        (streaming), waited on in the background; `recovery`: the recovery id its fragments were loaded
        under (runs.heads_and_recovery), to return as soon as a `diloco recover` replaces it.
        """
        lane = lane or self.s.run
        stream = keys.versions(lane)
        last, alone = None, False
        while not self._should_stop():
            # One atomic round trip per wake-up: the stream's end, the head, the run state, our entry.
            pipe = self.r.pipeline(transaction=True)
            pipe.xrevrange(stream, count=1)
            pipe.hgetall(keys.head(lane))
            pipe.hget(keys.control(self.s.run), "state")
            pipe.xrange(keys.deltas(lane), entry_id, entry_id)
            pipe.sismember(keys.rejected_entries(lane), entry_id)
            pipe.exists(keys.lock(lane))
            pipe.get(keys.recovered(self.s.run))
            newest, head, state, ours, rejected, locked, recovered = pipe.execute()
            if rejected:  # first: the round may have committed without us since
                return self._rejection_reason(entry_id, lane)
            # RunNotFound (Redis wiped) goes to the caller, which waits for a recovery
            if runs.parse_head(lane, head).version != version or state == control.STOPPED or not ours:
                return None
            if recovery is not None and (recovered or "") != recovery:
                return None
            if alone != (not locked) and lane == self.s.run:
                alone = not locked
                why = " (no aggregator holds the lock: start one)" if alone else ""
                self.heartbeat.update(waiting_for=f"version {version + 1}{why}")
                if alone:
                    log.warning("waiting for version %d, but no aggregator holds the round lock: nothing is "
                                "committed until one starts", version + 1)
            # The stream's end was read with the head, so a later commit lands past `last`: none is missed.
            if last is None:
                last = newest[0][0] if newest else "0-0"
            reply = self.r.xread({stream: last}, block=self.s.block_ms, count=100)
            for _, entries in reply or []:
                last = entries[-1][0]
        return None

    def _versions_end(self) -> str:
        newest = self.r.xrevrange(keys.versions(self.s.run), count=1)
        return newest[0][0] if newest else "0-0"

    def _wait_for_commit(self, version: int, entry_id: str, since: str) -> str | None:
        """Async mode: block on the versions stream (from `since`, its end before we announced) until a
        version lists our entry (None) or our entry is rejected (the reason).

        Also returns, to train again, when the head went back below `version` (Redis restored from a
        snapshot), our announcement vanished (Redis wiped) or the run was stopped."""
        stream, last = keys.versions(self.s.run), since
        while not self._should_stop():
            pipe = self.r.pipeline(transaction=True)
            pipe.hgetall(keys.head(self.s.run))
            pipe.hget(keys.control(self.s.run), "state")
            pipe.xrange(keys.deltas(self.s.run), entry_id, entry_id)
            pipe.sismember(keys.rejected_entries(self.s.run), entry_id)
            head, state, ours, rejected = pipe.execute()
            if rejected:
                return self._rejection_reason(entry_id, self.s.run)
            if runs.parse_head(self.s.run, head).version < version or state == control.STOPPED or not ours:
                return None
            # From `last`, not the end: a version committed since the checks above is still read here.
            reply = self.r.xread({stream: last}, block=self.s.block_ms, count=100)
            for _, entries in reply or []:
                for version_id, fields in entries:
                    last = version_id
                    if entry_id in fields.get("entries", "").split(","):
                        return None
        return None

    def _rejection_reason(self, entry_id: str, lane: str) -> str:
        """The reason the aggregator gave for rejecting our entry (the newest rejections are searched)."""
        for _, fields in self.r.xrevrange(keys.rejections(lane), count=1000):
            if fields.get("entry") == entry_id:
                return fields.get("reason", "?")
        return "rejected (reason no longer in the rejections stream)"


def default_worker_id() -> str:
    import socket

    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:48]
    return host or f"worker-{os.getpid()}"

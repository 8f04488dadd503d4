"""Exceptions of diloco.

User mistakes (bad flags, a run that does not exist, a model that does not match the run) are
`ConfigError`s with a message that says what to do; the CLI prints them without a traceback.
Faults of other processes' data are `BadInput` subclasses: the services reject the input, record
the reason where an operator can see it, and keep running.
"""

from __future__ import annotations


class DilocoError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(DilocoError, ValueError):
    """A setting, flag or environment value is wrong; the message says which and how to fix it."""


class RunNotFound(ConfigError):
    """The run has no config in Redis (never initialised, or Redis was wiped)."""


class ModelMismatch(ConfigError):
    """The local model's parameters differ from the run's."""


class DuplicateWorker(ConfigError):
    """Another live worker already uses this worker id."""


class Unreachable(DilocoError):
    """Redis or the object store cannot be reached; the message names the URL."""


class RankFailed(DilocoError):
    """Another rank of this worker (torchrun) died or failed: the worker stops as a whole."""


class LockLost(DilocoError):
    """The aggregator's fencing token is no longer the lock holder; its round must not commit."""


class UnitConflict(DilocoError):
    """A delta trained on a unit its worker no longer leases (or one already done): it cannot commit."""

    def __init__(self, worker: str, reason: str) -> None:
        super().__init__(f"worker {worker}: {reason}")
        self.worker = worker
        self.reason = reason


class BadInput(DilocoError):
    """Data written by another process is malformed; it is rejected, never trusted."""


class ObjectMissing(BadInput):
    """The object store has no object under the key."""


class ObjectExists(DilocoError):
    """A create-only write found the key already taken (immutable objects are never overwritten)."""


class ChecksumMismatch(BadInput):
    """An object's digest differs from the one recorded for it."""


class ObjectTooLarge(BadInput):
    """An object is larger than the limit the reader allows for it."""


class BadMessage(BadInput):
    """A stream entry lacks a field or has an ill-typed one."""


class BadShard(BadInput):
    """A delta shard cannot be decoded or does not match the model."""

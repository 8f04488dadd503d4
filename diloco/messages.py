"""Stream messages: one small class per kind, with `to_fields()` and a validating `from_fields()`.

Values are plain strings so `redis-cli XRANGE` reads well. Entries come from other processes, so
parsing trusts nothing: a missing or ill-typed field raises `BadMessage` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from diloco import digest, keys
from diloco.errors import BadMessage

MAX_SHARDS = 4096


class Kind(StrEnum):
    DELTA = "delta"


def _get(fields: dict[str, str], name: str) -> str:
    try:
        value = fields[name]
    except KeyError:
        raise BadMessage(f"field {name!r} is missing") from None
    if not isinstance(value, str):
        raise BadMessage(f"field {name!r} is not a string")
    return value


def _int(fields: dict[str, str], name: str, lo: int = 0) -> int:
    raw = _get(fields, name)
    try:
        value = int(raw)
    except ValueError:
        raise BadMessage(f"field {name!r} is not an integer: {raw[:40]!r}") from None
    if value < lo:
        raise BadMessage(f"field {name!r} must be >= {lo}, got {value}")
    return value


def _float(fields: dict[str, str], name: str) -> float:
    raw = _get(fields, name)
    try:
        value = float(raw)
    except ValueError:
        raise BadMessage(f"field {name!r} is not a number: {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise BadMessage(f"field {name!r} is not finite: {raw!r}")
    return value


def _list(fields: dict[str, str], name: str) -> list[str]:
    raw = _get(fields, name)
    return raw.split(",") if raw else []


def _units(fields: dict[str, str]) -> tuple[tuple[int, int], ...]:
    out = []
    for item in _list(fields, "units") if fields.get("units") else []:
        epoch, sep, bit = item.partition(":")
        if not (sep and epoch.isdigit() and bit.isdigit() and len(item) <= 24):
            raise BadMessage(f"field 'units' holds {item[:40]!r}, not 'epoch:bit'")
        out.append((int(epoch), int(bit)))
    if len(set(out)) != len(out):
        raise BadMessage("field 'units' lists a unit twice")
    return tuple(out)


@dataclass(frozen=True)
class Announcement:
    """A worker's pseudo-gradient for one base version, uploaded as shards."""

    run: str
    worker: str
    nonce: str                  # the worker session; tells two sessions with one id apart
    version: int                # the base version the worker trained from
    codec: str
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    digest: tuple[str, ...]     # each shard's (diloco/digest.py)
    samples: int
    tokens: int
    inner_steps: int
    loss: float
    train_s: float = 0.0
    norm: float = 0.0           # L2 norm of the delta as encoded (what the aggregator decodes)
    fragment: int = 0
    kind: Kind = Kind.DELTA
    units: tuple[tuple[int, int], ...] = field(default=())   # (epoch, bit) of each unit trained on

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def to_fields(self) -> dict[str, str]:
        return {
            "kind": self.kind.value, "run": self.run, "worker": self.worker, "nonce": self.nonce,
            "version": str(self.version), "fragment": str(self.fragment), "codec": self.codec,
            "shards": ",".join(self.shards), "sizes": ",".join(map(str, self.sizes)),
            "digest": ",".join(self.digest), "samples": str(self.samples), "tokens": str(self.tokens),
            "inner_steps": str(self.inner_steps), "loss": repr(self.loss),
            "train_s": f"{self.train_s:.3f}", "norm": repr(self.norm),
            "units": ",".join(f"{e}:{b}" for e, b in self.units),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Announcement:
        kind = _get(fields, "kind")
        if kind != Kind.DELTA.value:
            raise BadMessage(f"unknown kind {kind[:40]!r}")
        try:
            run = keys.check_name("run name", _get(fields, "run"))
            worker = keys.check_name("worker id", _get(fields, "worker"))
            nonce = keys.check_name("nonce", _get(fields, "nonce"))
        except ValueError as e:
            raise BadMessage(str(e)) from None
        shards, sizes = _list(fields, "shards"), _list(fields, "sizes")
        sums = _list(fields, legacy_name(fields, "digest", "sha256"))
        if not shards:
            raise BadMessage("announcement lists no shards")
        if len(shards) > MAX_SHARDS:
            raise BadMessage(f"announcement lists {len(shards)} shards, more than {MAX_SHARDS}")
        if not len(shards) == len(sizes) == len(sums):
            raise BadMessage("shards, sizes and digest have different lengths")
        try:
            size_values = tuple(int(s) for s in sizes)
        except ValueError:
            raise BadMessage("field 'sizes' holds a non-integer") from None
        if any(s < 0 for s in size_values):
            raise BadMessage("field 'sizes' holds a negative size")
        if not all(digest.valid(h) for h in sums):
            raise BadMessage("field 'digest' holds a value that is not 'blake3:' and 64 lowercase hex digits")
        units = _units(fields)
        return cls(
            run=run, worker=worker, nonce=nonce, version=_int(fields, "version"),
            codec=_get(fields, "codec"), shards=tuple(shards), sizes=size_values, digest=tuple(sums),
            samples=_int(fields, "samples"), tokens=_int(fields, "tokens"),
            inner_steps=_int(fields, "inner_steps", lo=1), loss=_float(fields, "loss"),
            train_s=_float(fields, "train_s") if "train_s" in fields else 0.0,
            norm=_float(fields, "norm") if "norm" in fields else 0.0,
            fragment=_int(fields, "fragment") if "fragment" in fields else 0, units=units,
        )


@dataclass(frozen=True)
class Head:
    """The committed version pointer (the `head` hash) and the objects it points at."""

    version: int
    weights: str
    weights_digest: str
    momentum: str
    momentum_digest: str
    token: int
    committed_ms: int
    deltas_since: str
    # The encoded update from the version before (diloco/update.py): its shards and their digests;
    # empty when the run downloads full weights only, and at version 0.
    update: tuple[str, ...] = ()
    update_digest: tuple[str, ...] = ()

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Head:
        names = ("update", legacy_name(fields, "update_digest", "update_sha256"))
        update, update_sums = (tuple(_list(fields, f)) if fields.get(f) else () for f in names)
        if len(update) != len(update_sums):
            raise BadMessage(f"head lists {len(update)} update shards but {len(update_sums)} digests")
        return cls(
            version=_int(fields, "version"), weights=_get(fields, "weights"),
            weights_digest=recorded_digest(fields, "weights"), momentum=_get(fields, "momentum"),
            momentum_digest=recorded_digest(fields, "momentum"), token=_int(fields, "token"),
            committed_ms=_int(fields, "committed_ms"), deltas_since=_get(fields, "deltas_since"),
            update=update, update_digest=update_sums,
        )


def legacy_name(fields: dict[str, str], name: str, legacy: str) -> str:
    """`name`, or `legacy` where a record written before BLAKE3 digests (diloco/digest.py) has only that."""
    return legacy if name not in fields and legacy in fields else name


def recorded_digest(fields: dict[str, str], obj: str) -> str:
    """The digest a head or versions entry records for its object `obj` ("weights", "momentum"):
    field `<obj>_digest`, or `<obj>_sha256` in a record written before BLAKE3 digests."""
    return _get(fields, legacy_name(fields, f"{obj}_digest", f"{obj}_sha256"))

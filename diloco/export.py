"""`diloco export`: a committed version's weights as a plain safetensors file, to use outside diloco.

The file holds the model's full state dict (parameters and buffers), so

    from safetensors.torch import load_file
    model.load_state_dict(load_file("model.safetensors"))

loads it into the task's model. Its one metadata key, `diloco`, holds JSON naming the run, the
version, the task and its resolved options and the model hash: `load_task(task, task_options)
.build_model()` builds that model, and `load_model(path)` here does both steps. (One key, because
safetensors writes several metadata keys in random order and the file would not be reproducible.)

The weights are read with the checksum the run recorded for them. Version 0's checksum is only
recorded while it is the head; later, its file is checked against the run's model hash and the
header init wrote instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from diloco import keys, model, runs
from diloco.config import RunConfig
from diloco.errors import BadInput, ConfigError, ObjectMissing
from diloco.messages import recorded_digest
from diloco.store import ObjectStore
from diloco.tasks import load_task

EXPORT_FORMAT = "diloco-export/1"
META_KEY = "diloco"
_PAGE = 256


@dataclass(frozen=True)
class Source:
    """Where a committed version's weights are, and their recorded checksum (None: not recorded)."""

    version: int
    weights: str
    digest: str | None
    committed_ms: int | None


@dataclass(frozen=True)
class Exported:
    path: Path
    version: int
    nbytes: int
    sha256: str          # of the exported file
    metadata: dict[str, Any]


def locate(r: redis.Redis, run: str, version: int | None = None) -> Source:
    """The weights object of `version` (default: the head) of `run`; ConfigError if there is none."""
    head = runs.read_head(r, run)
    if version is None or version == head.version:
        return Source(head.version, head.weights, head.weights_digest, head.committed_ms)
    if version < 0 or version > head.version:
        raise ConfigError(f"run {run!r} has no version {version}: its versions are 0 to {head.version}")
    if version == 0:
        return Source(0, keys.weights_object(run, 0, 0), None, None)
    oldest = None
    for fields in _newest_first(r, keys.versions(run)):
        try:
            v = int(fields["version"])
        except (KeyError, ValueError):
            continue
        if v < version:
            break
        oldest = v
        if v == version:
            return Source(v, fields["weights"], recorded_digest(fields, "weights"), int(fields["committed_ms"]))
    held = f"it holds versions {oldest} to {head.version}" if oldest is not None else "it holds none"
    raise ConfigError(f"version {version} of run {run!r} is not in the versions stream ({held}, "
                      "e.g. after `diloco recover`), so its weights cannot be found and verified")


def _newest_first(r: redis.Redis, stream: str) -> Iterator[dict[str, str]]:
    """The stream's entries newest first, a page at a time (recent versions are the usual ask)."""
    last = "+"
    while True:
        page = r.xrevrange(stream, max=last, min="-", count=_PAGE)
        entries = page if last == "+" else page[1:]   # a later page starts with the last one seen
        for entry_id, fields in entries:
            last = entry_id
            yield fields
        if len(page) < _PAGE:
            return


def read_weights(store: ObjectStore, cfg: RunConfig, src: Source) -> dict[str, torch.Tensor]:
    """The version's state dict, checked against its recorded digest (or, for v0, the run's model)."""
    try:
        data = store.get(src.weights, digest=src.digest)
    except ObjectMissing:
        have = _versions_with_weights(store, cfg.run)
        raise ConfigError(
            f"the weights of version {src.version} of run {cfg.run!r} ({src.weights}) are no longer in "
            f"{store.url}: retention keeps only some versions (keep_last {cfg.keep_last}, keep_every "
            f"{cfg.keep_every}, see `diloco gc`). Versions with weights: {_ranges(have) or 'none'}"
        ) from None
    what = f"weights {src.weights}"
    if src.digest is None:  # v0 after the head moved on: check what init wrote instead
        _check_init_header(data, cfg.run, what)
    state = model.from_bytes(data, what)
    if model.model_hash(state) != cfg.model_hash:
        raise BadInput(f"{what} has model hash {model.model_hash(state)}, but run {cfg.run!r} has "
                       f"{cfg.model_hash}")
    return state


def export(r: redis.Redis, store: ObjectStore, run: str, out: str | os.PathLike, *, version: int | None = None,
           force: bool = False) -> Exported:
    """Write the weights of `version` (default: the head) of `run` to `out` as plain safetensors."""
    cfg = runs.load_config(r, run)
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; name the file to write, e.g. {path / 'model.safetensors'}")
    if path.exists() and not force:  # before any download; checked again when the file is linked
        raise ConfigError(f"{path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    state, meta = run_weights(r, store, cfg, version)
    meta = {"format": EXPORT_FORMAT, "run": run, "task": cfg.task, "task_options": cfg.task_options,
            "model_hash": cfg.model_hash, "seed": cfg.seed, **meta}
    data = st_save(state, metadata={META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    _write(path, data, force=force)
    return Exported(path, meta["version"], len(data), hashlib.sha256(data).hexdigest(), meta)


def run_weights(r: redis.Redis, store: ObjectStore, cfg: RunConfig,
                version: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run's state dict at `version` (default: the head; with fragments, each fragment's newest),
    checked, and what it is (version, committed_ms, source keys and digests)."""
    if cfg.is_streaming:
        return _streaming_state(r, store, cfg, version)
    src = locate(r, cfg.run, version)
    return read_weights(store, cfg, src), {"version": src.version, "committed_ms": src.committed_ms,
                                           "source": src.weights, "source_digest": src.digest}


def _streaming_state(r: redis.Redis, store: ObjectStore, cfg: RunConfig,
                     version: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A streaming run's whole model: every fragment at its newest committed version, read from heads
    taken in one transaction (a consistent cut: each fragment's weights are a committed version)."""
    if version is not None:
        raise ConfigError(f"run {cfg.run!r} syncs in {cfg.num_fragments} fragments, each with its own versions: "
                          "export takes each fragment's newest version; leave --version out")
    heads = runs.read_heads(r, cfg)
    state = runs.load_full_weights(store, heads)   # heads: never deleted by retention
    if model.model_hash(state) != cfg.model_hash:
        raise BadInput(f"the fragments' weights join into model hash {model.model_hash(state)}, but run "
                       f"{cfg.run!r} has {cfg.model_hash}")
    return state, {"version": min(h.version for h in heads), "fragment_versions": [h.version for h in heads],
                   "committed_ms": max(h.committed_ms for h in heads), "source": [h.weights for h in heads],
                   "source_digest": [h.weights_digest for h in heads]}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `diloco` metadata of an exported file; ConfigError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ConfigError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path} is not a diloco export (no {EXPORT_FORMAT} metadata under {META_KEY!r})")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exported model from its metadata and load the weights: (model, metadata)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    net = load_task(meta["task"], meta["task_options"]).build_model()
    net.load_state_dict(load_file(str(path), device=str(device)))
    return net.to(device), meta


def _check_init_header(data: bytes, run: str, what: str) -> None:
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"]["diloco"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{what} has no diloco weights header: {e}") from None
    if meta != {"format": model.WEIGHTS_FORMAT, "run": run, "version": "0"}:
        raise BadInput(f"{what} is not run {run!r}'s version 0: its header says {meta}")


def _write(path: Path, data: bytes, *, force: bool) -> None:
    """Write through a temp file, so `path` is never seen half written; without force, never replace."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # create-only: fails if another process made `path` meanwhile
        except FileExistsError:
            raise ConfigError(f"{path} exists; pass --force to replace it") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if path.exists():  # a file system without hard links: best-effort create-only
                raise ConfigError(f"{path} exists; pass --force to replace it") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _versions_with_weights(store: ObjectStore, run: str) -> list[int]:
    out = set()
    for key in store.list(keys.weights_prefix(run)):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("v") and name[1:9].isdigit():
            out.add(int(name[1:9]))
    return sorted(out)


def _ranges(versions: list[int]) -> str:
    """'0, 4, 6-8' for [0, 4, 6, 7, 8]."""
    parts: list[str] = []
    start = prev = None
    for v in [*versions, None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)

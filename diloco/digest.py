"""Object digests: the checksum recorded with every object a process writes, checked by every reader.

A digest is ``blake3:<64 hex digits>``. Every byte a round moves is hashed twice, by its writer and
by each reader (1.4 GB a round on the sync benchmark at W=4), and on this project's machines BLAKE3
hashes 5.5 GB/s on one core against sha256's 1.3 GB/s: with sha256 the hash was most of a round's CPU
(docs/benchmarks.md, "Sync round"). BLAKE3 is a cryptographic hash, so a digest held in Redis still
pins an object's bytes against a store that other processes can write.

A bare 64-hex-digit digest is sha256: the form of every record written before BLAKE3 (fields named
``sha256``, ``weights_sha256``, ...). Such records are still read and checked with sha256, so a run
started before keeps going; nothing writes them any more.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import blake3

PREFIX = "blake3:"
PATTERN = re.compile(r"(?:blake3:)?[0-9a-f]{64}")

Buffer = bytes | bytearray | memoryview


class Hasher:
    """An incremental digest in the form of `like` (a recorded digest; BLAKE3 when None)."""

    def __init__(self, like: str | None = None) -> None:
        self.legacy = like is not None and not like.lower().startswith(PREFIX)
        self._h = hashlib.sha256() if self.legacy else blake3.blake3()

    def update(self, data: Buffer) -> None:
        # blake3 takes only byte buffers; a tensor's memory (stbytes.parts) is typed, so view it as bytes
        self._h.update(memoryview(data).cast("B"))

    def value(self) -> str:
        hexdigest = self._h.hexdigest()
        return hexdigest if self.legacy else PREFIX + hexdigest


def of(data: Buffer | Iterable[Buffer], like: str | None = None) -> str:
    """The digest of `data` (bytes, or pieces laid end to end), in the form of `like`."""
    h = Hasher(like)
    for piece in [data] if isinstance(data, Buffer) else data:
        h.update(piece)
    return h.value()


def same_form(a: str, b: str) -> bool:
    """Whether the digests `a` and `b` were taken with the same hash (so they can be compared)."""
    return a.startswith(PREFIX) == b.startswith(PREFIX)


def valid(value: str) -> bool:
    return PATTERN.fullmatch(value) is not None

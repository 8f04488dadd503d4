"""Direct I/O (O_DIRECT) for the file store's large objects: bytes go between the process and the
disk without passing through the page cache.

Why: on this project's machines (ext4 on a virtual disk) a buffered write of a new 100 MB file costs
0.45-0.65 s of kernel time, almost all of it the page cache taking on new pages, while the same
bytes written with O_DIRECT take 0.07 s and read back with O_DIRECT cost the CPU of a read from the
cache (docs/benchmarks.md, "Sync round"). A round writes W deltas and a weights and a momentum object
of the model's size, all new files, so buffered writes were a third of the round's CPU.

O_DIRECT wants the memory address, the file offset and the length of every transfer aligned to the
device's logical block; `ALIGN` (4096) covers every common device. Bytes therefore move through one
aligned staging buffer per thread, reused for the process' life (so its pages stay resident), and a
file's last partial block is padded and then cut back with ftruncate. A file system that refuses
O_DIRECT (tmpfs before Linux 6.6, some FUSE and network mounts) raises EINVAL: callers fall back to
buffered I/O (`Unsupported`).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterable

ALIGN = 4096
CHUNK = 2 << 20          # one staging buffer: as fast as larger ones, and in the cache while hashed
MIN_BYTES = 1 << 20      # smaller objects go buffered: a padded block and two syscalls cost more than they save
FLAG = getattr(os, "O_DIRECT", 0)   # 0 where the platform has none (macOS): never used there

_local = threading.local()


class Unsupported(OSError):
    """The file system refused O_DIRECT (or its alignment): use buffered I/O for this store."""


def _staging() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        _local.map = mmap.mmap(-1, CHUNK)   # anonymous mappings are page-aligned
        buf = _local.buf = memoryview(_local.map)
    return buf


def _refused(e: OSError) -> bool:
    return e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def open_for_write(path: os.PathLike | str) -> int:
    """Create `path` (exclusive) for direct writes; Unsupported where the file system refuses."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FLAG, 0o644)
    except OSError as e:
        if _refused(e):
            raise Unsupported(e.errno, f"O_DIRECT refused: {e.strerror}") from None
        raise


def write(fd: int, pieces: Iterable[memoryview]) -> str:
    """Write the pieces end to end to `fd` (opened with O_DIRECT) and return their sha256 hex.

    Each staging chunk is hashed while it is in the cache, then written; the last one is padded to
    `ALIGN` and the file cut back to the true size."""
    h, buf = hashlib.sha256(), _staging()
    fill = total = 0
    for view in pieces:
        at = 0
        while at < len(view):
            take = min(len(view) - at, CHUNK - fill)
            buf[fill:fill + take] = view[at:at + take]
            fill, at, total = fill + take, at + take, total + take
            if fill == CHUNK:
                _emit(fd, buf, fill, h)
                fill = 0
    if fill:
        _emit(fd, buf, fill, h)
    if total % ALIGN:
        os.ftruncate(fd, total)
    return h.hexdigest()


def _emit(fd: int, buf: memoryview, n: int, h) -> None:
    h.update(buf[:n])
    padded = -(-n // ALIGN) * ALIGN
    buf[n:padded] = bytes(padded - n)
    done = 0
    try:
        while done < padded:
            done += os.write(fd, buf[done:padded])
    except OSError as e:
        if _refused(e):
            raise Unsupported(e.errno, f"O_DIRECT write refused: {e.strerror}") from None
        raise


def read(path: os.PathLike | str, size: int) -> bytearray:
    """The first `size` bytes of `path`, read with O_DIRECT; Unsupported where refused.

    A short file (cut while read) returns what it holds; the caller's size and checksum checks judge it."""
    try:
        fd = os.open(path, os.O_RDONLY | FLAG)
    except OSError as e:
        if _refused(e):
            raise Unsupported(e.errno, f"O_DIRECT refused: {e.strerror}") from None
        raise
    out, buf, at = bytearray(size), _staging(), 0
    try:
        while at < size:
            want = min(CHUNK, -(-(size - at) // ALIGN) * ALIGN)
            try:
                got = os.preadv(fd, [buf[:want]], at)
            except OSError as e:
                if _refused(e):
                    raise Unsupported(e.errno, f"O_DIRECT read refused: {e.strerror}") from None
                raise
            got = min(got, size - at)
            if got <= 0:
                del out[at:]
                break
            out[at:at + got] = buf[:got]
            at += got
    finally:
        os.close(fd)
    return out

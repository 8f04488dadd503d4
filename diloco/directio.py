"""Direct I/O (O_DIRECT) for the file store's large objects: bytes go between the process and the
disk without passing through the page cache.

Why: on this project's machines (ext4 on a virtual disk) a buffered write of a new 100 MB file costs
0.45-0.65 s of kernel time, almost all of it the page cache taking on new pages, while the same
bytes written with O_DIRECT take 0.07 s and read back with O_DIRECT cost the CPU of a read from the
cache (docs/benchmarks.md, "Sync round"). A round writes W deltas and a weights and a momentum object
of the model's size, all new files, so buffered writes were a third of the round's CPU.

O_DIRECT wants the memory address, the file offset and the length of every transfer aligned to the
device's logical block; `ALIGN` (4096) covers every common device. Bytes therefore move through two
aligned staging buffers per thread, reused for the process' life (so their pages stay resident): the
disk works on one while the other is copied and hashed, so hashing (diloco/digest.py)
overlaps the transfer. A file's last partial block is padded and then cut back with ftruncate. A file
system that refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE and network mounts) raises EINVAL:
callers fall back to buffered I/O (`Unsupported`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from diloco.digest import Hasher

ALIGN = 4096
CHUNK = 1 << 20          # one staging buffer: as fast as larger ones, and in the cache while hashed
MIN_BYTES = 1 << 20      # smaller objects go buffered: a padded block and two syscalls cost more than they save
FLAG = getattr(os, "O_DIRECT", 0)   # 0 where the platform has none (macOS): never used there

_local = threading.local()


class Unsupported(OSError):
    """The file system refused O_DIRECT (or its alignment): use buffered I/O for this store."""


def _staging() -> tuple[memoryview, memoryview]:
    """Two staging buffers of this thread: the disk works on one while the other is hashed."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        _local.map = mmap.mmap(-1, 2 * CHUNK)   # anonymous mappings are page-aligned
        view = memoryview(_local.map)
        bufs = _local.bufs = (view[:CHUNK], view[CHUNK:])
    return bufs


class _Relay:
    """This thread's two staging buffers and one helper thread: the helper works on one buffer (writes
    it to the disk, or copies and hashes it) while the caller fills the other."""

    def __init__(self, name: str) -> None:
        self.bufs, self.i = _staging(), 0
        self.jobs: list[Future | None] = [None, None]
        self.helper = ThreadPoolExecutor(1, thread_name_prefix=name)

    def next(self) -> memoryview:
        """The buffer to fill now, once the helper is done with it (its error is raised here)."""
        if (job := self.jobs[self.i]) is not None:
            job.result()
        return self.bufs[self.i]

    def hand_off(self, work: Callable[..., None], *args: object) -> None:
        """Give the buffer just filled to the helper: `work(buffer, *args)`."""
        self.jobs[self.i] = self.helper.submit(work, self.bufs[self.i], *args)
        self.i ^= 1

    def __enter__(self) -> _Relay:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            if exc_type is None:
                for job in self.jobs:
                    if job is not None:
                        job.result()
        finally:
            self.helper.shutdown(wait=True)   # never leave the helper on a buffer or descriptor


def _refused(e: OSError) -> bool:
    return e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _unsupported(e: OSError, what: str) -> OSError:
    return Unsupported(e.errno, f"O_DIRECT {what} refused: {e.strerror}") if _refused(e) else e


def open_for_write(path: os.PathLike | str) -> int:
    """Create `path` (exclusive) for direct writes; Unsupported where the file system refuses."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FLAG, 0o644)
    except OSError as e:
        raise _unsupported(e, "open") from None


def write(fd: int, pieces: Iterable[memoryview]) -> str:
    """Write the pieces end to end to `fd` (opened with O_DIRECT) and return their digest.

    Each staging chunk is hashed while in the cache and handed to the helper to write, while the next
    chunk fills the other buffer; the last is padded to `ALIGN` and the file cut back."""
    h = Hasher()
    fill = total = 0
    with _Relay("direct-write") as relay:
        buf = relay.next()
        for view in pieces:
            at = 0
            while at < len(view):
                take = min(len(view) - at, CHUNK - fill)
                buf[fill:fill + take] = view[at:at + take]
                fill, at, total = fill + take, at + take, total + take
                if fill == CHUNK:
                    h.update(buf)
                    relay.hand_off(_write_all, fd, CHUNK)
                    buf, fill = relay.next(), 0
        if fill:
            h.update(buf[:fill])
            padded = -(-fill // ALIGN) * ALIGN
            buf[fill:padded] = bytes(padded - fill)
            relay.hand_off(_write_all, fd, padded)
    if total % ALIGN:
        os.ftruncate(fd, total)
    return h.value()


def _write_all(buf: memoryview, fd: int, n: int) -> None:
    done = 0
    try:
        while done < n:
            done += os.write(fd, buf[done:n])
    except OSError as e:
        raise _unsupported(e, "write") from None


def _pread(fd: int, buf: memoryview, at: int, size: int) -> int:
    """Read the chunk of a `size`-byte file at `at` into `buf`: whole blocks, the last one padded; the
    bytes of the file it got."""
    want = min(CHUNK, -(-(size - at) // ALIGN) * ALIGN)
    try:
        return min(os.preadv(fd, [buf[:want]], at), size - at)
    except OSError as e:
        raise _unsupported(e, "read") from None


def read(path: os.PathLike | str, size: int, like: str | None = None) -> tuple[bytearray, str]:
    """The first `size` bytes of `path`, read with O_DIRECT, and their digest in the form of `like` (a
    recorded digest; BLAKE3 when None); Unsupported where refused. The helper copies and hashes each
    chunk while the disk reads the next.

    A short file (cut while read) returns what it holds; the caller's size and checksum checks judge it."""
    try:
        fd = os.open(path, os.O_RDONLY | FLAG)
    except OSError as e:
        raise _unsupported(e, "open") from None
    out, h = bytearray(size), Hasher(like)
    whole = memoryview(out)

    def take(buf: memoryview, at: int, got: int) -> None:
        whole[at:at + got] = buf[:got]
        h.update(whole[at:at + got])

    at = 0
    try:
        with _Relay("direct-read") as relay:
            while at < size:
                buf = relay.next()
                got = _pread(fd, buf, at, size)
                if got <= 0:
                    break
                relay.hand_off(take, at, got)
                at += got
    finally:
        whole.release()
        os.close(fd)
    if at < size:
        del out[at:]
    return out, h.value()


class ChunkReader:
    """The first `size` bytes of `path`, read with O_DIRECT one chunk at a time: while the caller uses
    one chunk, the helper reads (and hashes, in order) the next into the other staging buffer, so the
    caller never holds more than a chunk (the streamed reduce, diloco/reduce.py). Iterate once; a
    chunk is valid until the next is asked for. `digest` (in the form of `like`) is set once the last
    chunk was read; a file cut while read ends early, and the caller's checks judge it. It uses the
    calling thread's staging buffers, as `read` and `write` do: finish or close it before that thread
    moves another large object directly (the reducer reads one shard at a time)."""

    def __init__(self, path: os.PathLike | str, size: int, like: str | None = None) -> None:
        self.path, self.size, self.hasher, self.digest = path, size, Hasher(like), None
        self.fd = -1

    def _read(self, buf: memoryview, at: int) -> int:
        got = _pread(self.fd, buf, at, self.size)
        if got > 0:
            self.hasher.update(buf[:got])
        return got

    def __iter__(self) -> Iterator[memoryview]:
        try:   # Unsupported before the first chunk: the caller can still read it buffered
            self.fd = os.open(self.path, os.O_RDONLY | FLAG)
        except OSError as e:
            raise _unsupported(e, "open") from None
        bufs, helper = _staging(), ThreadPoolExecutor(1, thread_name_prefix="direct-chunks")
        job: Future | None = None
        try:
            at, i = 0, 0
            job = helper.submit(self._read, bufs[0], 0) if self.size else None
            while job is not None:
                got, job = job.result(), None
                if got <= 0:
                    break
                at += got
                if at < self.size:   # the other buffer was given back when this chunk was asked for
                    job = helper.submit(self._read, bufs[i ^ 1], at)
                yield bufs[i][:got]
                i ^= 1
            self.digest = self.hasher.value()
        finally:
            if job is not None:
                job.cancel()
                with contextlib.suppress(Exception):
                    job.result()
            helper.shutdown(wait=True)   # never leave the helper on a buffer or the descriptor
            os.close(self.fd)

"""Immutable object storage for weights and delta shards: one interface, two backends.

`open_store(url)` returns a `FileStore` for ``file:///abs/dir`` (a shared or local file system)
or an `S3Store` for ``s3://bucket/optional/prefix`` (AWS, MinIO, R2, moto, ...). Every write is
create-only: an object, once written, is never replaced, so a reader that holds a key and its
digest (diloco/digest.py) always gets the bytes that were committed (Redis, not the store, is the
commit point). Readers bound what they accept with ``max_bytes`` and ``digest``, because keys and
checksums may come from other, untrusted processes.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import itertools
import logging
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diloco import digest as digests
from diloco import directio
from diloco.errors import (
    ChecksumMismatch,
    ConfigError,
    ObjectExists,
    ObjectMissing,
    ObjectTooLarge,
    Unreachable,
)

ACCEPTED_FORMS = "file:///absolute/dir or s3://bucket[/prefix]"
# Temp files live next to their final name (os.link cannot cross file systems); the marker lets
# list() skip them and is refused in keys so a key can never collide with one.
TMP_MARK = ".diloco-tmp-"
MAX_KEY_BYTES = 1024  # S3's limit; enforced on both backends so they accept the same keys
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
# "0" turns the file store's direct I/O off (diloco/directio.py says why it is on).
DIRECT_IO_ENV = "DILOCO_DIRECT_IO"

log = logging.getLogger(__name__)


def validate_key(key: str, *, what: str = "key") -> str:
    """Return `key` if it is a safe relative path, else raise ConfigError (keys may be hostile)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"object {what} must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ConfigError(f"object {what} {key!r} must be relative, without backslashes or control "
                          "characters")
    # Empty and "." segments are refused too: on a file system they alias other keys.
    if any(seg in ("", ".", "..") or seg.startswith(TMP_MARK) for seg in key.split("/")):
        raise ConfigError(f"object {what} {key!r} has an empty, '.', '..' or reserved path segment")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ConfigError(f"object {what} is longer than {MAX_KEY_BYTES} bytes: {key[:80]!r}...")
    return key


def _validate_prefix(prefix: str) -> str:
    # A prefix may end mid-segment ("runs/r1/weights/v") or in "/", so check it as a key after
    # dropping a trailing slash; the empty prefix lists everything.
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")
    return prefix


Buffer = bytes | bytearray | memoryview
# An object's bytes as read: a bytearray where the file store read it with direct I/O.
Blob = bytes | bytearray
# An object's bytes, whole or as pieces laid end to end (diloco.stbytes.parts: a tensor's own memory),
# so a writer need not join a model-sized object into one buffer first.
Payload = Buffer | Sequence[Buffer]
# An object read a chunk at a time (ObjectStore.get_chunks); close() stops the read.
Chunks = Generator[Buffer, None, None]


def pieces(data: Payload) -> list[Buffer]:
    return [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)


def payload_size(data: Payload) -> int:
    return sum(memoryview(p).nbytes for p in pieces(data))


def digest_of(data: Payload, like: str | None = None) -> str:
    """`data`'s digest (diloco/digest.py), in the form of the recorded digest `like` if given."""
    return digests.of(pieces(data), like)


def _verify(key: str, data: Blob, digest: str | None, actual: str | None = None) -> Blob:
    """`data` if its digest (`actual`, when the read already hashed it) is the expected one."""
    if digest is not None:
        if actual is None or not digests.same_form(actual, digest.lower()):
            actual = digests.of(data, like=digest.lower())
        _check_digest(key, len(data), digest, actual)
    return data


def _check_digest(key: str, nbytes: int, digest: str | None, actual: str) -> None:
    if digest is not None and actual != digest.lower():
        raise ChecksumMismatch(f"object {key!r} has digest {actual} ({nbytes} bytes), expected {digest}")


def _checked_chunks(key: str, reads: Iterator[Buffer], digest: str | None, max_bytes: int | None) -> Chunks:
    """The chunks read, passed on as they come: counted against `max_bytes` (an object that grew after
    its size was read, or a server that sent no or a false length) and checked against `digest` after
    the last."""
    h, got = digests.Hasher(digest), 0
    for chunk in reads:
        got += len(chunk)
        if max_bytes is not None and got > max_bytes:
            raise _too_large(key, got, max_bytes)
        h.update(chunk)
        yield chunk
    _check_digest(key, got, digest, h.value())


def _too_large(key: str, size: int, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"object {key!r} is {size} bytes, more than the {max_bytes} allowed")


class ObjectStore(ABC):
    """Create-only key/value store of byte objects; implementations are safe across threads."""

    url: str  # as opened; never carries secrets (credentials come from the environment)

    @abstractmethod
    def put(self, key: str, data: Payload, *, durable: bool = True) -> str:
        """Create `key` with `data` (bytes, or pieces laid end to end); return its digest.
        ObjectExists if the key is taken.

        `durable=False` may skip making the object survive a machine crash (a file store's fsync):
        for objects always read with their digest checked and never needed after a crash (delta
        shards, published updates), where a torn object is rejected and the data sent again."""

    @abstractmethod
    def get(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Blob:
        """The object's bytes; ObjectMissing, ObjectTooLarge or ChecksumMismatch when they fail."""

    @abstractmethod
    def get_chunks(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Chunks:
        """The object's bytes a chunk at a time (each valid until the next is asked for), checked against
        `digest` once the last is read: a mismatch raises then, so a caller must not keep what it made
        of the chunks unless the iteration ends normally. Errors as `get`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectMissing if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    @abstractmethod
    def check(self) -> None:
        """Raise Unreachable (naming the URL) unless the store can be used."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Sorted keys, relative to the store root, that start with `prefix`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


_CHUNK = 8 << 20


def _write_hashed(fd: int, data: Payload, durable: bool) -> str:
    """Write `data` to `fd` and return its digest, chunk by chunk (each hashed while in cache).

    Durable: each chunk is flushed to the disk (fdatasync, one at a time, in a thread) while the
    next is copied, so the disk works during the copy rather than after it: on this project's
    machines two 100 MB objects written side by side took 0.37 s written then synced and 0.25 s so
    (docs/benchmarks.md, "Sync round")."""
    h = digests.Hasher()
    flush: _Flush | None = None
    try:
        for piece in pieces(data):
            view = memoryview(piece).cast("B")
            for at in range(0, len(view), _CHUNK):
                chunk = view[at:at + _CHUNK]
                h.update(chunk)
                while chunk:   # a write may take less than it is given
                    chunk = chunk[os.write(fd, chunk):]
                if durable:
                    if flush is not None:
                        flush.wait()
                    flush = _Flush(fd)
    finally:
        if flush is not None:   # never leave a flush running on a descriptor about to be closed
            flush.join()
    if flush is not None:
        flush.wait()
    return h.value()


class _Flush(threading.Thread):
    """One fdatasync in the background; `wait` re-raises its error (a failed flush fails the write)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.error = fd, None
        self.start()

    def run(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self.error = e

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


class _PiecesReader(io.RawIOBase):
    """A seekable file over pieces laid end to end, for botocore to send as one body without joining
    a model-sized object into one buffer first (it reads a block at a time, and seeks to retry)."""

    def __init__(self, parts: list[Buffer]) -> None:
        self._views = [memoryview(p).cast("B") for p in parts]
        self._starts = list(itertools.accumulate((len(v) for v in self._views), initial=0))
        self._pos = 0

    def __len__(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        out, done = memoryview(buffer).cast("B"), 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        while done < len(out) and i < len(self._views):
            view = self._views[i][self._pos - self._starts[i]:][:len(out) - done]
            out[done:done + len(view)] = view
            done, self._pos, i = done + len(view), self._pos + len(view), i + 1
        return done


class FileStore(ObjectStore):
    """Objects as files under a directory; create-only through link(2), which fails on EEXIST."""

    def __init__(self, url: str, root: Path, *, direct: bool | None = None) -> None:
        self.url = url
        self.root = root
        if direct is None:
            direct = os.environ.get(DIRECT_IO_ENV, "1") != "0"
        # Large objects move with O_DIRECT until the file system refuses it once (then buffered).
        self.direct = direct and directio.FLAG != 0

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _root_gone(self) -> bool:
        return not self.root.is_dir()

    def _unreachable(self, why: object) -> Unreachable:
        return Unreachable(f"object store {self.url} cannot be reached: {why}")

    def put(self, key: str, data: Payload, *, durable: bool = True) -> str:
        try:
            return self._put(key, data, durable)
        except (ObjectExists, ConfigError):
            raise
        except OSError as e:  # the directory is gone, unmounted, full or read-only: an outage
            raise self._unreachable(e) from None

    def _put(self, key: str, data: Payload, durable: bool) -> str:
        path = self._path(key)
        self._mkdirs(path.parent)
        tmp = path.with_name(f"{TMP_MARK}{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
        try:
            digest = self._write_tmp(tmp, data, durable)
            try:
                os.link(tmp, path)  # atomic and create-only: readers see all of it or nothing
            except FileExistsError:
                raise ObjectExists(f"object {key!r} already exists in {self.url}") from None
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise ConfigError(f"{self.url} is on a file system without hard links ({e}); "
                                      "use a local or NFS directory, or an s3:// store") from e
                raise
        finally:
            tmp.unlink(missing_ok=True)
        if durable:
            self._fsync_dir(path.parent)
        return digest

    def _write_tmp(self, tmp: Path, data: Payload, durable: bool) -> str:
        """Write `data` to the new file `tmp`; its digest. Durable: synced before the caller links it."""
        if self.direct and payload_size(data) >= directio.MIN_BYTES:
            views = (memoryview(p).cast("B") for p in pieces(data))
            try:
                return self._write_fd(directio.open_for_write(tmp), durable, lambda fd: directio.write(fd, views))
            except directio.Unsupported as e:
                self._no_direct(e)
                tmp.unlink(missing_ok=True)
        return self._write_fd(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), durable,
                              lambda fd: _write_hashed(fd, data, durable))

    @staticmethod
    def _write_fd(fd: int, durable: bool, write: Callable[[int], str]) -> str:
        try:
            digest = write(fd)
            if durable:
                os.fsync(fd)  # the link that follows must never publish unwritten blocks
            return digest
        finally:
            os.close(fd)

    def _no_direct(self, why: OSError) -> None:
        if self.direct:
            log.info("object store %s: the file system refuses direct I/O (%s); using buffered I/O", self.url, why)
        self.direct = False

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        # Makes the new directory entry durable; some file systems refuse fsync on directories.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """Read errors as the store's: a missing file is ObjectMissing, anything else an outage."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if self._root_gone():  # no store at all is an outage, not a missing object
                raise self._unreachable(e) from None
            raise ObjectMissing(f"no object {key!r} in {self.url}") from None
        except OSError as e:
            raise self._unreachable(e) from None

    def get(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Blob:
        path = self._path(key)
        with self._reading(key), open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise _too_large(key, size, max_bytes)
            data, actual = self._read_direct(path, size, digest)
            if data is None:
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # grew after the stat: not ours
            raise _too_large(key, len(data), max_bytes)
        return _verify(key, data, digest, actual)

    def get_chunks(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Chunks:
        path = self._path(key)
        with self._reading(key):
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise _too_large(key, size, max_bytes)
            if self.direct and size >= directio.MIN_BYTES:
                reader, got = directio.ChunkReader(path, size, digest), 0
                try:
                    for chunk in reader:
                        got += len(chunk)
                        yield chunk
                    _check_digest(key, got, digest, reader.digest)
                    return
                except directio.Unsupported as e:
                    if got:   # refused half way: not a file system that refuses O_DIRECT up front
                        raise
                    self._no_direct(e)
            yield from self._buffered_chunks(key, path, digest, max_bytes)

    @staticmethod
    def _buffered_chunks(key: str, path: Path, digest: str | None, max_bytes: int | None) -> Chunks:
        def reads() -> Iterator[memoryview]:
            buf = bytearray(directio.CHUNK)
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    yield memoryview(buf)[:n]
        return _checked_chunks(key, reads(), digest, max_bytes)

    def _read_direct(self, path: Path, size: int, like: str | None) -> tuple[bytearray | None, str | None]:
        """The file's bytes read with O_DIRECT and their digest (in the form of `like`), or Nones where
        it is not used (small, or refused)."""
        if not self.direct or size < directio.MIN_BYTES:
            return None, None
        try:
            return directio.read(path, size, like)
        except directio.Unsupported as e:
            self._no_direct(e)
            return None, None

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            if self._root_gone():
                raise self._unreachable(f"{self.root} is not a directory")
            raise ObjectMissing(f"no object {key!r} in {self.url}")
        return path.stat().st_size

    def _mkdirs(self, directory: Path) -> None:
        """Create `directory` and the levels between it and the root, never the root itself: a root
        that is gone (an unmounted volume) is an outage (OSError here), not an empty store to refill."""
        parts = directory.relative_to(self.root).parts
        for depth in range(1, len(parts) + 1):
            self.root.joinpath(*parts[:depth]).mkdir(exist_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._path(key).unlink()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unreachable(f"object store {self.url}: cannot create {self.root}: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise Unreachable(f"object store {self.url}: directory {self.root} is not writable")

    def list(self, prefix: str) -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, not the whole store.
        base = prefix.rpartition("/")[0]
        start = self.root / base if base else self.root
        if self.root.exists() and not self.root.is_dir():
            raise self._unreachable(f"{self.root} is not a directory")
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(TMP_MARK):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


class S3Store(ObjectStore):
    """Objects in an S3-compatible bucket under an optional key prefix."""

    def __init__(self, url: str, bucket: str, prefix: str, *, concurrency: int = 16) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        # Own session: boto3's default session is not safe to create clients from in threads.
        self._session = boto3.session.Session()
        endpoint = os.environ.get("DILOCO_S3_ENDPOINT") or None
        self._config = Config(
            max_pool_connections=max(1, concurrency),
            retries={"mode": "adaptive", "max_attempts": 5},
            # Newer botocore sends CRC checksums by default, which MinIO/R2/moto versions reject
            # or mishandle; integrity is checked end to end with our own digest instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint else None,
            connect_timeout=10,
            read_timeout=120,
        )
        self._client_kwargs = {
            "endpoint_url": endpoint,
            "region_name": self._session.region_name or "us-east-1",
        }
        self._client = self._session.client("s3", config=self._config, **self._client_kwargs)
        self.endpoint: str = self._client.meta.endpoint_url

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _where(self) -> str:
        return f"object store {self.url} (endpoint {self.endpoint})"

    def _translate(self, e: Exception, key: str | None) -> Exception:
        """Map a botocore failure to this package's errors; unknown ones are returned unchanged."""
        from botocore.exceptions import (
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(e, NoCredentialsError):
            return ConfigError(f"{self._where()}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or an AWS profile)")
        if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return Unreachable(f"{self._where()} cannot be reached: {e}")
        if not isinstance(e, ClientError):
            return e
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return Unreachable(f"{self._where()}: bucket {self.bucket!r} does not exist")
        if key is not None and (code in ("NoSuchKey", "404", "NotFound") or status == 404):
            return ObjectMissing(f"no object {key!r} in {self.url}")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return ObjectExists(f"object {key!r} already exists in {self.url}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return Unreachable(f"{self._where()}: access denied to bucket {self.bucket!r} ({code}); "
                               "check the AWS credentials")
        return e

    def put(self, key: str, data: Payload, *, durable: bool = True) -> str:  # S3 objects are always durable
        full = self._key(key)
        digest = digest_of(data)
        body = data if isinstance(data, bytes | bytearray) else _PiecesReader(pieces(data))
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*",
                                    Metadata={"digest": digest})
        except Exception as e:
            raise self._translate(e, key) from e
        return digest

    def get(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Blob:
        full = self._key(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", -1))
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(key, size, max_bytes)
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()  # on the too-large path, drops the connection instead of draining it
        except ObjectTooLarge:
            raise
        except Exception as e:
            raise self._translate(e, key) from e
        if max_bytes is not None and len(data) > max_bytes:  # server sent no/false length
            raise _too_large(key, len(data), max_bytes)
        return _verify(key, data, digest)

    def get_chunks(self, key: str, *, digest: str | None = None, max_bytes: int | None = None) -> Chunks:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._translate(e, key) from e
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength", -1))
            if max_bytes is not None and size > max_bytes:
                raise _too_large(key, size, max_bytes)
            yield from _checked_chunks(key, self._reads(body, key), digest, max_bytes)
        finally:
            body.close()

    def _reads(self, body, key: str) -> Iterator[bytes]:
        while True:
            try:
                chunk = body.read(directio.CHUNK)
            except Exception as e:
                raise self._translate(e, key) from e
            if not chunk:
                return
            yield chunk

    def size(self, key: str) -> int:
        full = self._key(key)
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except Exception as e:
            raise self._translate(e, key) from e

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)  # S3 deletes are idempotent
        except Exception as e:
            translated = self._translate(e, key)
            if not isinstance(translated, ObjectMissing):
                raise translated from e

    def check(self) -> None:
        from botocore.exceptions import ClientError

        # A probe client that gives up fast: the main one's backoff would stall startup ~10 s.
        probe = self._session.client(
            "s3", config=self._config.merge(self._probe_config()), **self._client_kwargs)
        try:
            probe.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise Unreachable(f"{self._where()}: bucket {self.bucket!r} does not exist") from e
            raise Unreachable(f"{self._where()}: bucket {self.bucket!r} not usable: {e}") from e
        except Exception as e:
            translated = self._translate(e, None)
            if isinstance(translated, Unreachable | ConfigError):
                raise translated from e
            raise Unreachable(f"{self._where()} cannot be reached: {e}") from e
        finally:
            probe.close()

    @staticmethod
    def _probe_config():
        from botocore.config import Config

        return Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5,
                      read_timeout=15)

    def list(self, prefix: str) -> list[str]:
        full = self.prefix + _validate_prefix(prefix)
        keys = []
        try:
            # The paginator follows continuation tokens past S3's 1000-keys-per-page limit.
            for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(self.prefix):] for obj in page.get("Contents", ()))
        except Exception as e:
            raise self._translate(e, None) from e
        return sorted(keys)


def open_store(url: str, *, concurrency: int = 16) -> ObjectStore:
    """Open the store `url` names: file:///abs/dir or s3://bucket[/prefix]; else ConfigError."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.query or parts.fragment:
        raise ConfigError(f"object store URL {url!r} is not supported; use {ACCEPTED_FORMS}")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(f"object store URL {url!r} must name an absolute directory; use "
                              f"{ACCEPTED_FORMS}")
        return FileStore(url, Path(path))
    if parts.scheme == "s3":
        # netloc with "@" would mean credentials in the URL, which then leak into logs.
        if not _BUCKET_RE.match(parts.netloc or ""):
            raise ConfigError(f"object store URL {url!r} has no valid bucket name; use "
                              "s3://bucket[/prefix] with credentials in AWS_* variables")
        prefix = unquote(parts.path).strip("/")
        if prefix:
            validate_key(prefix, what="prefix")
        return S3Store(url, parts.netloc, prefix, concurrency=concurrency)
    raise ConfigError(f"object store URL {url!r} is not supported; use {ACCEPTED_FORMS}")


def put_idempotent(store: ObjectStore, key: str, data: Payload, *, durable: bool = True) -> str:
    """Create-only write that accepts an identical object already there (a retried write landed).

    ObjectExists only if the existing object differs: immutable objects are never replaced.
    """
    try:
        return store.put(key, data, durable=durable)
    except ObjectExists:
        ours = digest_of(data)
        if digest_of(store.get(key)) != ours:
            raise
        return ours

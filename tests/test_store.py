"""The ObjectStore contract, run against both backends (a directory and a real moto_server)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from diloco import directio
from diloco.errors import (
    ChecksumMismatch,
    ConfigError,
    ObjectExists,
    ObjectMissing,
    ObjectTooLarge,
    Unreachable,
)
from diloco.localserver import free_port
from diloco.store import FileStore, ObjectStore, S3Store, digest_of, open_store

KEY = "runs/r1/weights/v00000001-t3.safetensors"


@pytest.fixture
def store(store_url: str) -> ObjectStore:
    s = open_store(store_url)
    s.check()
    return s


def test_open_store_picks_backend_by_scheme(file_url, s3_url):
    assert isinstance(open_store(file_url), FileStore)
    s3 = open_store(s3_url)
    assert isinstance(s3, S3Store)
    assert s3.url == s3_url


def test_put_get_round_trip_returns_digest(store):
    data = b"weights" * 1000
    digest = store.put(KEY, data)
    assert digest == digest_of(data)
    assert store.get(KEY) == data
    assert store.get(KEY, digest=digest, max_bytes=len(data)) == data


def test_an_object_put_as_pieces_is_the_pieces_end_to_end(store):
    import numpy as np
    data = bytes(range(256)) * 400
    array = np.frombuffer(data, dtype=np.float32)   # a piece that is some array's memory, as stbytes.parts gives
    pieces = [data[:8], memoryview(array)[2:5000], bytearray(data[20000:20100]), memoryview(data)[20100:]]
    digest = store.put(KEY, pieces, durable=False)
    assert digest == digest_of(data)
    assert store.get(KEY, digest=digest) == data


def test_put_is_create_only(store):
    store.put(KEY, b"first")
    with pytest.raises(ObjectExists):
        store.put(KEY, b"second")
    with pytest.raises(ObjectExists):
        store.put(KEY, b"first")  # even identical bytes: objects are immutable, not idempotent
    assert store.get(KEY) == b"first"
    assert store.list("") == [KEY]  # the failed writes left no temp files or extra objects


def test_get_missing_raises_object_missing(store):
    with pytest.raises(ObjectMissing):
        store.get("runs/r1/nope")
    with pytest.raises(ObjectMissing):
        store.size("runs/r1/nope")


@pytest.mark.parametrize("size", [7, directio.MIN_BYTES + 5])   # buffered and direct reads
def test_a_legacy_sha256_digest_is_checked_as_sha256(store, size):
    """Records written before BLAKE3 digests hold bare sha256 hex: still checked, with sha256."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    store.put(KEY, data)
    assert store.get(KEY, digest=hashlib.sha256(data).hexdigest()) == data
    with pytest.raises(ChecksumMismatch, match="expected"):
        store.get(KEY, digest=hashlib.sha256(b"other").hexdigest())


def test_digest_mismatch_raises(store):
    digest = store.put(KEY, b"payload")
    with pytest.raises(ChecksumMismatch):
        store.get(KEY, digest=digest_of(b"other"))
    # A truncated copy of the object hashes differently, so it is caught the same way.
    store.put("runs/r1/truncated", b"payl")
    with pytest.raises(ChecksumMismatch):
        store.get("runs/r1/truncated", digest=digest)
    assert store.get(KEY, digest=digest.upper()) == b"payload"  # hex case does not matter


def test_max_bytes_raises_object_too_large(store):
    store.put(KEY, b"x" * 101)
    with pytest.raises(ObjectTooLarge):
        store.get(KEY, max_bytes=100)
    assert store.get(KEY, max_bytes=101) == b"x" * 101


def test_size_exists_delete(store):
    assert not store.exists(KEY)
    store.put(KEY, b"12345")
    assert store.exists(KEY)
    assert store.size(KEY) == 5
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)  # idempotent
    with pytest.raises(ObjectMissing):
        store.get(KEY)
    store.put(KEY, b"again")  # a deleted key can be created anew
    assert store.get(KEY) == b"again"


def test_list_prefix_sorted_and_relative(store):
    keys = ["runs/r1/deltas/b", "runs/r1/deltas/a", "runs/r1/weights/v2", "runs/r1/weights/v1",
            "runs/r10/x", "top"]
    for k in keys:
        store.put(k, k.encode())
    assert store.list("") == sorted(keys)
    assert store.list("runs/r1/") == sorted(k for k in keys if k.startswith("runs/r1/"))
    assert store.list("runs/r1") == sorted(k for k in keys if k.startswith("runs/r1"))
    assert store.list("runs/r1/weights/v") == ["runs/r1/weights/v1", "runs/r1/weights/v2"]
    assert store.list("runs/r2/") == []
    assert store.list("nothing") == []


def test_list_more_than_one_page(store):
    keys = [f"many/k{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, b"."), keys))
    store.put("other/k", b".")
    assert store.list("many/") == keys


@pytest.mark.parametrize("bad", ["", "/abs/key", "a/../b", "..", "a\\b", "a\0b", "a//b", "./a",
                                 "a/", "a\nb", "x" * 1025, "d/.diloco-tmp-x"])
def test_bad_keys_rejected(store, bad):
    for op in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.size(bad),
               lambda: store.exists(bad), lambda: store.delete(bad)):
        with pytest.raises(ConfigError):
            op()
    assert store.list("") == []


def test_list_rejects_escaping_prefix(store):
    with pytest.raises(ConfigError):
        store.list("../")
    with pytest.raises(ConfigError):
        store.list("/etc")


@pytest.mark.parametrize("url", ["http://example.com/x", "redis://localhost/0", "/tmp/store",
                                 "file://relative/dir", "s3://", "s3://user:pw@bucket/p",
                                 "s3://bucket/p?x=1", "gs://bucket", ""])
def test_open_store_bad_url(url):
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert "s3://bucket" in str(info.value)
    if url:
        assert url in str(info.value)


def test_unreachable_endpoint(s3_url, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("DILOCO_S3_ENDPOINT", endpoint)
    store = open_store(s3_url)
    with pytest.raises(Unreachable) as info:
        store.check()
    assert endpoint in str(info.value)
    assert s3_url in str(info.value)


def test_missing_bucket(s3_env):
    store = open_store("s3://no-such-bucket-diloco/prefix")
    with pytest.raises(Unreachable) as info:
        store.check()
    assert "no-such-bucket-diloco" in str(info.value)
    assert s3_env.endpoint in str(info.value)


def test_file_check_creates_directory(tmp_path):
    root = tmp_path / "a" / "b"
    store = open_store(root.as_uri())
    store.check()
    assert root.is_dir()


def test_file_put_never_recreates_a_root_that_is_gone(tmp_path):
    root = tmp_path / "store"
    store = open_store(root.as_uri())
    store.check()
    store.put("t/deltas/k", b"x")
    root.rename(tmp_path / "away")  # the volume is unmounted under a running service
    with pytest.raises(Unreachable) as info:
        store.put("t/deltas/k2", b"y")
    assert store.url in str(info.value)
    assert not root.exists(), "an empty store would have silently replaced the real one"
    (tmp_path / "away").rename(root)
    store.put("t/new/deeper/k3", b"z")  # levels below the root are still created
    assert store.get("t/new/deeper/k3") == b"z"


def test_file_temp_files_are_not_listed(tmp_path):
    store = open_store(tmp_path.as_uri())
    store.put("d/k", b"x")
    (tmp_path / "d" / ".diloco-tmp-k.1.abc").write_bytes(b"partial")  # a crashed writer's leftover
    assert store.list("") == ["d/k"]


def test_s3_records_digest_metadata(s3_url, s3_server):
    store = open_store(s3_url)
    digest = store.put(KEY, b"meta")
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/{KEY}")
    assert head["Metadata"]["digest"] == digest


def test_concurrent_puts_all_land(store):
    items = {f"c/{i:03d}": bytes([i]) * (i + 1) for i in range(64)}
    with ThreadPoolExecutor(16) as pool:
        digests = dict(zip(items, pool.map(lambda kv: store.put(*kv), items.items()), strict=True))
    assert store.list("c/") == sorted(items)
    for k, v in items.items():
        assert store.get(k, digest=digests[k]) == v


def test_binary_round_trip(store):
    data = bytes(range(256)) * 64
    digest = store.put(KEY, data)
    assert store.get(KEY, digest=digest) == data


def test_empty_object_round_trip(store):
    digest = store.put(KEY, b"")
    assert digest == digest_of(b"")
    assert store.size(KEY) == 0
    assert store.exists(KEY)
    assert store.get(KEY, digest=digest, max_bytes=0) == b""


def test_a_file_store_syncs_durable_objects_and_skips_the_fsync_for_the_others(file_url, monkeypatch):
    """Delta shards and published updates go in with durable=False (they are read with their digest
    checked, and a torn one is sent again): no fsync on their critical path; every other object syncs."""
    import diloco.store as store_module

    store, synced = open_store(file_url), []
    store.check()  # creates the directory, as a service starting does
    real = store_module.os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    store.put("a/durable", b"x")
    assert len(synced) >= 2, "the file and its directory entry"
    synced.clear()
    assert store.put("a/fast", b"y", durable=False) == digest_of(b"y")
    assert synced == [] and store.get("a/fast") == b"y"


def test_a_durable_file_object_is_flushed_chunk_by_chunk_and_a_failed_flush_fails_the_put(file_url, monkeypatch):
    """Each 8 MiB is flushed while the next is written; a flush that fails (a disk error) is an
    outage, and neither the object nor its temp file is left behind."""
    import errno

    import diloco.store as store_module

    store = open_store(file_url)
    store.check()
    store.direct = False   # the buffered path, as on a file system that refuses O_DIRECT
    flushed, real = [], store_module.os.fdatasync
    monkeypatch.setattr(store_module.os, "fdatasync", lambda fd: flushed.append(fd) or real(fd))
    data = bytes(range(256)) * (20 << 12)   # 20 MiB: three chunks
    assert store.put("a/big", data) == digest_of(data)
    assert len(flushed) == 3 and store.get("a/big") == data
    flushed.clear()
    store.put("a/fast", data, durable=False)
    assert flushed == []

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module.os, "fdatasync", broken)
    with pytest.raises(Unreachable, match="Input/output error"):
        store.put("a/lost", data)
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["big", "fast"]   # no temp file either


# Sizes around the direct path's edges: below its threshold, a chunk and a block, exactly both staging
# buffers, one byte more (a buffer reused), several chunks with a ragged tail.
DIRECT_SIZES = [directio.MIN_BYTES - 1, directio.CHUNK + directio.ALIGN, 2 * directio.CHUNK,
                2 * directio.CHUNK + 1, 5 * directio.CHUNK + 4097]


@pytest.mark.parametrize("size", DIRECT_SIZES)
@pytest.mark.parametrize("durable", [True, False])
def test_a_large_file_object_moves_with_direct_io_byte_exact(file_url, size, durable):
    """Large objects bypass the page cache (diloco/directio.py): padded to the block on the way out,
    cut back to their size, read back whole; the header piece is not block-aligned, as a shard's is not."""
    store = open_store(file_url)
    store.check()
    assert store.direct, "O_DIRECT works on the test machine's file systems"
    body = bytes(range(251)) * (size // 251 + 1)
    pieces = [b"header" * 7, memoryview(body)[:size - 42]]
    want = b"".join(pieces)
    digest = store.put("a/big", pieces, durable=durable)
    assert digest == digest_of(want)
    assert (store.root / "a" / "big").stat().st_size == len(want)
    assert store.get("a/big", digest=digest, max_bytes=len(want)) == want
    assert store.direct, "nothing fell back to buffered I/O"


def test_direct_and_buffered_processes_read_each_others_objects(file_url):
    """Processes sharing a store need not agree on direct I/O: a direct read sees bytes still in
    another writer's page cache, and a buffered read sees bytes written past it."""
    direct, buffered = open_store(file_url), open_store(file_url)
    direct.check()
    buffered.direct = False
    data = bytes(range(256)) * (12 << 10)   # 3 MiB
    buffered.put("a/cached", data, durable=False)
    direct.put("a/on-disk", data, durable=False)
    assert direct.get("a/cached") == data and buffered.get("a/on-disk") == data


def _refuse_direct_io(monkeypatch) -> None:
    """Make every O_DIRECT open fail with EINVAL, as tmpfs before Linux 6.6 and some FUSE mounts do."""
    import errno

    real_open = directio.os.open

    def refusing(path, flags, *args):
        if flags & directio.FLAG:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", refusing)


def test_a_file_system_refusing_direct_io_falls_back_to_buffered_io(file_url, monkeypatch, caplog):
    """tmpfs before Linux 6.6 and some FUSE mounts refuse O_DIRECT with EINVAL: the store says so once
    and goes on buffered, losing nothing."""
    import logging

    _refuse_direct_io(monkeypatch)
    store = open_store(file_url)
    store.check()
    data = bytes(range(256)) * (8 << 10)   # 2 MiB
    with caplog.at_level(logging.INFO, logger="diloco.store"):
        digest = store.put("a/big", data)
    assert not store.direct and "refuses direct I/O" in caplog.text
    assert store.get("a/big", digest=digest) == data
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["big"], "no temp file left behind"
    reader = open_store(file_url)   # a reader finds out on its first read
    assert reader.get("a/big", digest=digest) == data and not reader.direct


def test_a_failed_sync_of_a_direct_write_fails_the_put_and_leaves_nothing(file_url, monkeypatch):
    import errno

    import diloco.store as store_module

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    store = open_store(file_url)
    store.check()
    monkeypatch.setattr(store_module.os, "fsync", broken)
    with pytest.raises(Unreachable, match="Input/output error"):
        store.put("a/lost", bytes(3 << 20))
    assert list((store.root / "a").iterdir()) == []


def test_a_truncated_or_corrupt_large_object_is_refused_on_a_direct_read(file_url):
    store = open_store(file_url)
    store.check()
    data = bytes(range(256)) * (10 << 10)   # 2.5 MiB
    digest = store.put("a/big", data)
    path = store.root / "a" / "big"
    with open(path, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(b"\xff" * 8)
    with pytest.raises(ChecksumMismatch, match="a/big"):
        store.get("a/big", digest=digest)
    with open(path, "r+b") as f:
        f.truncate(len(data) - 5000)
    with pytest.raises(ChecksumMismatch, match=f"{len(data) - 5000} bytes"):
        store.get("a/big", digest=digest)
    with pytest.raises(ObjectTooLarge):
        store.get("a/big", max_bytes=1 << 20)


def test_the_s3_body_over_pieces_reads_and_seeks_as_their_bytes_end_to_end():
    """botocore reads the body a block at a time and seeks back to retry a request."""
    import io
    import os

    from diloco.store import _PiecesReader

    data = os.urandom(100_003)
    body = _PiecesReader([data[:10], memoryview(data)[10:5000], bytearray(), data[5000:]])
    assert len(body) == len(data)
    out = b""
    while chunk := body.read(777):
        out += chunk
    assert out == data
    body.seek(4990)
    assert body.read(20) == data[4990:5010]
    body.seek(-3, io.SEEK_END)
    assert body.read() == data[-3:] and body.read(5) == b""
    body.seek(0)
    assert body.read() == data


# --- get_chunks: an object read a chunk at a time (the streamed reduce) ---------------------------

def _fds() -> int:
    import os
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("size", [0, 5, directio.MIN_BYTES + 5, 3 * directio.CHUNK])
def test_get_chunks_gives_the_object_in_chunks_and_checks_its_digest(store, size):
    data = bytes(range(253)) * (size // 253 + 1)
    data = data[:size]
    digest = store.put(KEY, data)
    chunks = [bytes(c) for c in store.get_chunks(KEY, digest=digest, max_bytes=size)]
    assert b"".join(chunks) == data
    assert all(len(c) <= directio.CHUNK for c in chunks), "never more than a chunk at a time"
    legacy = hashlib.sha256(data).hexdigest()   # a record written before BLAKE3 digests
    assert b"".join(bytes(c) for c in store.get_chunks(KEY, digest=legacy)) == data


@pytest.mark.parametrize("size", [7, 3 * directio.CHUNK + 1])
def test_get_chunks_refuses_a_wrong_digest_after_the_last_chunk(store, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    store.put(KEY, data)
    seen = 0
    with pytest.raises(ChecksumMismatch, match=f"{size} bytes"):
        for chunk in store.get_chunks(KEY, digest=digest_of(b"other")):
            seen += len(chunk)
    assert seen == size, "the mismatch is known only once every chunk was read"


def test_get_chunks_errors_as_get(store):
    store.put(KEY, b"x" * 100)
    with pytest.raises(ObjectMissing):
        list(store.get_chunks("runs/r1/absent"))
    with pytest.raises(ObjectTooLarge, match="100 bytes"):
        list(store.get_chunks(KEY, max_bytes=99))


def test_get_chunks_closed_half_way_leaves_no_descriptor_or_thread(file_url):
    import threading

    store = open_store(file_url)
    store.check()
    data = bytes(range(256)) * (16 << 10)   # 4 MiB: direct reads, four chunks
    digest = store.put(KEY, data)
    fds, threads = _fds(), threading.active_count()
    chunks = store.get_chunks(KEY, digest=digest)
    assert bytes(next(chunks)) == data[:directio.CHUNK]
    chunks.close()
    assert (_fds(), threading.active_count()) == (fds, threads)
    assert store.direct


def test_get_chunks_of_a_file_cut_after_the_stat_is_refused(file_url, monkeypatch):
    store = open_store(file_url)
    store.check()
    data = bytes(range(256)) * (12 << 10)   # 3 MiB
    digest = store.put(KEY, data)
    real = directio.ChunkReader.__init__

    def cut_first(self, path, size, like=None):
        real(self, path, size, like)
        import os
        os.chmod(path, 0o644)
        os.truncate(path, size - 5000)   # the file shrinks between the stat and the read

    monkeypatch.setattr(directio.ChunkReader, "__init__", cut_first)
    with pytest.raises(ChecksumMismatch, match=f"{len(data) - 5000} bytes"):
        list(store.get_chunks(KEY, digest=digest))


def test_get_chunks_falls_back_to_buffered_reads_where_direct_io_is_refused(file_url, monkeypatch):
    store = open_store(file_url)
    store.check()
    data = bytes(range(256)) * (8 << 10)   # 2 MiB
    digest = store.put(KEY, data)
    _refuse_direct_io(monkeypatch)
    assert b"".join(bytes(c) for c in store.get_chunks(KEY, digest=digest)) == data
    assert not store.direct

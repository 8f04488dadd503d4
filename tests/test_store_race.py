"""Create-only writes racing on one key, against both backends (a directory and a real moto_server).

Objects named by a fencing token rely on this: two writers of one key (a redone round, a zombie
aggregator, a retried upload) must never both believe they wrote it, and a reader must find
exactly the winner's bytes. The writers are threads with their own connections, released together
by a barrier, so the store sees the requests at once.

The S3 backend races only against a real S3 server (MinIO, when DILOCO_TEST_S3_ENDPOINT points at
one): moto checks `If-None-Match` and then writes, without a lock in between, so a race there would
test moto. Against moto, S3's create-only write is checked one writer at a time (tests/test_store.py,
`test_put_is_create_only`), which is what the fencing-token design needs of it (docs/architecture.md,
Object store).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from diloco.errors import ObjectExists
from diloco.store import ObjectStore, digest_of, open_store, put_idempotent

WRITERS = 12
ROUNDS = 5


BACKENDS = ["file", "s3"] if os.environ.get("DILOCO_TEST_S3_ENDPOINT") else ["file"]


@pytest.fixture(params=BACKENDS)
def store_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def store(store_url: str) -> ObjectStore:
    s = open_store(store_url, concurrency=WRITERS)
    s.check()
    return s


def _race(write, n: int = WRITERS) -> list[object]:
    """write(i) in n threads started together; each one's result, or the exception it raised."""
    barrier = threading.Barrier(n)

    def one(i: int) -> object:
        barrier.wait()
        try:
            return write(i)
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _payload(i: int) -> bytes:
    return bytes([i]) * (4096 + 37 * i)   # distinct content and length per writer


def test_racing_create_only_writes_of_one_key_have_exactly_one_winner(store, store_url):
    """Kills the mutants that overwrite: FileStore publishing with os.replace (or writing the key in
    place) instead of the O_EXCL temp file and os.link (S3Store without IfNoneMatch, with MinIO):
    every writer would win, and the last would silently replace the others."""
    for rnd in range(ROUNDS):
        key = f"runs/r/weights/v{rnd:08d}-t1.safetensors"
        results = _race(lambda i, key=key: store.put(key, _payload(i)))
        winners = [i for i, res in enumerate(results) if isinstance(res, str)]
        assert len(winners) == 1, f"round {rnd}: writers {winners} all created {key}"
        losers = [res for res in results if not isinstance(res, str)]
        assert all(isinstance(e, ObjectExists) for e in losers), losers
        [i] = winners
        assert results[i] == digest_of(_payload(i))
        assert store.get(key, digest=results[i]) == _payload(i)
    assert store.list("runs/r/") == [f"runs/r/weights/v{rnd:08d}-t1.safetensors" for rnd in range(ROUNDS)]
    if store_url.startswith("file:"):
        leftovers = [p.name for p in Path(urlsplit(store_url).path).rglob("*") if p.is_file()]
        assert len(leftovers) == ROUNDS, f"temporary files left behind: {leftovers}"


def test_racing_idempotent_writes_accept_identical_bytes_and_refuse_others(store):
    """A round redone under the same token writes the same bytes: every writer succeeds. A writer of
    other bytes under that key fails, whoever wins the race."""
    key = "runs/r/momentum/v00000001-t1.safetensors"
    same = _race(lambda i: put_idempotent(store, key, _payload(0)))
    assert same == [digest_of(_payload(0))] * WRITERS
    other = _race(lambda i: put_idempotent(store, key, _payload(i)))
    assert other[0] == digest_of(_payload(0))
    assert all(isinstance(e, ObjectExists) for e in other[1:]), other
    assert store.get(key) == _payload(0)

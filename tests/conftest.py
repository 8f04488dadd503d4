"""Real services for the tests: one redis-server and one S3 HTTP server per test session.

The S3 server is MinIO when DILOCO_TEST_S3_ENDPOINT points at one, else a `moto_server` process
on a free loopback port. A missing server binary fails the session with an install hint: nothing
is skipped silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import redis

from diloco.errors import ConfigError
from diloco.localserver import RedisServer, free_port
from tests import harness

ENV_AT_START = dict(os.environ)  # as the session began: no fixture may leave its settings here
MOTO_HINT = "moto_server not found: install the test extras with `pip install -e '.[test]'`."


@pytest.fixture(autouse=True)
def _no_service_outlives_its_test():
    yield
    still = harness.stop_leftovers()
    assert not still, f"services still running 120 s after the test asked them to stop: {still}"


@pytest.fixture
def procs():
    """Processes a test started; any still running (or stopped) at the end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True)
    except ConfigError as e:
        pytest.fail(str(e), pytrace=False)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a fault test may have killed it
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


# moto accepts any keys; against MinIO (DILOCO_TEST_S3_ENDPOINT) the caller's own AWS_* variables win.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_credentials() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in S3_TEST_ENV.items()}


class S3Server:
    def __init__(self, endpoint: str, proc: subprocess.Popen | None) -> None:
        self.endpoint = endpoint
        self.proc = proc

    def client(self):
        creds = s3_credentials()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=creds["AWS_DEFAULT_REGION"],
                            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])


def _start_moto(log_dir: Path) -> S3Server:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        pytest.fail(MOTO_HINT, pytrace=False)
    port = free_port()
    with open(log_dir / "moto.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}; see {log_dir / 'moto.log'}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            return S3Server(endpoint, proc)
        except OSError:
            time.sleep(0.05)  # startup has no event to wait on; poll with a deadline
    proc.kill()
    pytest.fail("moto_server did not answer within 30s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """The session's S3 server. It leaves os.environ alone: a test that uses S3 gets the endpoint and
    keys from `s3_env`, for itself and the processes it starts, and later tests do not inherit them."""
    endpoint = os.environ.get("DILOCO_TEST_S3_ENDPOINT")
    server = S3Server(endpoint, None) if endpoint else _start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    if server.proc is not None:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    """DILOCO_S3_ENDPOINT and the AWS_* keys in os.environ for this test only (undone after it)."""
    for name, value in s3_credentials().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DILOCO_S3_ENDPOINT", s3_server.endpoint)
    return s3_server


@pytest.fixture
def s3_url(s3_env: S3Server) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/diloco"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture(params=["file", "s3"])
def store_url(request) -> str:
    return request.getfixturevalue("file_url" if request.param == "file" else "s3_url")

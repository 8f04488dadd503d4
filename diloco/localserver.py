"""Start and stop a local redis-server process.

Used by the embedded `diloco run` (AOF on, in the run's data directory) and by the tests (one
server per test session). The server is a real process on a loopback port, never a fake.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from diloco.errors import ConfigError
from diloco.stopping import die_with_parent_preexec

INSTALL_HINT = (
    "redis-server is not installed. Install it with `sudo apt-get install -y redis-server` "
    "(Debian/Ubuntu), `brew install redis` (macOS), or run `bash scripts/setup.sh`, "
    "which does it for you."
)


def find_redis_server() -> str:
    """Path of the redis-server binary, or a ConfigError that says how to install one."""
    found = os.environ.get("DILOCO_REDIS_SERVER") or shutil.which("redis-server")
    for candidate in (found, "/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ConfigError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process bound to 127.0.0.1; `restart()` keeps its data directory."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True, port: int | None = None,
                 extra_args: tuple[str, ...] = (), die_with_parent: bool = False) -> None:
        self.binary = find_redis_server()
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra_args = extra_args
        self.die_with_parent = die_with_parent  # SIGTERM (redis-server's clean shutdown) when we die; Linux
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers; a no-op while its process runs (a second one would
        only fail to bind the port, and leave the first running with nothing left to kill it)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            # fsync every write: a commit acknowledged is on disk, even if the machine dies next.
            "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(self.data_dir / "redis.log"), *self.extra_args,
        ]
        preexec = die_with_parent_preexec() if self.die_with_parent else None
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    log = self.data_dir / "redis.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}{tail}")
                try:
                    # LOADING (AOF replay) answers PING with an error; wait until it is done.
                    if client.ping() and client.info("persistence").get("loading", 0) == 0:
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                time.sleep(0.05)  # startup has no event to wait on; poll with a deadline
        finally:
            client.close()
        raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop: SHUTDOWN flushes the AOF, then wait for the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # SHUTDOWN closes the connection, so an error here is the expected outcome. No retries: the
        # client's default ones would reconnect to the stopped server for seconds. The timeouts keep a
        # hung server from holding up the stop (it is killed below).
        with contextlib.suppress(redis.RedisError):
            redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                        retry=Retry(NoBackoff(), 0)).shutdown(nosave=not self.appendonly)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (the AOF keeps what was fsynced)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

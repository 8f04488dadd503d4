"""A worker or aggregator running in a thread of this process: for tests and benchmarks, which drive
several services against real Redis and storage without a process each."""

from __future__ import annotations

import threading
from typing import Any


class ServiceThread(threading.Thread):
    """Runs `service.run(max_rounds=...)` (a Worker or an Aggregator) in a thread; `result()` re-raises."""

    def __init__(self, service: Any, max_rounds: int | None, name: str | None = None) -> None:
        super().__init__(daemon=True, name=name or type(service).__name__)
        self.service, self.max_rounds = service, max_rounds
        self.value: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.service.run(max_rounds=self.max_rounds)
        except BaseException as e:
            self.error = e

    def result(self, timeout: float | None = None) -> int | None:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value

    def stop(self, timeout: float | None = None) -> int | None:
        self.service.stop()
        return self.result(timeout)

"""Named crash points, so fault tests can kill a process at an exact step of the protocol.

Set DILOCO_CRASH_AT=<name> (or a comma-separated list) and the process exits with status 137 the
first time it passes that point, as if SIGKILLed there: no cleanup, no lock release, no finally.
"""

from __future__ import annotations

import logging
import os

from diloco.config import ENV_CRASH_AT

CRASH_EXIT_CODE = 137
AGGREGATOR_POINTS = ("after_lock", "during_download", "after_write", "after_commit")

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    wanted = os.environ.get(ENV_CRASH_AT, "")
    if wanted and name in wanted.split(","):
        log.warning("crash point %s reached: exiting now", name)
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)

"""What one test leaves behind must not change the next: the S3 settings a test gets stay its own.

The two tests run in this order (pytest keeps a file's order): the first uses S3, the second does
not and must see the environment the session started with, as must the processes it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests import conftest

S3_VARIABLES = ("DILOCO_S3_ENDPOINT", *conftest.S3_TEST_ENV)


def test_a_test_using_s3_has_its_endpoint_and_keys_in_its_environment(s3_url, s3_server):
    assert os.environ["DILOCO_S3_ENDPOINT"] == s3_server.endpoint
    assert all(os.environ.get(name) for name in conftest.S3_TEST_ENV)


def test_a_later_test_without_s3_inherits_none_of_it():
    """Kills the mutant that writes the S3 settings into os.environ for the whole session (the
    fixture before this test): a subprocess of any later test would then depend on test order."""
    here = {name: os.environ.get(name) for name in S3_VARIABLES}
    assert here == {name: conftest.ENV_AT_START.get(name) for name in S3_VARIABLES}
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('DILOCO_S3_ENDPOINT'))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(conftest.ENV_AT_START.get("DILOCO_S3_ENDPOINT"))

"""Shared fixtures: the embedded local cluster for tests marked `cluster`.

The annotate stage's `backend: auto` never compiles s2cloudless's model in the tests (minutes on one core):
it uses a library built before, else LightGBM; this variable reaches the stages' subprocesses too.
tests/test_cloud_backend.py compiles a small model of its own.
"""

import os

from tests.cluster_fixture import local_cluster  # noqa: F401
from tests.requirements import (  # noqa: F401  (hooks: CI=true fails a skip; skips counted by marker)
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_terminal_summary,
)

os.environ["SNOWPIPE_DETECTOR_BUILD"] = "never"

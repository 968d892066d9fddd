"""Session fixture `local_cluster`: the embedded SLURM cluster, started once per test session when it is not up.

Import it into tests/conftest.py (`from tests.cluster_fixture import local_cluster`) and request it from tests
marked `cluster`. It stops the cluster at the end of the session only when this session started it, so a cluster
a developer left running stays running.

The cluster runs with accounting (slurmdbd + MariaDB, so `sacct` works as on real clusters) when it can be
started; `SNOWPIPE_TEST_ACCOUNTING=0` runs it without (and turns accounting off on a running cluster). Tests that
need sacct check `local_cluster.accounting`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from pipeline.errors import SnowpipeError
from pipeline.localcluster import embedded
from pipeline.localcluster.embedded import ClusterInfo


def accounting_wanted() -> bool:
    return os.environ.get("SNOWPIPE_TEST_ACCOUNTING", "1").strip().lower() not in {"0", "no", "false", "off"}


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[ClusterInfo]:
    """The running embedded cluster's connection facts (`ClusterInfo`): host, port, user, key, known_hosts, ..."""
    started_here = not embedded.status().any_running
    wanted = accounting_wanted()
    try:
        try:
            info = embedded.up(accounting=wanted)
        except SnowpipeError as exc:
            if not wanted:
                raise
            warnings.warn(f"the embedded cluster runs without accounting (sacct tests skip): {exc}", stacklevel=1)
            info = embedded.up(accounting=False)
    except SnowpipeError as exc:
        pytest.fail(f"the embedded cluster did not come up: {exc}", pytrace=False)
    yield info
    if started_here:
        embedded.down()

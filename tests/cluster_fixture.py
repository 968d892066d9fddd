"""Session fixture `local_cluster`: the embedded SLURM cluster, started once per test session when it is not up.

Import it into tests/conftest.py (`from tests.cluster_fixture import local_cluster`) and request it from tests
marked `cluster`. It stops the cluster at the end of the session only when this session started it, so a cluster
a developer left running stays running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.cluster import embedded
from pipeline.cluster.embedded import ClusterInfo
from pipeline.errors import SnowpipeError


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[ClusterInfo]:
    """The running embedded cluster's connection facts (`ClusterInfo`): host, port, user, key, known_hosts, ..."""
    started_here = not embedded.is_up()
    try:
        info = embedded.up()
    except SnowpipeError as exc:
        pytest.fail(f"the embedded cluster did not come up: {exc}", pytrace=False)
    yield info
    if started_here:
        embedded.down()

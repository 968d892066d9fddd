"""Session fixture `local_cluster`: the embedded SLURM cluster, started once per test session when it is not up.

Import it into tests/conftest.py (`from tests.cluster_fixture import local_cluster`) and request it from tests
marked `cluster`. It stops the cluster at the end of the session only when this session started it, so a cluster
a developer left running stays running.

The cluster runs with accounting (slurmdbd + MariaDB, so `sacct` works as on real clusters). Where accounting
cannot start, a developer's session goes on without it, with a warning, and the tests that need sacct skip; under
CI (`CI=true`) the fixture fails with the reason instead, so no CI passes without having run sacct.
`SNOWPIPE_TEST_ACCOUNTING=0` runs it without (and turns accounting off on a running cluster). Tests that need
sacct call `need_accounting(local_cluster)`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from pipeline.errors import SnowpipeError
from pipeline.localcluster import embedded
from pipeline.localcluster.embedded import ClusterInfo
from tests.requirements import in_ci, need


def accounting_wanted() -> bool:
    return os.environ.get("SNOWPIPE_TEST_ACCOUNTING", "1").strip().lower() not in {"0", "no", "false", "off"}


_without_accounting: list[str] = []
"""Why this session's cluster runs without accounting, when it fell back (a developer's machine only)."""


def need_accounting(cluster: ClusterInfo) -> None:
    """sacct works on `cluster`: skip locally, fail under CI, when it runs without accounting."""
    why = _without_accounting[-1] if _without_accounting else \
        "SNOWPIPE_TEST_ACCOUNTING=0" if not accounting_wanted() else "accounting is off on the running cluster"
    need(cluster.accounting, f"needs sacct, but the embedded cluster runs without accounting: {why}")


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
            if in_ci():
                pytest.fail(f"the embedded cluster's accounting (slurmdbd + MariaDB) did not come up, and CI=true "
                            f"allows no run without it: {exc}", pytrace=False)
            warnings.warn(f"the embedded cluster runs without accounting (sacct tests skip): {exc}", stacklevel=1)
            _without_accounting.append(f"slurmdbd or MariaDB did not start: {exc}")
            info = embedded.up(accounting=False)
    except SnowpipeError as exc:
        pytest.fail(f"the embedded cluster did not come up: {exc}", pytrace=False)
    yield info
    if started_here:
        embedded.down()

"""Shared fixtures: the embedded local cluster for tests marked `cluster`."""

from tests.cluster_fixture import local_cluster  # noqa: F401

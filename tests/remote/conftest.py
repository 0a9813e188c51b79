"""A real 3-master Redis Cluster for the remote tier's tests, started once per test session.

Skipped (with the reason) only where ``redis-server`` is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.remote.cluster import MISSING, Cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three masters, no replicas, shared by the tests; each test clears it first
    (:func:`cluster`)."""
    if MISSING:
        pytest.skip(MISSING)
    cluster = Cluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Cluster:
    """The shared cluster, emptied."""
    redis_cluster.flush()
    return redis_cluster

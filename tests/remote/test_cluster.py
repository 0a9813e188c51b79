"""The fixture's cluster is a real Redis Cluster: keys spread over three masters."""

from __future__ import annotations

from redis.cluster import RedisCluster

from tests.remote.cluster import Cluster


def test_three_masters_serve_all_slots(cluster: Cluster) -> None:
    assert len(cluster.master_nodes()) == 3
    client = RedisCluster.from_url(cluster.url)
    try:
        for i in range(30):
            client.set(f"k{i}", i)
        per_node = [int(n.cli("DBSIZE")) for n in cluster.master_nodes()]
        assert sum(per_node) == 30 and all(per_node)
    finally:
        client.close()

"""The remote tier's faults on real clusters: a full Redis, a failover to a replica, a node that
stops answering (a partition), a breaker that fails fast. The store keeps everything locally and
catches up once Redis is back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from kvtier.errors import RemoteUnavailable
from kvtier.storage.manager import TierManager
from kvtier.storage.records import chain_hash
from kvtier.storage.remote import BlockMeta, Redis, RemoteBlock, RemoteTier
from tests.factories import NS
from tests.remote.cluster import MISSING, Cluster
from tests.remote.test_remote_tier import BS, remote_config, store_sequence, tokens_of


@pytest.fixture
def small_cluster(tmp_path) -> Iterator[Cluster]:
    """One master with 3 MB of memory and no eviction: Redis refuses writes when full."""
    if MISSING:
        pytest.skip(MISSING)
    cluster = Cluster(tmp_path / "small", masters=1,
                      extra=("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def wait_until(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_full_redis_is_counted_and_caught_up_on_the_next_save(tmp_path,
                                                                small_cluster: Cluster) -> None:
    with TierManager(remote_config(tmp_path, small_cluster, "a")) as a:
        tokens = tokens_of(40 * BS, seed=21)          # ~2.6 MB of f16 blocks: more than fits
        blocks = store_sequence(a, tokens)
        assert a.remote.drain(60)          # given up, not retried in a loop
        stats = a.remote.stats()
        assert stats.errors > 0 and stats.dropped > 0 and a.remote.redis.full
        assert all(a.block_entry(b) is not None for b in blocks)    # all kept locally
        node = small_cluster.nodes[0]
        node.cli("CONFIG", "SET", "maxmemory", "0")
        a.save_sequence(NS, a.sequences()[0].sequence, tokens, blocks)   # the next save
        assert a.remote.drain(60)
        chains = [RemoteBlock(NS, a.block_entry(b).chain) for b in blocks[:-1]]
        assert all(g is not None for g in a.remote.tier.get_blocks(chains))
        assert not a.remote.redis.full


def test_a_failover_to_a_replica_is_followed(tmp_path) -> None:
    if MISSING:
        pytest.skip(MISSING)
    cluster = Cluster(tmp_path / "replicated", masters=3, replicas=1).start()
    try:
        tier = RemoteTier(Redis(cluster.url), budget=1 << 30)
        blocks = [RemoteBlock(NS, bytes([i]) * 16) for i in range(30)]
        for block in blocks:
            tier.put_blocks([(block, BlockMeta(1, 1, 1, 3), [b"abc"])])
        cluster.nodes[0].kill()       # a master: its replica takes over
        errors_before = tier.redis.errors

        def works() -> bool:
            try:
                return all(g is not None for g in tier.get_blocks(blocks))
            except RemoteUnavailable:
                return False
        wait_until(works, timeout=60)
        assert tier.redis.errors >= errors_before
        assert tier.put_blocks([(RemoteBlock(NS, b"\xff" * 16), BlockMeta(1, 1, 1, 3),
                                 [b"new"])]) == 1
        tier.close()
    finally:
        cluster.stop()


def test_a_node_that_stops_answering_fails_fast_and_recovers(tmp_path,
                                                            cluster: Cluster) -> None:
    with TierManager(remote_config(tmp_path, cluster, "a")) as a:
        tokens = tokens_of(3 * BS, seed=31)
        for node in cluster.master_nodes():
            node.cli("CLIENT", "PAUSE", "3000", "ALL")   # a partition, as the client sees it
        blocks = store_sequence(a, tokens)
        with pytest.raises(RemoteUnavailable):
            a.remote.tier.get_blocks([RemoteBlock(NS, chain_hash(None, tokens[:BS]))])
        assert a.remote.stats().errors > 0 and not a.remote.stats().available
        # While the breaker is open, calls fail without touching the network.
        with pytest.raises(RemoteUnavailable):
            a.remote.tier.stored()
        # The request path degrades: no remote prefix, no exception.
        assert a.remote.fetch_prefix(NS, np.concatenate([tokens_of(2 * BS, 99)]), BS) == 0
        assert a.remote.drain(60)        # the pause ends: what was queued is sent
        assert a.remote.stats().available
        found = a.remote.tier.get_blocks([RemoteBlock(NS, a.block_entry(b).chain)
                                          for b in blocks])
        assert all(g is not None for g in found)

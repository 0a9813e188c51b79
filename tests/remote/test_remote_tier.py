"""The remote tier on a real 3-master Redis Cluster: content-addressed blocks in the codec's
records, the budget, write-behind from one store and reads into another."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.storage.catalog import SessionEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, chain_hash
from kvtier.storage.remote import BlockMeta, Redis, RemoteBlock, RemoteTier
from kvtier.storage.remote_link import REMOTE_VERSION
from tests.factories import NS, f16, make_config, make_layers
from tests.remote.cluster import Cluster

BS = 64


def tokens_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, n).astype(np.int32)


def store_sequence(manager: TierManager, tokens: np.ndarray, seed: int = 0) -> list[BlockId]:
    """Store a sequence of ``tokens`` as A's engine would: full blocks by chain hash, a tail."""
    seq = manager.new_sequence()
    blocks, parent = [], None
    for i in range(0, len(tokens), BS):
        part = tokens[i:i + BS]
        chain = chain_hash(parent, part) if len(part) == BS else None
        blocks.append(manager.put_block(BlockId(NS, seq, i // BS),
                                        make_layers(seed + i, n_tokens=len(part)), chain,
                                        hold=True))
        parent = chain
    manager.save_sequence(NS, seq, tokens, blocks)
    return blocks


def remote_config(tmp, cluster: Cluster, name: str, **kw):
    return make_config(tmp / name, **{"tiers.remote_url": cluster.url,
                                      "tiers.remote_format": "f16",
                                      "tiers.warm_format": "f16", **kw})


def test_blocks_are_content_addressed_records_in_one_key(cluster: Cluster) -> None:
    tier = RemoteTier(Redis(cluster.url), budget=1 << 30)
    try:
        block = RemoteBlock(NS, b"\x01" * 16)
        meta = BlockMeta(2, 64, 100, 10)
        assert tier.put_blocks([(block, meta, [b"r0", b"r1"])]) == 1
        assert tier.put_blocks([(block, meta, [b"other", b"other"])]) == 0  # stored once
        assert tier.get_blocks([block, RemoteBlock(NS, b"\x02" * 16)]) == [
            (meta, [b"r0", b"r1"]), None]
        assert tier.get_many([block.record_key(1), block.record_key(0)]) == [b"r1", b"r0"]
        assert list(tier.keys()) == [block.record_key(0), block.record_key(1)]
        assert tier.stored() == 10
        tier.delete([block.record_key(0)])
        assert tier.get_blocks([block]) == [None] and tier.stored() == 0
    finally:
        tier.close()


def test_budget_evicts_least_recently_used(cluster: Cluster) -> None:
    tier = RemoteTier(Redis(cluster.url), budget=250)
    try:
        blocks = [RemoteBlock(NS, bytes([i]) * 16) for i in range(3)]
        for b in blocks[:2]:
            tier.put_blocks([(b, BlockMeta(1, 1, 1, 100), [b"x"])])
        tier.get_blocks([blocks[0]])                # used: block 1 is now the oldest
        tier.put_blocks([(blocks[2], BlockMeta(1, 1, 1, 100), [b"x"])])
        assert [r is not None for r in tier.get_blocks(blocks)] == [True, False, True]
        assert tier.stored() == 200 and tier.evictions == 1
    finally:
        tier.close()


def test_budget_evicts_by_measured_attention_before_recency(cluster: Cluster) -> None:
    tier = RemoteTier(Redis(cluster.url), budget=250)
    try:
        blocks = [RemoteBlock(NS, bytes([0x10 + i]) * 16) for i in range(3)]
        for b in blocks[:2]:
            tier.put_blocks([(b, BlockMeta(1, 1, 1, 100), [b"x"])])
        # Block 0 is the least recently used, but the queries attended to it and hardly to
        # block 1: by the tiers' priority (alpha/attention + beta*age) block 1 goes.
        tier.add_attention({blocks[0]: 8.0, blocks[1]: 0.1})
        tier.put_blocks([(blocks[2], BlockMeta(1, 1, 1, 100), [b"x"])])
        assert [r is not None for r in tier.get_blocks(blocks)] == [True, False, True]
        assert tier.stored() == 200 and tier.evictions == 1
        tier.delete_blocks([blocks[0], blocks[2]])
    finally:
        tier.close()


def test_a_servers_measured_attention_reaches_the_remote_blocks(tmp_path,
                                                                cluster: Cluster) -> None:
    tokens = tokens_of(2 * BS, seed=13)
    with TierManager(remote_config(tmp_path, cluster, "a")) as a:
        stored = store_sequence(a, tokens)
        assert a.remote.drain(30)
        a.report_attention({stored[0]: 3.0, stored[1]: 0.5})
        assert a.remote.drain(30)
        first = RemoteBlock(NS, chain_hash(None, tokens[:BS])).redis_key
        second = RemoteBlock(NS, chain_hash(chain_hash(None, tokens[:BS]),
                                            tokens[BS:2 * BS])).redis_key
        values = a.remote.tier.redis.call(lambda c: [
            float(c.hget(k, b"a")) for k in (first, second)])
    assert values[0] == pytest.approx(3.0, rel=1e-3) and values[1] == pytest.approx(0.5, rel=1e-3)


def test_a_prefix_stored_by_one_server_is_read_by_another(tmp_path, cluster: Cluster) -> None:
    tokens = tokens_of(3 * BS + 10)
    with TierManager(remote_config(tmp_path, cluster, "a")) as a:
        stored = store_sequence(a, tokens)
        assert a.remote.drain(30)
        original = [a.get_block(b) for b in stored]
    assert int(cluster.master_nodes()[0].cli("DBSIZE")) >= 0
    with TierManager(remote_config(tmp_path, cluster, "b")) as b:
        assert b.match_prefix(NS, tokens, BS) == []
        assert b.remote.fetch_prefix(NS, tokens, BS) == 3
        found = b.match_prefix(NS, tokens, BS)
        assert len(found) == 3
        for got, want in zip(found, original):
            for lg, lw in zip(b.get_block(got), want):   # f16 remote: exact
                assert np.array_equal(f16(lg.k), f16(lw.k))
                assert np.array_equal(f16(lg.v), f16(lw.v))
        assert b.remote.stats().blocks_fetched == 3


def test_a_damaged_remote_record_is_recomputed_not_restored(tmp_path, cluster: Cluster) -> None:
    tokens = tokens_of(2 * BS, seed=5)
    with TierManager(remote_config(tmp_path, cluster, "a")) as a:
        store_sequence(a, tokens)
        assert a.remote.drain(30)
    key = RemoteBlock(NS, chain_hash(None, tokens[:BS])).redis_key
    redis = Redis(cluster.url)
    record = bytearray(redis.call(lambda c: c.hget(key, b"0")))
    record[-1] ^= 0xFF
    redis.call(lambda c: c.hset(key, b"0", bytes(record)))
    redis.close()
    with TierManager(remote_config(tmp_path, cluster, "b")) as b:
        assert b.remote.fetch_prefix(NS, tokens, BS) == 0
        assert b.match_prefix(NS, tokens, BS) == []


def test_a_session_written_by_one_server_is_resumed_by_another(tmp_path,
                                                               cluster: Cluster) -> None:
    tokens = tokens_of(2 * BS + 7, seed=3)
    with TierManager(remote_config(tmp_path, cluster, "a")) as a:
        blocks = store_sequence(a, tokens)
        seq = a.get_sequence(NS, 0) or a.sequences()[0]
        a.put_session(SessionEntry("s1", NS, seq.sequence, 1.0, 2.0, {"messages": ["m"]}))
        a.remote.publish("s1")
        assert a.remote.drain(30)
        assert a.get_session("s1").data[REMOTE_VERSION] == 1
        tail = a.get_block(blocks[-1])
    with TierManager(remote_config(tmp_path, cluster, "b")) as b:
        remote = b.remote.session("s1")
        assert remote is not None and remote.version == 1 and len(remote.blocks) == 3
        entry = b.remote.import_session(remote, None)
        assert entry.data["messages"] == ["m"] and entry.data[REMOTE_VERSION] == 1
        seq = b.get_sequence(NS, entry.sequence)
        assert np.array_equal(np.frombuffer(seq.tokens, "<i4"), tokens)
        assert len(seq.block_ids()) == 3
        got = b.get_block(seq.block_ids()[-1])
        assert np.array_equal(f16(got[0].k), f16(tail[0].k))
        # The tail is found by content too, as a local one is.
        assert b.match_tail(NS, b.block_entry(seq.block_ids()[1]).chain,
                            tokens[2 * BS:]) == seq.block_ids()[-1]


def test_default_format_is_the_cold_encoding(tmp_path, cluster: Cluster) -> None:
    from kvtier.config import TierConfig
    from kvtier.storage import codec
    default = TierConfig.model_fields["remote_format"].default
    assert default == TierConfig.model_fields["cold_format"].default
    tokens = tokens_of(BS, seed=9)
    with TierManager(remote_config(tmp_path, cluster, "a",
                                   **{"tiers.remote_format": default})) as a:
        store_sequence(a, tokens)
        assert a.remote.drain(30)
        (meta, records), = a.remote.tier.get_blocks([RemoteBlock(NS, chain_hash(None, tokens))])
    header = codec.read_header(records[1])
    want = codec.tier_format(default)
    assert header.zstd and (header.k.encoding, header.v.encoding) == \
        (want.key_format.encoding, want.value_format.encoding)


def test_inspect_and_compact_understand_the_remote_tier(tmp_path, cluster: Cluster,
                                                        capsys) -> None:
    from kvtier.cli import main
    tokens = tokens_of(2 * BS + 5, seed=11)
    config = remote_config(tmp_path, cluster, "a")
    with TierManager(config) as a:
        store_sequence(a, tokens)
        seq = a.sequences()[0]
        a.put_session(SessionEntry("old", NS, seq.sequence, 1.0, 1.0, {}))
        a.remote.publish("old")
        assert a.remote.drain(30)
    # Damage one record of the first block.
    key = RemoteBlock(NS, chain_hash(None, tokens[:BS])).redis_key
    redis = Redis(cluster.url)
    record = bytearray(redis.call(lambda c: c.hget(key, b"1")))
    record[-3] ^= 0x55
    redis.call(lambda c: c.hset(key, b"1", bytes(record)))
    args = ["--data-dir", str(config.data_path), "--set", f"tiers.remote_url={cluster.url}"]
    assert main(["inspect", "remote", "--check", "--json", *args]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert data["blocks"] == 3 and data["sessions"] == ["old"]
    assert data["check"]["damaged"] == [key.decode()]
    assert main(["compact", "--remote", "--scrub", "--max-age", "1d", "--json", *args]) == 0
    step = json.loads(capsys.readouterr().out)["steps"]["remote"]
    assert step["expired_sessions"] == 1 and step["damaged_blocks"] == 1
    assert step["blocks"] == 2
    assert redis.call(lambda c: c.exists(key)) == 0
    redis.close()

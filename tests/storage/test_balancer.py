"""The balancer moves blocks without holding the index's lock while it re-encodes them: the engine's
calls go on meanwhile, and a block pinned, deleted or stored anew while it is copied is never lost
or overwritten."""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, ChainHash, LayerKV, chain_hash
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, f16, make_config, make_layers

BELOW_WATERMARK = 17
"""Blocks of make_layers() the 1 MiB warm tier holds below its low watermark (18 are above it,
20 still within its budget)."""
PROMPTLY_S = 2.0


def chain(seed: int) -> ChainHash:
    return chain_hash(None, np.arange(64) + 1000 * seed)


def store(m: TierManager, sequence: int, layers: list[LayerKV] | None = None) -> BlockId:
    block = m.put_block(block_id(sequence, 0), layers or make_layers(sequence), chain(sequence))
    m.save_sequence(NS, sequence, np.arange(64) + 1000 * sequence, [block])
    return block


def keys_of(m: TierManager, block: BlockId, tier: Tier) -> list[bytes]:
    return [k for k in m.tiers[tier].keys() if k.startswith(block.to_bytes())]


@dataclass
class Moving:
    manager: TierManager
    block: BlockId
    """The block the background worker is re-encoding for the cool tier, stuck in transcode."""
    others: list[BlockId]
    """Pinned for the whole test, so that the worker moves nothing else."""
    release: threading.Event


@pytest.fixture
def moving(tmp_path, monkeypatch) -> Iterator[Moving]:
    started, release = threading.Event(), threading.Event()
    transcode = codec.transcode

    def slow_transcode(data, fmt):
        started.set()
        assert release.wait(60), "the test never let the transcode finish"
        return transcode(data, fmt)

    monkeypatch.setattr(codec, "transcode", slow_transcode)
    with TierManager(make_config(tmp_path), background=True) as m:
        others = [store(m, s) for s in range(1, BELOW_WATERMARK + 1)]
        m.drain()
        assert all(m.block_entry(b).tier == Tier.WARM for b in others)
        with m.pinned(others):
            block = store(m, 100)    # over the low watermark: the worker demotes it
            assert started.wait(30)
            try:
                yield Moving(m, block, others, release)
            finally:
                release.set()
                m.drain()


def test_engine_calls_do_not_wait_while_a_demotion_reencodes(moving):
    m = moving.manager
    start = time.monotonic()
    fresh = store(m, 200)
    assert m.find_hash(NS, chain(3)) == moving.others[2]
    assert m.match_prefix(NS, np.arange(64) + 1000 * 200, 64) == [fresh]
    assert len(m.get_block(moving.others[0])) == 4
    assert len(m.get_block(moving.block)) == 4    # readable where it is until the move commits
    assert time.monotonic() - start < PROMPTLY_S
    assert not moving.release.is_set() and m.block_entry(moving.block).tier == Tier.WARM

    moving.release.set()
    m.drain()
    assert m.block_entry(moving.block).tier == Tier.COOL
    assert keys_of(m, moving.block, Tier.WARM) == []
    for stat in m.stats():
        assert stat.stored_bytes <= stat.budget


def test_a_block_pinned_while_it_is_copied_stays_where_it_was(moving):
    m, block = moving.manager, moving.block
    with m.pinned([block]):
        moving.release.set()
        m.drain()
        assert m.block_entry(block).tier == Tier.WARM
        tier, values = m.read_records(block)
        assert tier == Tier.WARM and all(v is not None for v in values)
        assert keys_of(m, block, Tier.COOL) == []    # the abandoned copy is gone
        assert m.stats()[Tier.WARM].demotions == 0
    assert m.move(block, Tier.COOL)
    assert len(m.get_block(block)) == 4


def test_a_block_deleted_while_it_is_copied_leaves_nothing_behind(moving):
    m, block = moving.manager, moving.block
    m.delete_sequence(NS, block.sequence)
    assert m.block_entry(block) is None and m.find_hash(NS, chain(100)) is None
    moving.release.set()
    m.drain()
    assert all(keys_of(m, block, tier) == [] for tier in Tier)
    stats = m.stats()
    assert sum(s.corrupt for s in stats) == 0 and stats[Tier.WARM].demotions == 0
    assert m.check(fix=False).ok


def test_an_id_freed_while_its_old_block_is_copied_is_stored_after_the_copy_is_gone(moving):
    m, block = moving.manager, moving.block
    old = make_layers(100)
    new = make_layers(12345)
    m.delete_sequence(NS, block.sequence)
    stored: list[BlockId] = []
    writer = threading.Thread(target=lambda: stored.append(m.put_block(block, new)))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()    # waits: the old copy could overwrite the new records
    moving.release.set()
    writer.join(30)
    assert stored == [block]
    m.save_sequence(NS, block.sequence, np.arange(64), [block])
    m.drain()
    back = m.get_block(block)

    def distance(layers: list[LayerKV]) -> float:
        return float(np.mean([np.abs(f16(a.k) - f16(b.k)).mean() for a, b in zip(layers, back)]))

    assert distance(new) < distance(old) / 10
    assert m.check(fix=False).ok


def test_budgets_hold_after_every_call_while_the_worker_demotes(tmp_path):
    with TierManager(make_config(tmp_path), background=True) as m:
        for sequence in range(1, 60):
            store(m, sequence)
            for stat in m.stats():
                assert stat.stored_bytes <= stat.budget, stat
        m.drain()
        assert m.stats()[Tier.COOL].blocks > 0
        assert m.check(fix=False).ok

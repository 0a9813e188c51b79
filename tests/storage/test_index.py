"""The in-memory block index: usage per tier, hashes, pins, moves, access statistics."""

from dataclasses import replace

import pytest

from kvtier.storage.catalog import BlockEntry
from kvtier.storage.index import BlockIndex
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id

A, B, C = block_id(1, 0), block_id(1, 1), block_id(2, 0)


def entry(tier: Tier = Tier.WARM, stored: int = 100, chain: bytes = b"") -> BlockEntry:
    return BlockEntry(tier=tier, stored_bytes=stored, raw_bytes=4 * stored, n_layers=2,
                      n_tokens=64, refs=1, chain=chain, created=1.0, last_access=1.0, hits=1.0)


@pytest.fixture
def index():
    return BlockIndex([(A, entry()), (B, entry(stored=50)), (C, entry(Tier.COOL, 30, b"h" * 16))],
                      [(NS + b"h" * 16, C)])


def test_usage_follows_adds_moves_and_removals(index):
    assert (index.usage[Tier.WARM].blocks, index.usage[Tier.WARM].stored_bytes) == (2, 150)
    assert index.usage[Tier.WARM].raw_bytes == 600
    index.add(A, replace(index.get(A), tier=Tier.COOL, stored_bytes=20))
    assert index.usage[Tier.WARM].stored_bytes == 50
    assert (index.usage[Tier.COOL].blocks, index.usage[Tier.COOL].stored_bytes) == (2, 50)
    assert index.remove(C).tier is Tier.COOL
    assert index.find_hash(NS + b"h" * 16) is None    # the hash went with its block
    assert index.remove(C) is None
    assert (index.usage[Tier.COOL].blocks, index.usage[Tier.COOL].stored_bytes) == (1, 20)


def test_touch_decays_then_counts_and_marks_dirty(index):
    touched = index.touch(A, now=3601.0, half_life_s=3600.0)
    assert touched.hits == pytest.approx(1.5) and touched.last_access == 3601.0
    index.add_attention({B: 2.0, block_id(9, 9): 1.0}, now=7200.0, half_life_s=3600.0)
    assert dict(index.take_dirty()) == {A: touched, B: replace(index.get(B), attention=2.0,
                                                               last_access=7200.0)}
    assert index.take_dirty() == []
    assert index.touch(block_id(9, 9), 1.0, 1.0) is None


def test_pinned_and_moving_blocks_are_no_candidates_and_not_movable(index):
    index.pin([A, A])
    index.unpin([A])
    assert index.movable(A) is None
    move = index.begin_move(B, Tier.COOL)
    assert index.movable(B) is None
    assert {c.key: c.pinned for c in index.candidates(Tier.WARM)} == {A: True, B: True}
    assert index.leaving(Tier.WARM) == 50 and index.leaving(Tier.COOL) == 0
    assert index.may_commit(B, move)
    index.pin([B])
    assert not index.may_commit(B, move)    # pinned mid-move: the copy must not commit
    index.unpin([B, A])
    index.end_move(B)
    assert index.movable(B) == index.get(B) and index.movable(A) == index.get(A)


def test_removing_a_moving_block_cancels_its_move(index):
    move = index.begin_move(B, Tier.COOL)
    index.remove(B)
    assert move.cancelled and not index.may_commit(B, move)
    assert index.leaving(Tier.WARM) == 0    # a cancelled move frees nothing


def test_promotions_do_not_count_as_leaving(index):
    index.begin_move(C, Tier.WARM)
    assert index.leaving(Tier.COOL) == 0


def test_reservations(index):
    index.reserve(Tier.WARM, 70)
    assert index.usage[Tier.WARM].reserved_bytes == 70
    index.release(Tier.WARM, 70)
    assert index.usage[Tier.WARM].reserved_bytes == 0


def test_attention_decays_then_adds_up(index):
    index.add_attention({B: 2.0}, now=0.0, half_life_s=3600.0)
    index.add_attention({B: 1.0}, now=3600.0, half_life_s=3600.0)
    assert index.get(B).attention == pytest.approx(2.0)    # 2 halved, plus 1

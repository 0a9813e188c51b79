"""Partial tails found by the tokens that continue them (TierManager.match_tail), on a real store:
keyed when a sequence names them, forgotten with them, kept across a reopen."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.storage.catalog import BlockEntry
from kvtier.storage.index import BlockIndex, TailKey
from kvtier.storage.manager import TierManager
from kvtier.storage.records import chain_hash
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, make_config, make_layers

BS = 64


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)


def store_sequence(m: TierManager, sequence: int, tokens: np.ndarray, tail_id: int = 0) -> list:
    """Full blocks under their chain hashes (shared if stored), then a tail under a fresh id
    (``tail_id`` as its sequence number, if given), as snapshots do."""
    ids, parent = [], None
    n_full = len(tokens) // BS
    for b in range(n_full):
        parent = chain_hash(parent, tokens[b * BS:(b + 1) * BS])
        ids.append(m.put_block(block_id(sequence, b), make_layers(b), parent))
    if len(tokens) % BS:
        ids.append(m.put_block(block_id(tail_id or sequence, n_full),
                               make_layers(99, n_tokens=len(tokens) % BS)))
    m.save_sequence(NS, sequence, tokens, ids)
    return ids


def parent_of(tokens: np.ndarray, n_full: int):
    parent = None
    for b in range(n_full):
        parent = chain_hash(parent, tokens[b * BS:(b + 1) * BS])
    return parent


def test_a_prompt_that_continues_a_stored_tail_finds_it(config):
    tokens = np.arange(2 * BS + 40, dtype=np.int32)
    with TierManager(config, background=False) as m:
        ids = store_sequence(m, 1, tokens)
        parent = parent_of(tokens, 2)
        follow_up = np.concatenate([tokens, [7, 8, 9]]).astype(np.int32)
        assert m.match_prefix(NS, follow_up, BS) == ids[:2]
        assert m.match_tail(NS, parent, follow_up[2 * BS:]) == ids[2]
        assert m.match_tail(NS, parent, tokens[2 * BS:]) == ids[2]          # exactly the tail
        assert m.match_tail(NS, parent, tokens[2 * BS:-1]) is None          # too short
        changed = follow_up.copy()
        changed[2 * BS + 5] = -1
        assert m.match_tail(NS, parent, changed[2 * BS:]) is None
        assert m.match_tail(NS, parent_of(changed, 1), follow_up[BS:]) is None  # wrong parent


def test_a_tail_at_the_start_of_a_sequence(config):
    tokens = np.arange(30, dtype=np.int32)
    with TierManager(config, background=False) as m:
        [tail] = store_sequence(m, 1, tokens)
        assert m.match_tail(NS, None, np.arange(50, dtype=np.int32)) == tail


def test_the_longest_continued_tail_wins(config):
    base = np.arange(BS, dtype=np.int32)
    short = np.concatenate([base, np.arange(10) + 1000]).astype(np.int32)
    long = np.concatenate([base, np.arange(30) + 1000]).astype(np.int32)
    with TierManager(config, background=False) as m:
        short_ids = store_sequence(m, 1, short)
        long_ids = store_sequence(m, 2, long)
        assert short_ids[0] == long_ids[0]  # the full block is shared
        prompt = np.concatenate([long, [5]]).astype(np.int32)
        assert m.match_tail(NS, parent_of(base, 1), prompt[BS:]) == long_ids[1]
        assert m.match_tail(NS, parent_of(base, 1), prompt[BS:BS + 20]) == short_ids[1]


def test_a_tail_is_forgotten_with_its_last_reference_and_kept_across_a_reopen(config):
    first = np.arange(BS + 20, dtype=np.int32)
    grown = np.arange(BS + 50, dtype=np.int32)
    parent = parent_of(first, 1)
    with TierManager(config, background=False) as m:
        old_tail = store_sequence(m, 1, first)[1]
        # The conversation grows: its new tail replaces the old one, which nobody names now.
        new_ids = store_sequence(m, 1, grown, tail_id=2)
        assert m.block_entry(old_tail) is None
        assert m.match_tail(NS, parent, first[BS:]) is None
        assert m.match_tail(NS, parent, grown[BS:]) == new_ids[1]
    with TierManager(config, background=False) as m:
        assert m.match_tail(NS, parent, grown[BS:]) == new_ids[1]
        entry = m.block_entry(new_ids[1])
        assert (entry.parent, entry.tail_chain) == (parent, chain_hash(parent, grown[BS:]))
        m.delete_sequence(NS, 1)
        assert m.match_tail(NS, parent, grown[BS:]) is None


def test_a_tail_moved_between_tiers_is_still_found(config):
    tokens = np.arange(BS + 20, dtype=np.int32)
    with TierManager(config, background=False) as m:
        tail = store_sequence(m, 1, tokens)[1]
        assert m.move(tail, Tier.COOL)
        assert m.match_tail(NS, parent_of(tokens, 1), tokens[BS:]) == tail


def test_a_sequence_whose_last_block_is_full_has_no_tail_key(config):
    tokens = np.arange(2 * BS, dtype=np.int32)
    with TierManager(config, background=False) as m:
        ids = store_sequence(m, 1, tokens)
        assert all(m.block_entry(b).tail_chain == b"" for b in ids)


def entry(n_tokens: int, chain: bytes = b"") -> BlockEntry:
    return BlockEntry(tier=Tier.WARM, stored_bytes=1, raw_bytes=1, n_layers=1, n_tokens=n_tokens,
                      chain=chain)


def test_tail_key_needs_the_blocks_to_hold_exactly_the_tokens():
    full = chain_hash(None, np.arange(BS))
    index = BlockIndex([(block_id(1, 0), entry(BS, full)), (block_id(1, 1), entry(20)),
                        (block_id(2, 0), entry(BS))])
    tokens = np.arange(BS + 20, dtype=np.int32)
    assert index.tail_key(tokens, [block_id(1, 0), block_id(1, 1)]) == TailKey(
        block_id(1, 1), full, chain_hash(full, tokens[BS:]))
    assert index.tail_key(tokens[:-1], [block_id(1, 0), block_id(1, 1)]) is None
    assert index.tail_key(tokens, [block_id(2, 0), block_id(1, 1)]) is None  # no parent hash
    assert index.tail_key(tokens[:BS], [block_id(1, 0)]) is None             # no tail
    assert index.tail_key(tokens, []) is None

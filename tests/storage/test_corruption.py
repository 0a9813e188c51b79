"""A damaged record is a typed error, the block is treated as missing, the rest keeps working."""

import pytest

from kvtier.errors import BlockCorrupt, BlockMissing
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, make_config, make_layers


def damage(tier, key: bytes, offset: int) -> None:
    value = bytearray(tier.get(key))
    value[offset % len(value)] ^= 0x10
    tier.put_many([(key, bytes(value))])


@pytest.mark.parametrize("tier_index", [Tier.WARM, Tier.COOL])
@pytest.mark.parametrize("offset", [5, 20, 300, -1])
def test_flipped_byte_is_block_corrupt_then_missing(tmp_path, tier_index, offset):
    with TierManager(make_config(tmp_path), background=False) as m:
        ids = [m.put_block(block_id(1, b), make_layers(b)) for b in range(3)]
        m.save_sequence(NS, 1, list(range(192)), ids)
        if tier_index == Tier.COOL:
            assert m.move(ids[1], Tier.COOL)
        assert m.block_entry(ids[1]).tier == tier_index
        damage(m.tiers[tier_index], ids[1].key(2).to_bytes(), offset)

        with pytest.raises(BlockCorrupt):
            m.get_block(ids[1])
        with pytest.raises(BlockMissing):
            m.get_block(ids[1])
        assert m.stats()[tier_index].corrupt == 1
        assert not any(k.startswith(ids[1].to_bytes()) for k in m.tiers[tier_index].keys())
        assert len(m.get_block(ids[0])) == len(m.get_block(ids[2])) == 4
        # New blocks still go in and come out.
        m.put_block(block_id(2, 0), make_layers(9))
        assert len(m.get_block(block_id(2, 0))) == 4


def test_corrupt_block_found_while_demoting_is_dropped_not_moved(tmp_path):
    with TierManager(make_config(tmp_path), background=False) as m:
        m.put_block(block_id(1, 0), make_layers(0))
        damage(m.tiers[Tier.WARM], block_id(1, 0).key(0).to_bytes(), 100)
        assert not m.move(block_id(1, 0), Tier.COOL)
        assert m.block_entry(block_id(1, 0)) is None
        assert list(m.tiers[Tier.COOL].keys()) == [] and list(m.tiers[Tier.WARM].keys()) == []
        assert m.stats()[Tier.WARM].corrupt == 1

"""The invariant checker: what it finds without fixing, and one fixing pass that leaves nothing."""

import numpy as np

from kvtier.storage.catalog import Catalog
from kvtier.storage.checker import Kind
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, make_config, make_layers

EXPECTED_FIX = {"missing_blocks": 1, "truncated_sequences": 1, "unreferenced_blocks": 1,
                "reference_counts": 1, "orphan_records": 1}


def damaged_store(m: TierManager) -> list:
    """Sequence 1 is blocks 0-3, sequence 2 blocks 0 and 2; block 1 loses two layers and a
    stray record lands in the cool tier."""
    ids = [m.put_block(block_id(1, b), make_layers(b)) for b in range(4)]
    m.save_sequence(NS, 1, np.arange(256), ids)
    m.save_sequence(NS, 2, np.arange(128), [ids[0], ids[2]])
    m.tiers[Tier.WARM].delete(ids[1].record_keys(4)[1:3])
    m.tiers[Tier.COOL].put_many([(block_id(9, 0).key(0).to_bytes(), b"stray")])
    return ids


def test_one_fixing_pass_leaves_nothing_to_fix(tmp_path):
    with TierManager(make_config(tmp_path), background=False) as m:
        ids = damaged_store(m)
        found = m.check(fix=False)
        assert found.counts() == {Kind.MISSING_RECORD.value: 1, Kind.ORPHAN_RECORD.value: 1}
        assert found.repair.counts() == EXPECTED_FIX and found.fixed == {}

        assert m.check(fix=True).fixed == EXPECTED_FIX
        assert m.get_sequence(NS, 1).block_ids() == ids[:1]    # cut before the lost block
        assert m.get_sequence(NS, 2).block_ids() == [ids[0], ids[2]]
        assert (m.block_entry(ids[0]).refs, m.block_entry(ids[2]).refs) == (2, 1)
        assert m.block_entry(ids[1]) is None and m.block_entry(ids[3]) is None
        assert {k[:len(ids[0].to_bytes())] for t in m.tiers for k in t.keys()} == {
            ids[0].to_bytes(), ids[2].to_bytes()}
        again = m.check(fix=True)
        assert again.ok and again.fixed == {}


def test_a_store_not_closed_cleanly_is_fixed_when_opened(tmp_path):
    config = make_config(tmp_path)
    with TierManager(config, background=False) as m:
        damaged_store(m)
    catalog = Catalog(config.data_path / "catalog")
    catalog.set_clean(False)
    catalog.close()
    with TierManager(config, background=False) as m:
        assert m.repaired == EXPECTED_FIX
        assert m.check(fix=False).ok
    with TierManager(config, background=False) as m:
        assert m.repaired == {}

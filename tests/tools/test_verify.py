from dataclasses import replace

import pytest

from kvtier.storage.checker import Kind
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import Tier
from kvtier.storage.view import block_name
from tests.factories import NS
from tests.tools.damage import catalog, delete_records, flip_byte, put_record
from tests.tools.stores import (FULL_BLOCKS, N_LAYERS, N_SESSIONS, SHARED_BLOCKS,
                                expected_blocks, session_id, store_config)


def own_block(built, tier: Tier, shared: bool = False) -> tuple[str, BlockId]:
    """A session and one of its own blocks (or, with ``shared``, any of its blocks) that lives
    in ``tier``."""
    for sid, seq in built.sequences.items():
        blocks = [BlockId(NS, seq, b) for b in range(SHARED_BLOCKS, FULL_BLOCKS + 1)]
        if shared:
            blocks = [BlockId(NS, 1, b) for b in range(SHARED_BLOCKS)] + blocks
        for block in blocks:
            if built.placement[block] == tier:
                return sid, block
    raise AssertionError(f"no block in {tier.label}")


def problems_of(data: dict, kind: Kind) -> list[dict]:
    return [p for p in data["problems"] if p["kind"] == kind.value]


def test_a_sound_store_verifies(cli):
    data = cli.json("inspect", "verify")
    assert data["ok"] and data["problems"] == []
    n_records = expected_blocks() * N_LAYERS
    assert data["checked"] == {
        "blocks": expected_blocks(), "record_keys": n_records, "records_read": n_records,
        "sequences": N_SESSIONS + 1, "sessions": N_SESSIONS,
        "hashes": SHARED_BLOCKS + N_SESSIONS * (FULL_BLOCKS - SHARED_BLOCKS)}
    code, out, _ = cli("inspect", "verify")
    assert code == 0 and "ok: no problems" in out


@pytest.mark.parametrize("tier", [Tier.WARM, Tier.COOL, Tier.COLD])
@pytest.mark.parametrize("quick", [False, True])
def test_verify_finds_a_flipped_byte(cli, built, tier, quick):
    _, block = own_block(built, tier, shared=True)
    flip_byte(store_config(built.path), tier, block, layer=2)
    data = cli.json("inspect", "verify", *(["--quick"] if quick else []), expect=1)
    assert not data["ok"]
    assert data["problem_counts"] == {"corrupt_record": 1}
    (problem,) = data["problems"]
    assert (problem["subject"], problem["tier"], problem["layer"]) == (
        block_name(block), tier.label, 2)
    assert "checksum" in problem["detail"]

    code, out, _ = cli("inspect", "verify")
    assert code == 1 and "corrupt_record" in out and block_name(block) in out


def test_verify_finds_a_deleted_block_and_a_missing_layer(cli, built):
    _, gone = own_block(built, Tier.COOL)
    delete_records(store_config(built.path), Tier.COOL, gone, range(N_LAYERS))
    _, partial = own_block(built, Tier.WARM)
    delete_records(store_config(built.path), Tier.WARM, partial, [1, 2])
    data = cli.json("inspect", "verify", expect=1)
    missing = {p["subject"]: p for p in problems_of(data, Kind.MISSING_RECORD)}
    assert set(missing) == {block_name(gone), block_name(partial)}
    assert missing[block_name(gone)]["detail"] == f"layers 0-{N_LAYERS - 1} of {N_LAYERS} are " \
                                                  "not in cool"
    assert missing[block_name(partial)]["detail"] == f"layers 1-2 of {N_LAYERS} are not in warm"
    assert data["problem_counts"] == {"missing_record": 2}


def test_verify_finds_orphans_and_broken_catalog_references(cli, built):
    config = store_config(built.path)
    stray = BlockId(NS, 999, 0).key(0).to_bytes()
    put_record(config, Tier.COLD, stray, b"not a record")
    victim = session_id(5)
    seq = built.sequences[victim]
    _, wrong_chain = own_block(built, Tier.WARM)
    with catalog(config) as txn:
        txn.delete_sequence(NS, seq)
        txn.put_block(wrong_chain, replace(txn.get_block(wrong_chain), chain=b"x" * 16))
    data = cli.json("inspect", "verify", expect=1)
    by_kind = {kind: {p["subject"] for p in problems_of(data, kind)} for kind in Kind}
    assert by_kind[Kind.ORPHAN_RECORD] == {stray.hex()}
    assert by_kind[Kind.DANGLING_SESSION] == {victim}
    own = {block_name(BlockId(NS, seq, b)) for b in range(SHARED_BLOCKS, FULL_BLOCKS + 1)}
    shared = {block_name(BlockId(NS, 1, b)) for b in range(SHARED_BLOCKS)}
    assert by_kind[Kind.UNREFERENCED_BLOCK] == own
    assert by_kind[Kind.REFCOUNT_MISMATCH] == shared
    assert by_kind[Kind.CHAIN_MISMATCH] == {block_name(wrong_chain)}
    assert by_kind[Kind.UNINDEXED_BLOCK] == {block_name(wrong_chain)}
    assert len(by_kind[Kind.STALE_HASH]) == 1


def test_compact_repairs_what_verify_finds(cli, built):
    config = store_config(built.path)
    corrupt_session, corrupt = own_block(built, Tier.COOL)
    flip_byte(config, Tier.COOL, corrupt, layer=0)
    missing_session, missing = own_block(built, Tier.WARM)
    delete_records(config, Tier.WARM, missing, range(N_LAYERS))
    put_record(config, Tier.COLD, BlockId(NS, 999, 0).key(0).to_bytes(), b"junk")
    assert cli.json("inspect", "verify", expect=1)["problem_counts"] == {
        "corrupt_record": 1, "missing_record": 1, "orphan_record": 1}

    report = cli.json("compact", "--scrub")
    assert report["steps"]["scrub"]["corrupt_blocks"] == [block_name(corrupt)]
    found = report["steps"]["repair"]["found"]
    assert (found["missing_blocks"], found["truncated_sequences"]) == (1, 2)
    assert found["orphan_records"] >= 1
    assert report["remaining_problems"] == {}
    assert cli.json("inspect", "verify")["ok"]

    with TierManager(config, background=False) as m:
        for sid in (corrupt_session, missing_session):
            seq = m.get_sequence(NS, built.sequences[sid])
            damaged = corrupt if sid == corrupt_session else missing
            assert len(seq.blocks) == damaged.block    # truncated where the damage was
            for block in seq.block_ids():
                assert len(m.get_block(block)) == N_LAYERS

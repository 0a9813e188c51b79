"""Both tier stores behind one interface: LMDB (warm) and a RocksDB column family (cool, cold)."""

import os

import pytest

from kvtier.errors import TierFull
from kvtier.storage.tiers import LMDB_PAGE, LmdbTier, RocksStore, RocksTier, Tier, TierStore

MAP_SIZE = 8 * 1024**2


@pytest.fixture(params=["lmdb", "rocksdb"])
def store(request, tmp_path):
    if request.param == "lmdb":
        tier: TierStore = LmdbTier(tmp_path / "warm", map_size=MAP_SIZE)
        yield tier
        tier.close()
        return
    rocks = RocksStore(tmp_path / "rocks", ["cool", "cold"])
    tier = RocksTier(rocks, "cool")
    yield tier
    tier.close()
    rocks.close()


def key(i: int) -> bytes:
    return i.to_bytes(4, "big")


def test_put_get_contains_delete_keys(store):
    store.put_many([(key(i), bytes([i]) * 100) for i in (3, 1, 2)])
    assert store.get(key(1)) == b"\x01" * 100
    assert store.get(key(9)) is None
    assert store.get_many([key(2), key(9), key(3)]) == [b"\x02" * 100, None, b"\x03" * 100]
    assert store.contains(key(3)) and not store.contains(key(9))
    assert list(store.keys()) == [key(1), key(2), key(3)]
    store.delete([key(2), key(9)])
    assert list(store.keys()) == [key(1), key(3)]
    assert not store.contains(key(2))
    assert store.disk_bytes() > 0


def test_read_many_hands_values_for_the_call_only(store):
    store.put_many([(key(1), b"abc"), (key(2), b"defg")])
    copied = store.read_many([key(1), key(2), key(3)],
                              lambda values: [None if v is None else bytes(v) for v in values])
    assert copied == [b"abc", b"defg", None]


def test_lmdb_reads_are_zero_copy(tmp_path):
    tier = LmdbTier(tmp_path / "warm", map_size=MAP_SIZE)
    try:
        tier.put_many([(key(1), b"x" * 10_000)])
        kinds = tier.read_many([key(1)], lambda values: [type(v) for v in values])
        assert kinds == [memoryview]    # a view into the memory map, no copy
    finally:
        tier.close()


def test_a_full_lmdb_map_is_tier_full_and_keeps_what_it_had(tmp_path):
    tier = LmdbTier(tmp_path / "warm", map_size=64 * 1024)
    try:
        tier.put_many([(key(1), b"kept")])
        with pytest.raises(TierFull):
            tier.put_many([(key(2), b"y" * 40_000), (key(3), b"z" * 40_000)])
        assert list(tier.keys()) == [key(1)]    # all or nothing
    finally:
        tier.close()


def test_lmdb_stored_bytes_count_whole_overflow_pages(tmp_path):
    tier = LmdbTier(tmp_path / "warm", map_size=MAP_SIZE)
    try:
        assert tier.stored_bytes(1) == LMDB_PAGE
        assert tier.stored_bytes(LMDB_PAGE - 16) == LMDB_PAGE
        assert tier.stored_bytes(LMDB_PAGE) == 2 * LMDB_PAGE
    finally:
        tier.close()


def test_lmdb_compact_shrinks_the_file_and_keeps_every_record(tmp_path):
    tier = LmdbTier(tmp_path / "warm", map_size=MAP_SIZE)
    try:
        tier.put_many([(key(i), os.urandom(20_000)) for i in range(100)])
        kept = {k: tier.get(k) for k in map(key, range(0, 100, 10))}
        tier.delete([key(i) for i in range(100) if i % 10])
        before = tier.file_stats()
        assert before.free_bytes > 0.5 * before.file_bytes
        tier.compact()
        after = tier.file_stats()
        assert after.file_bytes < before.file_bytes / 2 and after.free_bytes < LMDB_PAGE * 4
        assert os.path.getsize(tier.path / "data.mdb") < before.file_bytes / 2
        assert {k: tier.get(k) for k in kept} == kept
        assert not tier.scratch_path.exists()
    finally:
        tier.close()


def test_rocksdb_compact_collects_blob_garbage(tmp_path):
    rocks = RocksStore(tmp_path / "rocks", ["cool", "cold"])
    cool, cold = RocksTier(rocks, "cool"), RocksTier(rocks, "cold")
    try:
        cool.put_many([(key(i), os.urandom(20_000)) for i in range(50)])
        cold.put_many([(key(1), b"cold")])
        cool.compact()
        full = cool.file_stats()
        cool.delete([key(i) for i in range(45)])
        assert cool.file_stats().pending_deletes == 45
        cool.compact()
        after = cool.file_stats()
        assert after.blob_garbage_bytes == 0 and after.pending_deletes == 0
        assert after.files_bytes < full.files_bytes / 4
        assert list(cool.keys()) == [key(i) for i in range(45, 50)]
        assert cold.get(key(1)) == b"cold" and cool.get(key(1)) is None    # families apart
    finally:
        cool.close()
        cold.close()
        rocks.close()


def test_tier_labels():
    assert [t.label for t in Tier] == ["warm", "cool", "cold"]
    assert Tier.from_label("cool") is Tier.COOL
    with pytest.raises(ValueError, match="tiers are warm, cool, cold"):
        Tier.from_label("hot")

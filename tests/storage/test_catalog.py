"""The catalog: typed entries round-trip, the after-commit hook runs only on commit, iteration,
the format version."""

import struct

import msgpack
import pytest

from kvtier.storage.catalog import BlockEntry, Catalog, SequenceEntry, SessionEntry
from kvtier.storage.records import ChainHash, namespace_of
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id

ENTRY = BlockEntry(tier=Tier.COOL, stored_bytes=4096, raw_bytes=16384, n_layers=4, n_tokens=64,
                   refs=2, chain=b"c" * 16, created=1.5, last_access=2.5, hits=3.25,
                   attention=0.75)


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog")
    yield cat
    cat.close()


def test_entries_round_trip(catalog):
    seq = SequenceEntry(NS, 7, b"\x01\x00\x00\x00" * 3, (block_id(7, 0).to_bytes(),), 1.0, 2.0)
    session = SessionEntry("s", NS, 7, 1.0, 2.0, {"messages": [{"role": "user"}]})
    with catalog.write() as txn:
        txn.put_block(block_id(7, 0), ENTRY)
        txn.put_hash(NS, ChainHash(b"c" * 16), block_id(7, 0))
        txn.put_sequence(seq)
        txn.put_session(session)
    with catalog.read() as txn:
        back = txn.get_block(block_id(7, 0))
        assert back == ENTRY and back.tier is Tier.COOL
        assert txn.find_hash(NS, ChainHash(b"c" * 16)) == block_id(7, 0)
        assert txn.get_sequence(NS, 7) == seq
        assert txn.get_sequence(NS, 7).block_ids() == [block_id(7, 0)]
        assert txn.get_session("s") == session
        assert txn.get_block(block_id(7, 1)) is None


def test_a_tier_is_stored_as_its_int_and_old_entries_read_unchanged():
    assert msgpack.unpackb(ENTRY.pack())[0] == 1
    old = msgpack.packb([2, 100, 200, 4, 64, 1, b"", 0.0, 0.0, 0.0, -1.0])
    entry = BlockEntry.unpack(old)
    assert entry.tier is Tier.COLD and (entry.stored_bytes, entry.refs) == (100, 1)


def test_after_commit_hooks_run_in_order_once_the_change_is_visible(catalog):
    seen = []

    def hook(name):
        def run():
            with catalog.read() as txn:
                seen.append((name, txn.get_block(block_id(1, 0)) is not None))
        return run

    with catalog.write() as txn:
        txn.put_block(block_id(1, 0), ENTRY)
        txn.after_commit(hook("first"))
        txn.after_commit(hook("second"))
        assert seen == []
    assert seen == [("first", True), ("second", True)]


def test_after_commit_hooks_never_run_when_the_transaction_aborts(catalog):
    ran = []
    with pytest.raises(KeyError):
        with catalog.write() as txn:
            txn.put_block(block_id(1, 0), ENTRY)
            txn.after_commit(lambda: ran.append(True))
            raise KeyError("abort")
    assert ran == []
    with catalog.read() as txn:
        assert txn.get_block(block_id(1, 0)) is None
        with pytest.raises(TypeError):
            txn.after_commit(lambda: None)


def test_iteration(catalog):
    other = namespace_of(b"other")
    with catalog.write() as txn:
        for b in (2, 0, 1):
            txn.put_block(block_id(3, b), ENTRY)
        for sid in ("b", "a", "c"):
            txn.put_session(SessionEntry(sid, NS, 1, 0.0, 0.0))
        txn.put_meta(b"ns:" + NS, b"one")
        txn.put_meta(b"ns:" + other, b"two")
        txn.put_meta(b"nt", b"not a namespace")
        first, second = txn.next_sequence(), txn.next_sequence()
    assert second == first + 1
    with catalog.read() as txn:
        assert [b for b, _ in txn.iter_blocks()] == [block_id(3, b) for b in range(3)]
        assert [s.session_id for s in txn.iter_sessions()] == ["a", "b", "c"]
        assert [s.session_id for s in txn.iter_sessions(after="a")] == ["b", "c"]
        assert [s.session_id for s in txn.iter_sessions(after="bb")] == ["c"]
        assert list(txn.iter_sessions(after="c")) == []
        assert dict(txn.iter_meta(b"ns:")) == {b"ns:" + NS: b"one", b"ns:" + other: b"two"}
        assert list(txn.iter_meta(b"zz")) == []


def test_a_catalog_of_another_format_is_refused(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    with catalog.write() as txn:
        txn.put_meta(b"version", struct.pack(">Q", 99))
    catalog.close()
    with pytest.raises(RuntimeError, match="format 99"):
        Catalog(tmp_path / "catalog")


def test_clean_flag(catalog):
    assert not catalog.was_clean()
    catalog.set_clean(True)
    assert catalog.was_clean()

import numpy as np
import pytest

from kvtier.storage.records import BlockId, BlockKey, chain_hash, namespace_of

NS = namespace_of(b"model")


def test_block_key_round_trip_and_width():
    key = BlockKey(NS, 2**40 + 7, 123456, 29)
    data = key.to_bytes()
    assert len(data) == BlockKey.BYTES == 30
    assert BlockKey.from_bytes(data) == key
    assert key.block_id == BlockId(NS, 2**40 + 7, 123456)


def test_block_id_round_trip_and_prefix_of_its_keys():
    block = BlockId(NS, 5, 9)
    assert BlockId.from_bytes(block.to_bytes()) == block
    assert block.key(3).to_bytes().startswith(block.to_bytes())


def test_keys_sort_bytewise_by_sequence_then_block_then_layer():
    keys = [BlockKey(NS, s, b, layer) for s in (1, 2, 300) for b in (0, 1, 70000)
            for layer in (0, 1, 29)]
    assert sorted(keys, key=lambda k: k.to_bytes()) == sorted(keys)


def test_bad_lengths_are_rejected():
    with pytest.raises(ValueError):
        BlockKey.from_bytes(b"\0" * 29)
    with pytest.raises(ValueError):
        BlockId(b"short", 1, 1).to_bytes()


def test_chain_hash_depends_on_parent_and_tokens():
    a = np.arange(256, dtype=np.int32)
    h1 = chain_hash(None, a)
    assert h1 == chain_hash(None, a.copy()) and len(h1) == 16
    assert chain_hash(h1, a) != h1
    b = a.copy()
    b[-1] += 1
    assert chain_hash(None, b) != h1
    assert chain_hash(h1, a) != chain_hash(chain_hash(None, b), a)

"""Ways to damage a closed store behind the tier manager's back, for verify and compact tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kvtier.config import Config
from kvtier.storage.catalog import Catalog, CatalogTxn
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import LmdbTier, RocksStore, RocksTier, Tier, TierStore


@contextmanager
def raw_tier(config: Config, tier: Tier) -> Iterator[TierStore]:
    if tier == Tier.WARM:
        lmdb_tier = LmdbTier(config.warm_path, map_size=config.tiers.host_ram_budget)
        try:
            yield lmdb_tier
        finally:
            lmdb_tier.close()
        return
    path = config.cool_path if tier == Tier.COOL else config.cold_path
    store = RocksStore(path, [Tier.COOL.label, Tier.COLD.label])
    rocks_tier = RocksTier(store, tier.label)
    try:
        yield rocks_tier
    finally:
        rocks_tier.close()
        store.close()


def flip_byte(config: Config, tier: Tier, block: BlockId, layer: int, offset: int = -7) -> None:
    """Flip one bit of one byte of a record (by default in its payload)."""
    with raw_tier(config, tier) as t:
        key = block.key(layer).to_bytes()
        value = bytearray(t.get(key))
        value[offset] ^= 0x10
        t.put_many([(key, bytes(value))])


def delete_records(config: Config, tier: Tier, block: BlockId, layers: Sequence[int]) -> None:
    with raw_tier(config, tier) as t:
        t.delete([block.key(layer).to_bytes() for layer in layers])


def put_record(config: Config, tier: Tier, key: bytes, value: bytes) -> None:
    with raw_tier(config, tier) as t:
        t.put_many([(key, value)])


@contextmanager
def catalog(config: Config) -> Iterator[CatalogTxn]:
    cat = Catalog(config.data_path / "catalog")
    try:
        with cat.write() as txn:
            yield txn
    finally:
        cat.close()

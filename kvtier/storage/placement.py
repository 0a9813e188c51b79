"""Where blocks are: the catalog, its in-memory index and the tier stores, changed together.

Record data is written before the catalog entry that names it, and deleted only after the entry's
removal commits (the catalog's after-commit hook, here and nowhere else): a crash in between
leaves records that no entry names, which the invariant checker collects, never an entry without
its data. Hold the index's lock across a catalog transaction that changes blocks, so that the
index changes with the commit and no one sees it between the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvtier.storage.catalog import BlockEntry, Catalog, CatalogTxn
from kvtier.storage.index import BlockIndex
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import TierStore


class Placement:
    """The catalog, the index that mirrors its blocks, and the tier stores, in tier order."""

    def __init__(self, catalog: Catalog, index: BlockIndex, tiers: Sequence[TierStore]) -> None:
        self.catalog = catalog
        self.index = index
        self.tiers = list(tiers)

    def unlink(self, txn: CatalogTxn, block: BlockId) -> BlockEntry | None:
        """Remove a block's entry (and the content hash leading to it) in ``txn``; once that
        commits, the index forgets the block and its records are deleted."""
        entry = self.index.get(block)
        if entry is None:
            return None
        txn.delete_block(block)
        txn.delete_summary(block)
        if entry.chain and self.index.hash_owner(block.namespace + entry.chain) == block:
            txn.delete_hash(block.namespace, entry.chain)
        txn.after_commit(lambda: self._delete(block))
        return entry

    def _delete(self, block: BlockId) -> None:
        entry = self.index.remove(block)
        if entry is not None:
            self.tiers[entry.tier].delete(block.record_keys(entry.n_layers))

    def forget(self, blocks: Iterable[BlockId]) -> None:
        """Remove blocks, their entries and their records."""
        with self.index.lock, self.catalog.write() as txn:
            for block in blocks:
                self.unlink(txn, block)

    def flush_stats(self) -> None:
        """Write access statistics (hits, last access, attention) to the catalog."""
        with self.index.lock:
            dirty = self.index.take_dirty()
            if dirty:
                with self.catalog.write() as txn:
                    for block, entry in dirty:
                        txn.put_block(block, entry)

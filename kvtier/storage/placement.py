"""Where blocks are: the catalog, its in-memory index and the tier stores, changed together.

Record data is written before the catalog entry that names it, and deleted only after the entry's
removal commits (the catalog's after-commit hook, here and nowhere else): a crash in between
leaves records that no entry names, which the invariant checker collects, never an entry without
its data. Hold the index's lock across a catalog transaction that changes blocks, so that the
index changes with the commit and no one sees it between the two.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from kvtier.errors import WriteFailed
from kvtier.storage.catalog import BlockEntry, Catalog, CatalogTxn
from kvtier.storage.index import BlockIndex
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import TierStore

log = logging.getLogger(__name__)


class Placement:
    """The catalog, the index that mirrors its blocks, and the tier stores, in tier order."""

    def __init__(self, catalog: Catalog, index: BlockIndex, tiers: Sequence[TierStore]) -> None:
        self.catalog = catalog
        self.index = index
        self.tiers = list(tiers)
        self.needs_repair = False
        """Blocks were removed that sequences may still name (quarantined or dropped): the
        reference repair runs before the store is next marked clean."""
        self.retired: set[BlockId] = set()
        """Ids of removed blocks that sequences may still name: never given to a new block
        before the repair cuts those sequences (a new block under an old id would pass for
        the old one's content)."""

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
            try:
                self.tiers[entry.tier].delete(block.record_keys(entry.n_layers))
            except WriteFailed as exc:
                # Its entry is gone, so nothing reads them: they are orphans the checker
                # collects once writes work again.
                log.warning("records of removed block %s stay behind: %s", block, exc)

    def forget(self, blocks: Iterable[BlockId]) -> None:
        """Remove blocks, their entries and their records."""
        blocks = list(blocks)
        with self.index.lock, self.catalog.write() as txn:
            for block in blocks:
                entry = self.index.get(block)
                if entry is not None and entry.refs:
                    self.needs_repair = True
                    self.retired.add(block)
                self.unlink(txn, block)

    def quarantine(self, blocks: Sequence[BlockId], reason: str) -> None:
        """Take unreadable blocks out of the store: their entries go (the next lookup is a miss,
        and the caller recomputes), their records are deleted where the tier still takes
        writes, and sequences naming them are cut when the store is repaired."""
        log.warning("quarantined %d unreadable blocks (%s): %s", len(blocks),
                    ", ".join(str(b.block) for b in blocks[:4]), reason)
        try:
            self.forget(blocks)
        except WriteFailed as exc:
            # The catalog takes no writes: drop them from the index alone, so they are misses
            # now; the catalog entries go when the checker next runs.
            log.warning("the catalog keeps %d quarantined blocks until repaired: %s",
                        len(blocks), exc)
            with self.index.lock:
                for block in blocks:
                    self.index.remove(block)
                    self.retired.add(block)
            self.needs_repair = True

    def flush_stats(self) -> None:
        """Write access statistics (hits, last access, attention) to the catalog."""
        with self.index.lock:
            dirty = self.index.take_dirty()
            if dirty:
                with self.catalog.write() as txn:
                    for block, entry in dirty:
                        txn.put_block(block, entry)

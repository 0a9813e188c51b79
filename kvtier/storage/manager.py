"""The tier manager: the storage layer's one entry point (blocks, sequences, sessions, stats).

Tiers are held in order (:class:`~kvtier.storage.tiers.Tier`: warm, cool, cold). A block (all its
layers) lives in exactly one tier.

- ``put_block`` encodes for the warm tier and writes it there at memory speed; it only waits for
  demotions when the warm tier is at its hard budget.
- Reading a block (:mod:`~kvtier.storage.reads`) counts a hit; a block read from below warm is
  promoted in the background.
- The balancer (:mod:`~kvtier.storage.balancer`) keeps every tier within its budget by the eviction
  policy, re-encoding moved blocks outside the index's lock; pinned blocks never move.
- The catalog (:mod:`~kvtier.storage.catalog`) is the truth, mirrored in memory by the block index
  (:mod:`~kvtier.storage.index`); :mod:`~kvtier.storage.placement` changes them together. The
  invariant checker (:mod:`~kvtier.storage.checker`) repairs a store that was not closed cleanly.

After any public call returns, no tier holds more than its budget.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvtier.config import Config
from kvtier.errors import BlockMissing, KvtierError, TierFull
from kvtier.storage import codec, policy, summary
from kvtier.storage.balancer import Balancer, Op
from kvtier.storage.catalog import (BlockEntry, Catalog, CatalogTxn, KeySummary, SequenceEntry,
                                    SessionEntry)
from kvtier.storage.checker import CheckReport, check
from kvtier.storage.codec import RecordFormat
from kvtier.storage.dirlock import DataDirLock
from kvtier.storage.index import BlockIndex, TailKey
from kvtier.storage.placement import Placement
from kvtier.storage.quant import Encoding
from kvtier.storage.reads import BlockReader, Fetched, RowDestination
from kvtier.storage.records import WINDOWED, BlockId, ChainHash, LayerKV, Namespace, chain_hash
from kvtier.storage.tiers import LmdbTier, RocksStore, RocksTier, Tier, TierStore
from kvtier.storage.view import NAMESPACE_META, StoreView

WARM_MAP_RESERVE = 0.06
"""Part of the LMDB map kept for its B-tree pages and free lists, outside the warm byte budget."""


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    blocks: int
    stored_bytes: int
    raw_bytes: int
    budget: int
    disk_bytes: int
    hits: int
    misses: int
    promotions: int
    demotions: int
    drops: int
    corrupt: int

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0


class TierManager:
    """Owns the tiers and the catalog of one data directory."""

    def __init__(self, config: Config, *, background: bool = True,
                 balance_on_open: bool = True) -> None:
        """``balance_on_open=False`` opens without demoting to the configured budgets (for
        inspection with a config whose budgets may differ from the server's)."""
        self.config = config
        self._lock_file = DataDirLock(config.data_path)
        self._closed = False
        try:
            self._open(config, background, balance_on_open)
        except BaseException:
            self._lock_file.release()
            raise

    def _open(self, config: Config, background: bool, balance_on_open: bool) -> None:
        t, e = config.tiers, config.eviction
        self.catalog = Catalog(config.data_path / "catalog")
        self._stores: dict[Path, RocksStore] = {}
        self.tiers: list[TierStore] = [    # indexed by Tier
            LmdbTier(config.warm_path, map_size=t.host_ram_budget),
            RocksTier(self._store(config.cool_path), Tier.COOL.label),
            RocksTier(self._store(config.cold_path), Tier.COLD.label)]
        with self.catalog.read() as txn:
            self._index = BlockIndex(txn.iter_blocks(), txn.iter_hashes())
        self._placement = Placement(self.catalog, self._index, self.tiers)
        cold = Encoding.Q8 if t.cold_format == "q8" else Encoding.Q4
        self._balancer = Balancer(
            self._placement,
            {Tier.WARM: int(t.host_ram_budget * (1 - WARM_MAP_RESERVE)),
             Tier.COOL: t.local_ssd_budget, Tier.COLD: t.nfs_budget},
            {Tier.WARM: RecordFormat(Encoding.F16 if t.warm_format == "f16" else Encoding.Q8, 0),
             Tier.COOL: RecordFormat(cold, t.zstd_level),
             Tier.COLD: RecordFormat(cold, t.zstd_level)},
            policy.Weights(e.alpha, e.beta, e.gamma, e.hit_half_life_s))
        self.weights = self._balancer.weights
        """The eviction policy's weights (the tools show priorities with them)."""
        self._reader = BlockReader(self._placement, self._balancer)
        self.repaired: dict[str, int] = {}
        """What opening repaired, if the store was not closed cleanly (non-zero counts)."""
        if not self.catalog.was_clean():
            self.repaired = self.check(fix=True).fixed
        self.catalog.set_clean(False)
        if balance_on_open:
            self._balancer.enforce(self._balancer.budgets)
        if background:
            self._balancer.start()
            threading.Thread(target=codec.warm_up, name="kvtier-warm-up", daemon=True).start()

    def _store(self, path: Path) -> RocksStore:
        resolved = path.resolve()
        if resolved not in self._stores:
            self._stores[resolved] = RocksStore(resolved, [Tier.COOL.label, Tier.COLD.label])
        return self._stores[resolved]

    # -- blocks ----------------------------------------------------------------------------------
    def put_block(self, block: BlockId, layers: Sequence[LayerKV], chain: ChainHash | None = None,
                  position: int = -1) -> BlockId:
        """Store all layers of a block in the warm tier; returns the id that now holds it.

        A full block with a chain hash that is already stored is not written again: the id of
        the stored copy is returned. The new block has no references until a sequence names it.
        Block ids are never reused: storing an id that exists is a ValueError. ``position`` is
        where the block's first token sat when its keys were computed (-1: its own position);
        the block's key summary is kept in the catalog beside its entry.
        """
        if chain is not None:
            existing = self.find_hash(block.namespace, chain)
            if existing is not None:
                return existing
        with self._index.lock:
            self._index.wait_until_settled(block)
            if block in self._index:
                # Blocks are immutable: a sequence that shares one must never see it change.
                raise ValueError(f"{block} is already stored")
        exact = codec.SINK_ROWS if block.block == 0 else 0
        warm = self._balancer.formats[Tier.WARM]
        records = [(key, codec.encode_record(layer, warm, exact))
                   for key, layer in zip(block.record_keys(len(layers)), layers)]
        stored = sum(self.tiers[Tier.WARM].stored_bytes(len(v)) for _, v in records)
        if stored > self._balancer.budgets[Tier.WARM]:
            raise TierFull(f"a block of {stored} bytes is larger than the warm budget")
        t = time.time()
        entry = BlockEntry(tier=Tier.WARM, stored_bytes=stored,
                           raw_bytes=sum(layer.nbytes for layer in layers),
                           n_layers=len(layers), n_tokens=layers[0].n_tokens if layers else 0,
                           refs=0, chain=chain or b"", created=t, last_access=t, hits=0.0,
                           position=position)
        key_summary = summary.key_summary(layers)
        with self._balancer.room(Tier.WARM, stored):
            self._balancer.write_records(Tier.WARM, records)
            with self._index.lock:
                with self.catalog.write() as txn:
                    txn.put_block(block, entry)
                    if key_summary is not None:
                        txn.put_summary(block, key_summary)
                    if chain is not None:
                        txn.put_hash(block.namespace, chain, block)
                self._index.add(block, entry)
                if chain is not None:
                    self._index.put_hash(block.namespace + chain, block)
        self._balancer.schedule(Op.BALANCE)
        return block

    def get_block(self, block: BlockId) -> list[LayerKV]:
        """All layers of a block, decoded to llama.cpp rows, from whichever tier holds it.

        Raises :class:`BlockMissing` if no tier has it, :class:`BlockCorrupt` if its data fails
        its checksum; a corrupt block is removed, so the next lookup reports it missing.
        """
        return self._reader.get_block(block)

    def get_blocks(self, blocks: Sequence[BlockId]) -> list[list[LayerKV] | KvtierError]:
        """Several blocks, decoded in parallel (the quantizers hold no GIL): for each, its layers
        or the :class:`BlockMissing` / :class:`BlockCorrupt` that reading it met."""
        return self._reader.get_blocks(blocks)

    def get_blocks_into(self, blocks: Sequence[BlockId], destination: RowDestination
                        ) -> list[KvtierError | None]:
        """Decode several **pinned** blocks in parallel straight into caller-owned rows (see
        :meth:`BlockReader.get_blocks_into`): for each, None or the error reading it met."""
        return self._reader.get_blocks_into(blocks, destination)

    def read_records(self, block: BlockId) -> Fetched:
        """The tier and raw record bytes of every layer of a block (for inspection tools)."""
        return self._reader.read_records(block)

    def key_summaries(self, blocks: Sequence[BlockId]) -> list[KeySummary | None]:
        """Each block's key summary (None for a block without one: gone, or not an f16 cache),
        read from the catalog alone: no tier is touched."""
        with self.catalog.read() as txn:
            return [txn.get_summary(block) for block in blocks]

    def has_block(self, block: BlockId) -> bool:
        return block in self._index

    def block_entry(self, block: BlockId) -> BlockEntry | None:
        return self._index.get(block)

    def blocks(self) -> dict[BlockId, BlockEntry]:
        return self._index.snapshot()

    def report_attention(self, scores: dict[BlockId, float]) -> None:
        """Add measured attention (a block's share of a selection's queries, about 1 for an
        average block): the eviction priority's attention term (:mod:`.policy`)."""
        self._index.add_attention(scores, time.time(), self.weights.hit_half_life_s)

    def prefetch(self, blocks: Sequence[BlockId]) -> int:
        """Promote these blocks to warm in the background, those below it; returns how many were
        asked for. A block that moves or is pinned meanwhile stays where it is."""
        below = [b for b in blocks if (e := self._index.get(b)) is not None
                 and e.tier != Tier.WARM]
        for block in below:
            self._balancer.schedule(Op.PROMOTE, block)
        return len(below)

    @contextmanager
    def pinned(self, blocks: Sequence[BlockId]) -> Iterator[None]:
        """Keep blocks where they are (no demotion, no drop) for the duration of the block."""
        self._index.pin(blocks)
        try:
            yield
        finally:
            self._index.unpin(blocks)

    def move(self, block: BlockId, dest: Tier) -> bool:
        """Move a block to tier ``dest`` (re-encoded for it); False if it is gone, pinned or
        there already (or turned out corrupt, and was removed)."""
        return self._balancer.move(block, dest)

    # -- content hashes ----------------------------------------------------------------------------
    def find_hash(self, namespace: Namespace, chain: ChainHash) -> BlockId | None:
        return self._index.find_hash(namespace + chain)

    def match_prefix(self, namespace: Namespace, tokens: np.ndarray, block_size: int
                     ) -> list[BlockId]:
        """Stored full blocks holding the longest prefix of ``tokens``, in order: at each block,
        the full-attention copy if there is one, else one computed under a working set (whose
        successors are then such blocks too)."""
        found: list[BlockId] = []
        parent: ChainHash | None = None
        keys = (b"", WINDOWED)
        for start in range(0, len(tokens) - block_size + 1, block_size):
            for key in keys:
                chain = chain_hash(parent, tokens[start:start + block_size], key)
                block = self.find_hash(namespace, chain)
                if block is not None:
                    break
            if block is None:
                break
            if key:
                keys = (WINDOWED,)
            parent = chain
            found.append(block)
        return found

    def match_tail(self, namespace: Namespace, parent: ChainHash | None, tokens: np.ndarray
                   ) -> BlockId | None:
        """The stored partial tail block that follows the full block whose chain hash is
        ``parent`` (None: a tail that starts a sequence) and holds the longest prefix of
        ``tokens``, the tokens after that block; None if no stored tail continues them.

        Tails are a sequence's own blocks, never shared by content, but any sequence's tail
        serves a prompt that continues it exactly: this is how a full-history request finds the
        end of its previous turn after its slot was reused, or after a restart.
        """
        return self._index.find_tail(namespace, parent, tokens)

    # -- sequences ---------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        with self.catalog.write() as txn:
            return txn.next_sequence()

    def save_sequence(self, namespace: Namespace, sequence: int, tokens: np.ndarray,
                      blocks: Sequence[BlockId]) -> SequenceEntry:
        """Record a sequence's tokens and block list, moving references from its old list."""
        t = time.time()
        array = np.ascontiguousarray(tokens, dtype="<i4")
        with self._index.lock:
            missing = [b for b in blocks if b not in self._index]
            if missing:
                raise BlockMissing(f"{len(missing)} blocks of sequence {sequence} are in no tier")
            tail = self._index.tail_key(array, blocks)
            with self.catalog.write() as txn:
                old = txn.get_sequence(namespace, sequence)
                entry = SequenceEntry(namespace, sequence, array.tobytes(),
                                      tuple(b.to_bytes() for b in blocks),
                                      old.created if old else t, t)
                txn.put_sequence(entry)
                self._move_refs(txn, old.block_ids() if old else [], list(blocks), tail)
        return entry

    def get_sequence(self, namespace: Namespace, sequence: int) -> SequenceEntry | None:
        with self.catalog.read() as txn:
            return txn.get_sequence(namespace, sequence)

    def delete_sequence(self, namespace: Namespace, sequence: int) -> None:
        with self._index.lock, self.catalog.write() as txn:
            old = txn.get_sequence(namespace, sequence)
            if old is not None:
                txn.delete_sequence(namespace, sequence)
                self._move_refs(txn, old.block_ids(), [])

    def sequences(self) -> list[SequenceEntry]:
        with self.catalog.read() as txn:
            return list(txn.iter_sequences())

    def _move_refs(self, txn: CatalogTxn, old: list[BlockId], new: list[BlockId],
                   tail: TailKey | None = None) -> None:
        """Adjust reference counts inside ``txn`` (the index's lock held); a block left without
        references is removed when ``txn`` commits. The ``new`` list's ``tail`` key is written
        into that block's entry in the same change."""
        delta: Counter[BlockId] = Counter(new)
        delta.subtract(old)
        for block, change in delta.items():
            entry = self._index.get(block)
            if entry is None:
                continue
            keyed = tail is not None and block == tail.block \
                and (entry.parent, entry.tail_chain) != (tail.parent, tail.chain)
            if change == 0 and not keyed:
                continue
            refs = max(0, entry.refs + change)
            if refs == 0:
                self._placement.unlink(txn, block)
            else:
                entry = replace(entry, refs=refs)
                if keyed:
                    entry = replace(entry, parent=tail.parent, tail_chain=tail.chain)
                txn.put_block(block, entry)
                txn.after_commit(lambda block=block, entry=entry: self._index.add(block, entry))

    # -- sessions ----------------------------------------------------------------------------------
    def put_session(self, entry: SessionEntry) -> None:
        with self.catalog.write() as txn:
            txn.put_session(entry)

    def get_session(self, session_id: str) -> SessionEntry | None:
        with self.catalog.read() as txn:
            return txn.get_session(session_id)

    def list_sessions(self, after: str = "", limit: int = 100) -> list[SessionEntry]:
        out = []
        with self.catalog.read() as txn:
            for entry in txn.iter_sessions(after):
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its sequence in one transaction; shared blocks live on while
        other sequences reference them."""
        with self._index.lock, self.catalog.write() as txn:
            entry = txn.get_session(session_id)
            if entry is None:
                return False
            txn.delete_session(session_id)
            seq = txn.get_sequence(entry.namespace, entry.sequence)
            if seq is not None:
                txn.delete_sequence(entry.namespace, entry.sequence)
                self._move_refs(txn, seq.block_ids(), [])
        return True

    def register_namespace(self, namespace: Namespace, description: bytes) -> None:
        with self.catalog.write() as txn:
            txn.put_meta(NAMESPACE_META + namespace, description)

    def namespaces(self) -> dict[bytes, bytes]:
        with self.catalog.read() as txn:
            return {name[len(NAMESPACE_META):]: value
                    for name, value in txn.iter_meta(NAMESPACE_META)}

    # -- upkeep, stats and shutdown --------------------------------------------------------------
    def check(self, *, fix: bool, references: bool = True, records: bool = False,
              quick: bool = False, progress: bool = False) -> CheckReport:
        """Check the store's invariants (see :mod:`~kvtier.storage.checker`); with ``fix``,
        repair what can be repaired."""
        return check(self._placement, self._balancer.budgets, fix=fix, references=references,
                     records=records, quick=quick, progress=progress)

    def view(self) -> StoreView:
        """Everything the store holds, read at one moment (for the tools)."""
        return StoreView.load(self._placement)

    def drain(self) -> None:
        """Wait until the background worker has done everything queued so far."""
        self._balancer.drain()

    def flush_stats(self) -> None:
        """Write access statistics (hits, last access, attention) to the catalog."""
        self._placement.flush_stats()

    def stats(self) -> list[TierStats]:
        """Per tier, indexed by :class:`Tier`."""
        disk = [tier.disk_bytes() for tier in self.tiers]
        with self._index.lock:
            return [self._tier_stats(t, disk[t]) for t in Tier]

    def _tier_stats(self, tier: Tier, disk_bytes: int) -> TierStats:
        u, c = self._index.usage[tier], self._index.counters[tier]
        return TierStats(tier.label, u.blocks, u.stored_bytes, u.raw_bytes,
                         self._balancer.budgets[tier], disk_bytes, c.hits, c.misses,
                         c.promotions, c.demotions, c.drops, c.corrupt)

    def close(self) -> None:
        """Finish queued work, write statistics, mark the store cleanly closed, release it."""
        if self._closed:
            return
        self._closed = True
        self._balancer.stop()
        self.flush_stats()
        self.catalog.set_clean(True)
        for tier in self.tiers:
            tier.close()
        for store in self._stores.values():
            store.close()
        self.catalog.close()
        self._lock_file.release()

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

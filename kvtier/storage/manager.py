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

Faults degrade, never stop: a tier or catalog that cannot be opened is moved aside (renamed with a
timestamp) and recreated empty, and says so in :attr:`TierManager.degraded`; the catalog keeps what
can still be read of it (:func:`~kvtier.storage.catalog.salvage`). Unreadable blocks are quarantined
as they are met (:mod:`~kvtier.storage.reads`), and a tier whose key walk fails is rebuilt from what
can still be read (:meth:`TierManager.rebuild_tier`). A block a request wrote is never dropped
until a sequence names it or the writer gives it up (:meth:`TierManager.release_fresh`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvtier.config import Config
from kvtier.errors import BlockCorrupt, KvtierError, TierDamaged, TierFull, WriteFailed
from kvtier.storage import codec, policy, summary, workers
from kvtier.storage.balancer import Balancer, Op
from kvtier.storage.catalog import (BlockEntry, Catalog, CatalogTxn, KeySummary, SequenceEntry,
                                    SessionEntry, salvage)
from kvtier.storage.checker import CheckReport, check
from kvtier.storage.codec import RecordFormat, tier_format
from kvtier.storage.dirlock import DataDirLock
from kvtier.storage.index import BlockIndex, TailKey
from kvtier.storage.placement import Placement
from kvtier.storage.reads import BlockReader, Fetched, RowDestination
from kvtier.storage.records import WINDOWED, BlockId, ChainHash, LayerKV, Namespace, chain_hash
from kvtier.storage.remote_link import RemoteLink
from kvtier.storage.tiers import (LmdbTier, RocksStore, RocksTier, Tier, TierStore, move_aside)
from kvtier.storage.view import NAMESPACE_META, StoreView

log = logging.getLogger(__name__)

WARM_MAP_RESERVE = 0.06
"""Part of the LMDB map kept for its B-tree pages and free lists, outside the warm byte budget."""
PREFETCH_SHARE = 0.25
"""Promotions that prefetches may have queued at once, in bytes as a share of the warm budget:
a prefetch is a hint, and asking for more than warm holds only pushes out what it brings in (a
long conversation's selections ask for dozens of blocks each)."""
DISK_FULL_BYTES = 1 << 20
"""Free bytes below which a tier that fails to open is taken to be on a full disk, not damaged."""
FRESH_PIN_S = 600.0
"""How long a block stored for a sequence that is never saved stays pinned at most."""


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
    write_errors: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0


def _disk_full(path: Path) -> bool:
    """Whether the file system of ``path`` has (almost) no room left."""
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


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
        self._catalog_failing = False
        self.degraded: dict[str, str] = {}
        """What opening found damaged and moved aside, by component (``catalog``, ``warm``,
        ``cool``, ``cold``): the reason and where the damaged files went."""
        self.catalog = self._open_catalog(config.data_path / "catalog")
        self._stores: dict[Path, RocksStore] = {}
        self.tiers: list[TierStore] = [    # indexed by Tier
            self._open_warm(), RocksTier(self._store(config.cool_path), Tier.COOL.label),
            RocksTier(self._store(config.cold_path), Tier.COLD.label)]
        with self.catalog.read() as txn:
            self._index = BlockIndex(txn.iter_blocks(), txn.iter_hashes())
        self._placement = Placement(self.catalog, self._index, self.tiers)
        self._balancer = Balancer(
            self._placement,
            {Tier.WARM: int(t.host_ram_budget * (1 - WARM_MAP_RESERVE)),
             Tier.COOL: t.local_ssd_budget, Tier.COLD: t.nfs_budget},
            {Tier.WARM: tier_format(t.warm_format, t.warm_zstd_level),
             Tier.COOL: tier_format(t.cold_format, t.zstd_level),
             Tier.COLD: tier_format(t.cold_format, t.zstd_level)},
            policy.Weights(e.alpha, e.beta, e.gamma, e.hit_half_life_s))
        self.capped = self._balancer.cap_budgets(warn=True)
        """Tiers whose budget exceeded the space their disk has, with the budget used."""
        self.weights = self._balancer.weights
        """The eviction policy's weights (the tools show priorities with them)."""
        self._reader = BlockReader(self._placement, self._balancer)
        self._fresh: dict[BlockId, float] = {}
        """Blocks stored for a sequence not saved yet, held (never dropped), with when they were
        stored."""
        self.repaired: dict[str, int] = {}
        """What opening repaired, if the store was not closed cleanly (non-zero counts)."""
        try:
            if not self.catalog.was_clean() or self.degraded:
                self.repaired = self.check(fix=True).fixed
            self.catalog.set_clean(False)
            if balance_on_open:
                self._balancer.enforce(self._balancer.budgets)
                if self._placement.needs_repair:    # blocks sequences named were dropped
                    self.check(fix=True, walk=False)
        except WriteFailed as exc:
            # A full disk: serve what can be read; the repair runs when the store next opens
            # with room (it is not marked clean).
            log.error("the store opened on a disk that refuses writes, unrepaired: %s", exc)
        self.remote: RemoteLink | None = RemoteLink(config, self, background) \
            if config.tiers.remote_url else None
        """The remote tier and shared session catalog (``tiers.remote_url``), or None."""
        if background:
            self._balancer.start()
            threading.Thread(target=codec.warm_up, name="kvtier-warm-up", daemon=True).start()

    def _store(self, path: Path) -> RocksStore:
        resolved = path.resolve()
        if resolved not in self._stores:
            families = [Tier.COOL.label, Tier.COLD.label]
            try:
                self._stores[resolved] = RocksStore(resolved, families)
            except TierDamaged as exc:
                if _disk_full(resolved):
                    # Not damage: RocksDB writes when it opens. Serve reads; writes fail (and
                    # are retried, reopening it) until there is room.
                    log.error("the disk of %s is full: its tiers are read-only (%s)", resolved,
                              exc)
                    self._stores[resolved] = RocksStore(resolved, families, read_only=True)
                    return self._stores[resolved]
                self._moved_aside(self._labels_at(resolved), resolved, exc)
                self._stores[resolved] = RocksStore(resolved, families)
        return self._stores[resolved]

    def _labels_at(self, path: Path) -> str:
        return ",".join(t.label for t, p in ((Tier.COOL, self.config.cool_path),
                                             (Tier.COLD, self.config.cold_path))
                        if p.resolve() == path)

    def _open_warm(self) -> LmdbTier:
        path, size = self.config.warm_path, self.config.tiers.host_ram_budget
        try:
            return LmdbTier(path, map_size=size)
        except TierDamaged as exc:
            self._moved_aside(Tier.WARM.label, path, exc)
            return LmdbTier(path, map_size=size)

    def _open_catalog(self, path: Path) -> Catalog:
        """The catalog, or, where it cannot be read whole, a new one holding every entry of it
        that still can be (the sessions among them survive); the old one is moved aside."""
        try:
            catalog = Catalog(path)
        except TierDamaged as exc:
            problem = exc
        else:
            try:
                catalog.walk()
                return catalog
            except TierDamaged as exc:
                catalog.close()
                problem = exc
        moved, catalog, kept = salvage(path)
        log.error("the catalog %s is damaged (%s): moved aside to %s; kept %s", path, problem,
                  moved, kept)
        self.degraded["catalog"] = f"{problem}; moved aside to {moved.name}, kept " + \
            ", ".join(f"{n} {name}" for name, n in kept.items() if n)
        return catalog

    def _moved_aside(self, label: str, path: Path, exc: Exception) -> None:
        moved = move_aside(path) if path.exists() else path
        log.error("the %s tier at %s cannot be opened (%s): moved aside to %s and recreated "
                  "empty; its blocks are recomputed when needed", label, path, exc, moved)
        self.degraded[label] = f"{exc}; moved aside to {moved.name}"

    # -- blocks ----------------------------------------------------------------------------------
    def put_block(self, block: BlockId, layers: Sequence[LayerKV], chain: ChainHash | None = None,
                  position: int = -1, hold: bool = False) -> BlockId:
        """Store all layers of a block in the warm tier; returns the id that now holds it.

        A full block with a chain hash that is already stored is not written again: the id of
        the stored copy is returned. The new block has no references until a sequence names it.
        Block ids are never reused: storing an id that exists is a ValueError. ``position`` is
        where the block's first token sat when its keys were computed (-1: its own position);
        the block's key summary is kept in the catalog beside its entry. ``hold``: keep the
        block (or the stored copy returned) from being dropped until a sequence names it
        (:meth:`save_sequence`) or the caller gives it up (:meth:`release_fresh`), so that
        eviction racing a writer never drops what the sequence it is about to save needs. A block
        larger than the warm budget goes to the first tier it fits.
        """
        if chain is not None:
            with self._index.lock:
                existing = self.find_hash(block.namespace, chain)
                if existing is not None:
                    if hold:
                        self._pin_fresh(existing)
                    return existing
        with self._index.lock:
            self._index.wait_until_settled(block)
            if self.has_block(block):
                # Blocks are immutable: a sequence that shares one must never see it change.
                raise ValueError(f"{block} is already stored")
        exact = codec.SINK_ROWS if block.block == 0 else 0
        warm = self._balancer.formats[Tier.WARM]
        # Encoded (and re-encoded below) a part of the layers per worker thread: the kernels
        # and zstd hold no GIL.
        keys = block.record_keys(len(layers))
        records = list(zip(keys, workers.STORE.map_in_parts(
            lambda layer: codec.encode_record(layer, warm, exact), layers)))
        tier = Tier.WARM
        stored = sum(self.tiers[tier].stored_bytes(len(v)) for _, v in records)
        while stored > self._balancer.budgets[tier]:
            # Larger than this tier's whole budget: it goes to the first tier it fits.
            if tier == max(Tier):
                raise TierFull(f"a block of {stored} bytes is larger than every tier's budget")
            tier = Tier(tier + 1)
            fmt = self._balancer.formats[tier]
            records = list(zip(keys, workers.STORE.map_in_parts(
                lambda value: codec.transcode(value, fmt), [v for _, v in records])))
            stored = sum(self.tiers[tier].stored_bytes(len(v)) for _, v in records)
        t = time.time()
        entry = BlockEntry(tier=tier, stored_bytes=stored,
                           raw_bytes=sum(layer.nbytes for layer in layers),
                           n_layers=len(layers), n_tokens=layers[0].n_tokens if layers else 0,
                           refs=0, chain=chain or b"", created=t, last_access=t, hits=0.0,
                           position=position)
        key_summary = summary.key_summary(layers, workers.STORE)
        with self._balancer.room(tier, stored):
            self._balancer.write_records(tier, records)
            try:
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
                    if hold:
                        self._pin_fresh(block)
            except KvtierError:
                self._balancer.discard_records(tier, [key for key, _ in records])
                raise
        self._balancer.schedule(Op.BALANCE)
        return block

    def _pin_fresh(self, block: BlockId) -> None:
        """Hold a block for :meth:`put_block`: it may move between tiers, never be dropped."""
        now = time.monotonic()
        with self._index.lock:
            if block not in self._fresh:
                self._fresh[block] = now
                self._index.hold([block])
            if len(self._fresh) % 64 == 0:
                # A writer that neither saves nor gives up (a conversation abandoned mid-way)
                # must not hold room forever.
                self.release_fresh([b for b, t in self._fresh.items() if now - t > FRESH_PIN_S])

    def release_fresh(self, blocks: Sequence[BlockId]) -> None:
        """Unpin blocks stored for a sequence that will not be saved (its store failed)."""
        with self._index.lock:
            done = [b for b in blocks if self._fresh.pop(b, None) is not None]
            self._index.unhold(done)

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
        """Whether ``block`` is stored, or its id is still named by a sequence (a removed
        block's id is not free before the store's next repair)."""
        return block in self._index or block in self._placement.retired

    def block_entry(self, block: BlockId) -> BlockEntry | None:
        return self._index.get(block)

    def blocks(self) -> dict[BlockId, BlockEntry]:
        return self._index.snapshot()

    def report_attention(self, scores: dict[BlockId, float]) -> None:
        """Add measured attention (a block's share of a selection's queries, about 1 for an
        average block): the eviction priority's attention term (:mod:`.policy`)."""
        self._index.add_attention(scores, time.time(), self.weights.hit_half_life_s)
        if self.remote is not None:
            self.remote.report_attention(scores)

    def prefetch(self, blocks: Sequence[BlockId]) -> int:
        """Promote these blocks (best first) to warm in the background, those below it, as far
        as :data:`PREFETCH_SHARE` of the warm budget allows; returns how many were asked for.
        A block that moves or is pinned meanwhile stays where it is."""
        room = int(self._balancer.budgets[Tier.WARM] * PREFETCH_SHARE) \
            - self._balancer.queued_promotion_bytes()
        asked = 0
        for block in blocks:
            entry = self._index.get(block)
            if entry is None or entry.tier == Tier.WARM:
                continue
            room -= entry.raw_bytes
            if room < 0:
                break
            self._balancer.schedule(Op.PROMOTE, block)
            asked += 1
        return asked

    @contextmanager
    def pinned(self, blocks: Sequence[BlockId]) -> Iterator[None]:
        """Keep blocks where they are (no demotion, no drop) for the duration of the block; a
        promotion that came up meanwhile runs after it."""
        self._index.pin(blocks)
        try:
            yield
        finally:
            for block in self._index.unpin(blocks):
                self._balancer.schedule(Op.PROMOTE, block)

    def move(self, block: BlockId, dest: Tier) -> bool:
        """Move a block to tier ``dest`` (re-encoded for it); False if it is gone, pinned or
        there already (or turned out corrupt, and was removed)."""
        return self._balancer.move(block, dest)

    @property
    def formats(self) -> dict[Tier, RecordFormat]:
        """The format each tier writes its records in (from ``tiers.*_format``)."""
        return dict(self._balancer.formats)

    def recode(self, block: BlockId) -> bool:
        """Re-encode a block in its tier's configured format if it is in another (``kvtier
        compact``); False if it already is, or is gone, pinned, moving or unreadable."""
        return self._balancer.recode(block)

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
        """A sequence id never given before. Where the catalog refuses the write that records
        it (a full disk), an id drawn at random from the upper half of the id space instead:
        a request must not fail for want of an id, and a random 63-bit id is never reused."""
        try:
            with self.catalog.write() as txn:
                sequence = txn.next_sequence()
        except WriteFailed as exc:
            if not self._catalog_failing:
                log.error("the catalog refuses writes (%s): sequence ids come from a random "
                          "range until it takes them again", exc)
                self._catalog_failing = True
            return (1 << 63) | secrets.randbits(63)
        if self._catalog_failing:
            log.warning("the catalog takes writes again")
            self._catalog_failing = False
        return sequence

    def save_sequence(self, namespace: Namespace, sequence: int, tokens: np.ndarray,
                      blocks: Sequence[BlockId]) -> SequenceEntry:
        """Record a sequence's tokens and block list, moving references from its old list."""
        t = time.time()
        array = np.ascontiguousarray(tokens, dtype="<i4")
        with self._index.lock:
            lost = next((i for i, b in enumerate(blocks) if b not in self._index), None)
            if lost is not None:
                # Quarantined (unreadable) or dropped meanwhile: the sequence keeps the blocks
                # before it, and a later turn recomputes the rest.
                log.warning("sequence %d is saved with %d of its %d blocks: block %d is in no "
                            "tier", sequence, lost, len(blocks), lost)
                self.release_fresh(blocks[lost:])
                blocks = blocks[:lost]
            tail = self._index.tail_key(array, blocks)
            with self.catalog.write() as txn:
                old = txn.get_sequence(namespace, sequence)
                entry = SequenceEntry(namespace, sequence, array.tobytes(),
                                      tuple(b.to_bytes() for b in blocks),
                                      old.created if old else t, t)
                txn.put_sequence(entry)
                self._move_refs(txn, old.block_ids() if old else [], list(blocks), tail)
            self.release_fresh(blocks)
        if self.remote is not None:
            self.remote.saved(list(blocks))
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
        """Record the session (synced before this returns). A session whose sequence is not
        stored yet (its first turn's KV is still being written) gets it as an empty sequence in
        the same commit, so the catalog never names a sequence it lacks."""
        with self.catalog.write() as txn:
            if txn.get_sequence(entry.namespace, entry.sequence) is None:
                t = time.time()
                txn.put_sequence(SequenceEntry(entry.namespace, entry.sequence, b"", (), t, t))
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
              quick: bool = False, progress: bool = False, walk: bool = True) -> CheckReport:
        """Check the store's invariants (see :mod:`~kvtier.storage.checker`); with ``fix``,
        repair what can be repaired."""
        report = check(self._placement, self._balancer.budgets, fix=fix, references=references,
                       records=records, quick=quick, progress=progress, walk=walk)
        if fix and report.damaged:
            for tier in report.damaged:
                rebuilt = self.rebuild_tier(tier)
                report.fixed[f"rebuilt_{tier.label}"] = 1
                report.fixed["corrupt_blocks"] = report.fixed.get("corrupt_blocks", 0) + \
                    rebuilt
            again = check(self._placement, self._balancer.budgets, fix=True)
            for key, n in again.fixed.items():
                report.fixed[key] = report.fixed.get(key, 0) + n
        if fix and references:
            self._placement.needs_repair = False
            self._placement.retired.clear()
        return report

    def rebuild_tier(self, tier: Tier) -> int:
        """Copy every block of ``tier`` (and of any tier sharing its files) that can still be
        read into new files, move the old ones aside and use the new: the repair of a tier whose
        files are damaged. Blocks that cannot be read are quarantined; returns how many. For a
        store nothing else changes meanwhile (when it opens, or offline)."""
        if tier == Tier.WARM:
            path, group = self.config.warm_path, [Tier.WARM]
        else:
            store = self.tiers[tier].store
            path = store.path
            group = [t for t in (Tier.COOL, Tier.COLD) if self.tiers[t].store is store]
        scratch = path.with_name(path.name + ".rebuild")
        shutil.rmtree(scratch, ignore_errors=True)
        lost: list[BlockId] = []
        with self._index.lock:
            blocks = self._index.snapshot()
            if tier == Tier.WARM:
                new: dict[Tier, TierStore] = {Tier.WARM: LmdbTier(
                    scratch, map_size=self.config.tiers.host_ram_budget)}
                new_store = None
            else:
                new_store = RocksStore(scratch, [Tier.COOL.label, Tier.COLD.label])
                new = {t: RocksTier(new_store, t.label) for t in group}
            for block, entry in blocks.items():
                if entry.tier not in group:
                    continue
                keys = block.record_keys(entry.n_layers)
                try:
                    values = self.tiers[entry.tier].get_many(keys)
                except BlockCorrupt:
                    values = [None]
                if any(v is None for v in values):
                    lost.append(block)
                    continue
                new[entry.tier].put_many(list(zip(keys, values)))
            for t in group:
                new[t].close()
                self.tiers[t].close()
            if new_store is not None:
                new_store.close()
                try:
                    self.tiers[group[0]].store.close()
                except WriteFailed:
                    pass    # it is moved aside as it is
            moved = move_aside(path)
            scratch.replace(path)
            log.error("rebuilt the %s tier at %s from what could be read (%d blocks lost); the "
                      "damaged files are in %s", ",".join(t.label for t in group), path,
                      len(lost), moved)
            if tier == Tier.WARM:
                reopened: dict[Tier, TierStore] = {Tier.WARM: self._open_warm()}
            else:
                self._stores[path] = RocksStore(path, [Tier.COOL.label, Tier.COLD.label])
                reopened = {t: RocksTier(self._stores[path], t.label) for t in group}
            for t, store_tier in reopened.items():
                self.tiers[t] = store_tier
                self._placement.tiers[t] = store_tier
                self._index.counters[t].corrupt += sum(blocks[b].tier == t for b in lost)
            if lost:
                self._placement.quarantine(lost, f"unreadable when {path.name} was rebuilt")
        return len(lost)

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
                         c.promotions, c.demotions, c.drops, c.corrupt, c.write_errors)

    def degradation(self) -> dict[str, str]:
        """What is damaged (moved aside when the store opened) or refuses writes now, by part
        (``catalog``, ``warm``, ``cool``, ``cold``), with why; empty when all is well."""
        out = dict(self.degraded)
        for tier, reason in self._balancer.failing().items():
            out[tier.label] = f"writes fail: {reason}"
        if self._catalog_failing:
            out["catalog"] = "writes fail (a full disk?)"
        return out

    def close(self) -> None:
        """Finish queued work, write statistics, mark the store cleanly closed, release it."""
        if self._closed:
            return
        self._closed = True
        if self.remote is not None:
            self.remote.close()
        self._balancer.stop()
        try:
            self.flush_stats()
            if self._placement.needs_repair or self._fresh:
                # Blocks were quarantined or dropped while sequences named them, or stored for
                # sequences never saved: cut and collect now, so a clean store verifies clean.
                # The catalog alone: walking the tiers' keys reads every RocksDB payload.
                self.release_fresh(list(self._fresh))
                self.check(fix=True, walk=False)
            self.catalog.set_clean(True)
        except KvtierError as exc:      # a full disk: the next open repairs instead
            log.warning("closing the store without marking it clean: %s", exc)
        for tier in self.tiers:
            tier.close()
        for store in self._stores.values():
            try:
                store.close()
            except WriteFailed as exc:
                log.warning("closing a tier that failed writes: %s", exc)
        self.catalog.close()
        self._lock_file.release()

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

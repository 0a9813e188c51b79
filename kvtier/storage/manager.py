"""The tier manager: byte budgets, demotion, promotion, pinning, prefix lookup and the catalog.

Tiers are held in order (0 warm, 1 cool, 2 cold). A block (all its layers) lives in exactly one tier.

- ``put_block`` encodes for the warm tier and writes it there at memory speed; it only waits for the
  SSD when the warm tier is at its hard budget and must demote first.
- A background worker keeps the warm and cool tiers under a low watermark by demoting the blocks
  with the highest eviction priority (warm → cool → cold), and promotes blocks read from a lower
  tier. A block being moved stays readable in its source tier until the catalog entry that names its
  new tier has committed; only then is the old copy deleted.
- When the cold tier is full the least valuable blocks are dropped and counted.
- Pinned blocks (in use by a restore or the hot tier) are never moved or dropped.

After any public call returns, no tier holds more than its budget.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from kvtier.config import Config
from kvtier.errors import BlockCorrupt, BlockMissing, KvtierError, StoreLocked, TierFull
from kvtier.storage import codec, policy
from kvtier.storage.catalog import BlockEntry, Catalog, SequenceEntry, SessionEntry, touched
from kvtier.storage.codec import RecordFormat
from kvtier.storage.quant import Encoding
from kvtier.storage.records import BlockId, ChainHash, LayerKV, Namespace, chain_hash
from kvtier.storage.tiers import LmdbTier, RocksStore, RocksTier, TierStore

log = logging.getLogger(__name__)

T = TypeVar("T")
RowDestination = Callable[[int, int], tuple[np.ndarray, np.ndarray, int, int]]
"""(block position, layer) -> (k_out, v_out, k_type, v_type): where a restore decodes rows."""

TIER_NAMES = ("warm", "cool", "cold")
WARM, COOL, COLD = 0, 1, 2
LOW_WATERMARK = 0.85
"""The background worker demotes until a tier is below this fraction of its budget."""
WARM_MAP_RESERVE = 0.06
"""Part of the LMDB map kept for its B-tree pages and free lists, outside the warm byte budget."""


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    drops: int = 0
    corrupt: int = 0


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


@dataclass(slots=True)
class _State:
    """In-memory mirror of the catalog's block table (small: ~150 bytes a block)."""

    entries: dict[BlockId, BlockEntry] = field(default_factory=dict)
    used: list[int] = field(default_factory=lambda: [0, 0, 0])
    raw: list[int] = field(default_factory=lambda: [0, 0, 0])
    count: list[int] = field(default_factory=lambda: [0, 0, 0])
    dirty: set[BlockId] = field(default_factory=set)

    def add(self, block: BlockId, entry: BlockEntry) -> None:
        self.remove(block)
        self.entries[block] = entry
        self.used[entry.tier] += entry.stored_bytes
        self.raw[entry.tier] += entry.raw_bytes
        self.count[entry.tier] += 1

    def remove(self, block: BlockId) -> BlockEntry | None:
        old = self.entries.pop(block, None)
        if old is not None:
            self.used[old.tier] -= old.stored_bytes
            self.raw[old.tier] -= old.raw_bytes
            self.count[old.tier] -= 1
        self.dirty.discard(block)
        return old


_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """Threads that decode records in parallel, one per core, shared by every manager."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)),
                                   thread_name_prefix="kvtier-decode")
    return _pool


class DataDirLock:
    """An exclusive lock on the data directory, so two processes never write the same store."""

    def __init__(self, data_path: Path) -> None:
        data_path.mkdir(parents=True, exist_ok=True)
        self.path = data_path / "kvtier.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            holder = self.path.read_text().strip() or "another process"
            raise StoreLocked(f"{data_path} is in use by {holder}; stop it first") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()}".encode())

    def release(self) -> None:
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


class TierManager:
    """Owns the tiers and the catalog of one data directory."""

    def __init__(self, config: Config, *, background: bool = True,
                 balance_on_open: bool = True) -> None:
        """``balance_on_open=False`` opens without demoting to the configured budgets (for
        inspection with a config whose budgets may differ from the server's)."""
        self.config = config
        self._lock_file = DataDirLock(config.data_path)
        self._lock = threading.RLock()
        self._closed = False
        try:
            self._open(config, background, balance_on_open)
        except BaseException:
            self._lock_file.release()
            raise

    def _open(self, config: Config, background: bool, balance_on_open: bool) -> None:
        t = config.tiers
        self.catalog = Catalog(config.data_path / "catalog")
        warm = LmdbTier(config.warm_path, map_size=t.host_ram_budget)
        self._stores: dict[Path, RocksStore] = {}
        cool = RocksTier(self._store(config.cool_path, "cool"), "cool")
        cold = RocksTier(self._store(config.cold_path, "cold"), "cold")
        self.tiers: list[TierStore] = [warm, cool, cold]
        self.budgets = [int(t.host_ram_budget * (1 - WARM_MAP_RESERVE)), t.local_ssd_budget,
                        t.nfs_budget]
        warm_encoding = Encoding.F16 if t.warm_format == "f16" else Encoding.Q8
        cold_encoding = Encoding.Q8 if t.cold_format == "q8" else Encoding.Q4
        self.formats = [RecordFormat(warm_encoding, 0), RecordFormat(cold_encoding, t.zstd_level),
                        RecordFormat(cold_encoding, t.zstd_level)]
        e = config.eviction
        self.weights = policy.Weights(e.alpha, e.beta, e.gamma)
        self.half_life_s = e.hit_half_life_s
        self.counters = [TierCounters() for _ in self.tiers]
        self._state = _State()
        self._pins: Counter[BlockId] = Counter()
        self._hashes: dict[bytes, BlockId] = {}
        with self.catalog.read() as txn:
            for block, entry in txn.iter_blocks():
                self._state.add(block, entry)
            for key, block in txn.iter_hashes():
                self._hashes[key] = block
        self.repaired: dict[str, int] = {}
        if not self.catalog.was_clean():
            self.repaired = self.repair()
        self.catalog.set_clean(False)
        if balance_on_open:
            self._enforce_budgets(self.budgets)
        self._queue: queue.Queue[tuple[str, BlockId | None]] = queue.Queue()
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._work, name="kvtier-tiers", daemon=True)
            self._worker.start()
            threading.Thread(target=codec.warm_up, name="kvtier-warm-up", daemon=True).start()

    def _store(self, path: Path, cf: str) -> RocksStore:
        resolved = path.resolve()
        if resolved not in self._stores:
            self._stores[resolved] = RocksStore(resolved, ["cool", "cold"])
        return self._stores[resolved]

    # -- blocks ----------------------------------------------------------------------------------
    def put_block(self, block: BlockId, layers: Sequence[LayerKV], chain: ChainHash | None = None
                  ) -> BlockId:
        """Store all layers of a block in the warm tier; returns the id that now holds it.

        A full block with a chain hash that is already stored is not written again: the id of
        the stored copy is returned. The new block has no references until a sequence names it.
        Block ids are never reused: storing an id that exists is a ValueError.
        """
        if chain is not None:
            existing = self.find_hash(block.namespace, chain)
            if existing is not None:
                return existing
        with self._lock:
            if block in self._state.entries:
                # Blocks are immutable: a sequence that shares one must never see it change.
                raise ValueError(f"{block} is already stored")
        exact = codec.SINK_ROWS if block.block == 0 else 0
        records = [(block.key(i).to_bytes(),
                    codec.encode_record(layer, self.formats[WARM], exact))
                   for i, layer in enumerate(layers)]
        raw = sum(layer.nbytes for layer in layers)
        stored = sum(self.tiers[WARM].stored_bytes(len(v)) for _, v in records)
        if stored > self.budgets[WARM]:
            raise TierFull(f"a block of {stored} bytes is larger than the warm budget")
        t = time.time()
        entry = BlockEntry(tier=WARM, stored_bytes=stored, raw_bytes=raw, n_layers=len(layers),
                           n_tokens=layers[0].n_tokens if layers else 0, refs=0,
                           chain=chain or b"", created=t, last_access=t, hits=0.0)
        with self._lock:
            self._make_room(WARM, stored)
            self._write_records(WARM, records)
            with self.catalog.write() as txn:
                txn.put_block(block, entry)
                if chain is not None:
                    txn.put_hash(block.namespace, chain, block)
            self._state.add(block, entry)
            if chain is not None:
                self._hashes[block.namespace + chain] = block
        self._after_change()
        return block

    def _write_records(self, tier: int, records: list[tuple[bytes, bytes]]) -> None:
        for attempt in range(8):
            try:
                self.tiers[tier].put_many(records)
                return
            except TierFull:
                # LMDB's own pages ran out before our accounting did: demote more and retry.
                if tier != WARM or not self._demote_some(WARM, self.budgets[WARM] // 8):
                    raise
        raise TierFull(f"{TIER_NAMES[tier]} stays full after demotion")

    def get_block(self, block: BlockId) -> list[LayerKV]:
        """All layers of a block, decoded to llama.cpp rows, from whichever tier holds it.

        Raises :class:`BlockMissing` if no tier has it, :class:`BlockCorrupt` if its data fails
        its checksum; a corrupt block is removed, so the next lookup reports it missing.
        """
        result = self._decode(block, self._fetch(block))
        if isinstance(result, KvtierError):
            raise result
        return result

    def get_blocks(self, blocks: Sequence[BlockId]) -> list[list[LayerKV] | KvtierError]:
        """Several blocks, decoded in parallel (the quantizers hold no GIL): for each, its layers
        or the :class:`BlockMissing` / :class:`BlockCorrupt` that reading it met."""
        fetched = [self._fetch(block) for block in blocks]
        if len(blocks) < 2:
            return [self._decode(b, f) for b, f in zip(blocks, fetched)]
        return list(_decode_pool().map(self._decode, blocks, fetched))

    def get_blocks_into(self, blocks: Sequence[BlockId], destination: RowDestination
                        ) -> list[KvtierError | None]:
        """Decode several **pinned** blocks in parallel straight into caller-owned rows:
        ``destination(j, layer)`` gives ``(k_out, v_out, k_type, v_type)`` for layer ``layer``
        of ``blocks[j]`` (see :func:`codec.decode_record_into`). For each block, None or the
        error that reading it met (a corrupt block is removed, as with :meth:`get_block`).

        Each block is read in its decoding thread, zero-copy where the tier allows (LMDB), and
        without the manager's lock: the pin (a restore holds one) keeps it from moving."""
        located = [self._locate(block) for block in blocks]

        def decode(j: int) -> KvtierError | None:
            if isinstance(located[j], KvtierError):
                return located[j]
            tier, keys = located[j]

            def into(values: list[bytes | memoryview | None]) -> None | BlockCorrupt:
                return self._decode_values(blocks[j], tier, values, lambda vs: [
                    codec.decode_record_into(v, *destination(j, layer))
                    for layer, v in enumerate(vs)])

            result = self._account(blocks[j], tier, self.tiers[tier].read_many(keys, into))
            return result if isinstance(result, KvtierError) else None

        return list(_decode_pool().map(decode, range(len(blocks))))

    def _locate(self, block: BlockId) -> tuple[int, list[bytes]] | KvtierError:
        """The tier and record keys of a block, counting the access."""
        with self._lock:
            entry = self._state.entries.get(block)
            if entry is None:
                self.counters[WARM].misses += 1
                return BlockMissing(f"{block} is in no tier")
            self._state.entries[block] = touched(entry, time.time(), self.half_life_s)
            self._state.dirty.add(block)
            return entry.tier, [block.key(i).to_bytes() for i in range(entry.n_layers)]

    def _fetch(self, block: BlockId) -> tuple[int, list[bytes | None]] | KvtierError:
        """The tier and record bytes of a block, read under the lock so that no move can delete
        them between the catalog lookup and the read."""
        with self._lock:
            located = self._locate(block)
            if isinstance(located, KvtierError):
                return located
            tier, keys = located
            return tier, self.tiers[tier].get_many(keys)

    def _decode(self, block: BlockId, fetched: tuple[int, list[bytes | None]] | KvtierError
                ) -> list[LayerKV] | KvtierError:
        if isinstance(fetched, KvtierError):
            return fetched
        tier, values = fetched
        result = self._decode_values(block, tier, values,
                                     lambda vs: [codec.decode_record(v)[1] for v in vs])
        return self._account(block, tier, result)

    @staticmethod
    def _decode_values(block: BlockId, tier: int, values: Sequence[bytes | memoryview | None],
                       decode: Callable[[list[bytes | memoryview]], T]) -> T | BlockCorrupt:
        """``decode`` of a block's records, or the BlockCorrupt that it or a missing layer met;
        no side effects, so it can run inside a tier's read transaction."""
        try:
            if any(v is None for v in values):
                raise BlockCorrupt(f"{block}: {sum(v is None for v in values)} layers missing "
                                   f"from {TIER_NAMES[tier]}")
            return decode(list(values))
        except BlockCorrupt as exc:
            return exc

    def _account(self, block: BlockId, tier: int, result: T) -> T:
        """Count a read; remove a corrupt block; schedule promoting one read from below warm."""
        with self._lock:
            if isinstance(result, BlockCorrupt):
                self.counters[tier].corrupt += 1
                self._forget([block])
                return result
            self.counters[tier].hits += 1
        if tier != WARM:
            self._schedule("promote", block)
        return result

    def read_records(self, block: BlockId) -> tuple[int, list[bytes | None]]:
        """The tier and raw record bytes of every layer of a block (for inspection tools)."""
        with self._lock:
            entry = self._state.entries.get(block)
            if entry is None:
                raise BlockMissing(f"{block} is in no tier")
            keys = [block.key(i).to_bytes() for i in range(entry.n_layers)]
            return entry.tier, self.tiers[entry.tier].get_many(keys)

    def has_block(self, block: BlockId) -> bool:
        with self._lock:
            return block in self._state.entries

    def block_entry(self, block: BlockId) -> BlockEntry | None:
        with self._lock:
            return self._state.entries.get(block)

    def blocks(self) -> dict[BlockId, BlockEntry]:
        with self._lock:
            return dict(self._state.entries)

    def report_attention(self, scores: dict[BlockId, float]) -> None:
        """Record measured attention scores (the engine's importance of each block)."""
        with self._lock:
            for block, score in scores.items():
                entry = self._state.entries.get(block)
                if entry is not None:
                    self._state.entries[block] = replace(entry, attention=float(score))
                    self._state.dirty.add(block)

    @contextmanager
    def pinned(self, blocks: Sequence[BlockId]) -> Iterator[None]:
        """Keep blocks where they are (no demotion, no drop) for the duration of the block."""
        with self._lock:
            self._pins.update(blocks)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(blocks)
                for b in blocks:
                    if self._pins[b] <= 0:
                        del self._pins[b]

    # -- content hashes ----------------------------------------------------------------------------
    def find_hash(self, namespace: Namespace, chain: ChainHash) -> BlockId | None:
        with self._lock:
            block = self._hashes.get(namespace + chain)
            return block if block is not None and block in self._state.entries else None

    def match_prefix(self, namespace: Namespace, tokens: np.ndarray, block_size: int
                     ) -> list[BlockId]:
        """Stored full blocks holding the longest prefix of ``tokens``, in order."""
        found: list[BlockId] = []
        parent: ChainHash | None = None
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = chain_hash(parent, tokens[start:start + block_size])
            block = self.find_hash(namespace, parent)
            if block is None:
                break
            found.append(block)
        return found

    # -- sequences ---------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        with self._lock, self.catalog.write() as txn:
            return txn.next_sequence()

    def save_sequence(self, namespace: Namespace, sequence: int, tokens: np.ndarray,
                      blocks: Sequence[BlockId]) -> SequenceEntry:
        """Record a sequence's tokens and block list, moving references from its old list."""
        t = time.time()
        data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
        with self._lock:
            missing = [b for b in blocks if b not in self._state.entries]
            if missing:
                raise BlockMissing(f"{len(missing)} blocks of sequence {sequence} are in no tier")
            with self.catalog.write() as txn:
                old = txn.get_sequence(namespace, sequence)
                entry = SequenceEntry(namespace, sequence, data,
                                      tuple(b.to_bytes() for b in blocks),
                                      old.created if old else t, t)
                txn.put_sequence(entry)
                released = self._move_refs(txn, old.block_ids() if old else [], list(blocks))
            self._delete_data(released)
        return entry

    def get_sequence(self, namespace: Namespace, sequence: int) -> SequenceEntry | None:
        with self.catalog.read() as txn:
            return txn.get_sequence(namespace, sequence)

    def delete_sequence(self, namespace: Namespace, sequence: int) -> None:
        with self._lock:
            with self.catalog.write() as txn:
                old = txn.get_sequence(namespace, sequence)
                if old is None:
                    return
                txn.delete_sequence(namespace, sequence)
                released = self._move_refs(txn, old.block_ids(), [])
            self._delete_data(released)

    def sequences(self) -> list[SequenceEntry]:
        with self.catalog.read() as txn:
            return list(txn.iter_sequences())

    def _move_refs(self, txn, old: list[BlockId], new: list[BlockId]
                   ) -> list[tuple[BlockId, BlockEntry]]:
        """Adjust reference counts inside ``txn``; returns blocks left unreferenced (removed)."""
        delta: Counter[BlockId] = Counter(new)
        delta.subtract(old)
        released = []
        for block, change in delta.items():
            entry = self._state.entries.get(block)
            if change == 0 or entry is None:
                continue
            entry = replace(entry, refs=max(0, entry.refs + change))
            if entry.refs == 0:
                self._remove_entry(txn, block, entry)
                released.append((block, entry))
            else:
                txn.put_block(block, entry)
                self._state.entries[block] = entry
        return released

    def _remove_entry(self, txn, block: BlockId, entry: BlockEntry) -> None:
        txn.delete_block(block)
        if entry.chain and self._hashes.get(block.namespace + entry.chain) == block:
            txn.delete_hash(block.namespace, entry.chain)
            del self._hashes[block.namespace + entry.chain]
        self._state.remove(block)

    def _delete_data(self, removed: list[tuple[BlockId, BlockEntry]]) -> None:
        """Delete record data whose catalog entries are already gone (after their commit)."""
        for block, entry in removed:
            self.tiers[entry.tier].delete([block.key(i).to_bytes()
                                           for i in range(entry.n_layers)])

    def _forget(self, blocks: Sequence[BlockId]) -> None:
        with self.catalog.write() as txn:
            removed = []
            for block in blocks:
                entry = self._state.entries.get(block)
                if entry is not None:
                    self._remove_entry(txn, block, entry)
                    removed.append((block, entry))
        self._delete_data(removed)

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
        with self._lock:
            with self.catalog.write() as txn:
                entry = txn.get_session(session_id)
                if entry is None:
                    return False
                txn.delete_session(session_id)
                seq = txn.get_sequence(entry.namespace, entry.sequence)
                released = []
                if seq is not None:
                    txn.delete_sequence(entry.namespace, entry.sequence)
                    released = self._move_refs(txn, seq.block_ids(), [])
            self._delete_data(released)
        return True

    def register_namespace(self, namespace: Namespace, description: bytes) -> None:
        with self.catalog.write() as txn:
            txn.put_meta(b"ns:" + namespace, description)

    def namespaces(self) -> dict[bytes, bytes]:
        with self.catalog.read() as txn:
            cursor = txn._txn.cursor(db=self.catalog.meta_db)
            out = {}
            if cursor.set_range(b"ns:"):
                for key, value in cursor:
                    if not key.startswith(b"ns:"):
                        break
                    out[bytes(key[3:])] = bytes(value)
            return out

    # -- budgets, demotion, promotion ------------------------------------------------------------
    def _priority(self, entry: BlockEntry, now: float) -> float:
        # A block shared by n sequences is worth n of them: dropping a common prefix would cut
        # every conversation that starts with it.
        score = policy.importance(entry.attention, entry.hits, entry.last_access, now,
                                  self.half_life_s) * max(entry.refs, 1)
        return policy.eviction_priority(score, now - entry.last_access, entry.tier, self.weights)

    def _candidates(self, tier: int) -> list[tuple[BlockId, float, int]]:
        # Candidates come later blocks first, so that among equal priorities a sequence loses
        # its tail before the prefix that the tail needs (choose_victims' sort is stable).
        now = time.time()
        entries = sorted(((b, e) for b, e in self._state.entries.items()
                          if e.tier == tier and b not in self._pins),
                         key=lambda item: -item[0].block)
        return [(b, self._priority(e, now), e.stored_bytes) for b, e in entries]

    def _make_room(self, tier: int, incoming: int) -> None:
        """Demote (or, from the last tier, drop) until ``incoming`` bytes fit ``tier``'s budget."""
        excess = self._state.used[tier] + incoming - self.budgets[tier]
        if excess > 0 and not self._demote_some(tier, excess) \
                and self._state.used[tier] + incoming > self.budgets[tier]:
            raise TierFull(f"{TIER_NAMES[tier]} is full of pinned blocks")

    def _demote_some(self, tier: int, nbytes: int) -> bool:
        """Move at least ``nbytes`` out of ``tier``; False when nothing could be moved."""
        victims = policy.choose_victims(self._candidates(tier), nbytes)
        for block in victims:
            self._move(block, tier + 1) if tier + 1 < len(self.tiers) else self._drop(block)
        return bool(victims)

    def _drop(self, block: BlockId) -> None:
        self.counters[COLD].drops += 1
        log.warning("dropped block %s: every tier is full", block)
        self._forget([block])

    def _move(self, block: BlockId, dest: int) -> None:
        """Move a block to ``dest`` (either direction): write there, commit the catalog, delete."""
        entry = self._state.entries[block]
        source = entry.tier
        keys = [block.key(i).to_bytes() for i in range(entry.n_layers)]
        values = self.tiers[source].get_many(keys)
        try:
            if any(v is None for v in values):
                raise BlockCorrupt(f"{block}: layers missing from {TIER_NAMES[source]}")
            records = [(k, codec.transcode(v, self.formats[dest])) for k, v in zip(keys, values)]
        except BlockCorrupt:
            self.counters[source].corrupt += 1
            self._forget([block])
            return
        stored = sum(self.tiers[dest].stored_bytes(len(v)) for _, v in records)
        self._make_room(dest, stored)
        self._write_records(dest, records)
        moved = replace(self._state.entries[block], tier=dest, stored_bytes=stored)
        with self.catalog.write() as txn:
            txn.put_block(block, moved)
        self._state.add(block, moved)
        self.tiers[source].delete(keys)
        if dest > source:
            self.counters[source].demotions += 1
        else:
            self.counters[dest].promotions += 1

    def move(self, block: BlockId, dest: int) -> bool:
        """Move a block to tier ``dest`` (re-encoded for it); False if it is gone or pinned."""
        with self._lock:
            entry = self._state.entries.get(block)
            if entry is None or block in self._pins or entry.tier == dest:
                return False
            self._move(block, dest)
            return True

    def _enforce_budgets(self, limits: Sequence[int]) -> None:
        with self._lock:
            for tier in range(len(self.tiers)):
                excess = self._state.used[tier] - limits[tier]
                if excess > 0:
                    self._demote_some(tier, excess)

    def _promote(self, block: BlockId) -> None:
        with self._lock:
            entry = self._state.entries.get(block)
            if entry is None or entry.tier == WARM or block in self._pins:
                return
            if entry.raw_bytes > self.budgets[WARM] * LOW_WATERMARK:
                return
            self._move(block, WARM)

    def _after_change(self) -> None:
        if self._worker is not None:
            self._schedule("balance", None)
        else:
            self._enforce_budgets([int(b * LOW_WATERMARK) for b in self.budgets])

    def _schedule(self, op: str, block: BlockId | None) -> None:
        if self._worker is not None:
            self._queue.put((op, block))
        elif op == "promote" and block is not None:
            self._promote(block)
            self._enforce_budgets([int(b * LOW_WATERMARK) for b in self.budgets])

    def _work(self) -> None:
        """The background worker: demotions to the low watermarks, promotions, and a periodic
        write of access statistics (every 30 s, or after 5 s without work)."""
        last_flush = time.monotonic()
        while True:
            try:
                op, block = self._queue.get(timeout=5.0)
            except queue.Empty:
                self._run_op("flush", None)
                last_flush = time.monotonic()
                continue
            try:
                if op == "stop":
                    return
                self._run_op(op, block)
                if time.monotonic() - last_flush > 30.0:
                    self._run_op("flush", None)
                    last_flush = time.monotonic()
            finally:
                self._queue.task_done()

    def _run_op(self, op: str, block: BlockId | None) -> None:
        try:
            if op == "promote" and block is not None:
                self._promote(block)
            if op in ("balance", "promote"):
                self._enforce_budgets([int(b * LOW_WATERMARK) for b in self.budgets])
            if op == "flush":
                self.flush_stats()
        except Exception:  # the worker must survive; the failure is logged with its cause
            log.exception("tier worker: %s %s failed", op, block)

    def drain(self) -> None:
        """Wait until the background worker has done everything queued so far."""
        if self._worker is not None:
            self._queue.join()

    def flush_stats(self) -> None:
        """Write access statistics (hits, last access, attention) to the catalog."""
        with self._lock:
            if not self._state.dirty:
                return
            with self.catalog.write() as txn:
                for block in self._state.dirty:
                    entry = self._state.entries.get(block)
                    if entry is not None:
                        txn.put_block(block, entry)
            self._state.dirty.clear()

    # -- repair and collection --------------------------------------------------------------------
    def repair(self) -> dict[str, int]:
        """Make the catalog and the tiers agree, in one pass: drop entries whose data is missing
        (or in another tier), truncate sequences at their first lost block, recount references
        from what is left and drop unreferenced blocks and stale hashes; then delete data no
        entry points at. Runs at open after an unclean shutdown."""
        found = {"missing_blocks": 0, "unreferenced_blocks": 0, "orphan_records": 0,
                 "stale_hashes": 0, "truncated_sequences": 0}
        with self._lock:
            with self.catalog.write() as txn:
                for block, entry in list(self._state.entries.items()):
                    tier = self.tiers[entry.tier]
                    if not all(tier.contains(block.key(i).to_bytes())
                               for i in range(entry.n_layers)):
                        found["missing_blocks"] += 1
                        self._remove_entry(txn, block, entry)
                referenced: Counter[BlockId] = Counter()
                for seq in list(txn.iter_sequences()):
                    ids = seq.block_ids()
                    keep = next((i for i, b in enumerate(ids) if b not in self._state.entries),
                                len(ids))
                    if keep < len(ids):
                        found["truncated_sequences"] += 1
                        txn.put_sequence(replace(seq, blocks=seq.blocks[:keep]))
                    referenced.update(ids[:keep])
                for block, entry in list(self._state.entries.items()):
                    if referenced[block] == 0:
                        found["unreferenced_blocks"] += 1
                        self._remove_entry(txn, block, entry)
                    elif referenced[block] != entry.refs:
                        self._state.entries[block] = replace(entry, refs=referenced[block])
                        self._state.dirty.add(block)
                for key, block in list(txn.iter_hashes()):
                    if block not in self._state.entries:
                        txn.delete_hash(Namespace(key[:16]), key[16:])
                        self._hashes.pop(key, None)
                        found["stale_hashes"] += 1
            self.flush_stats()
            found["orphan_records"] = self.collect_orphans()
        if any(found.values()):
            log.warning("repaired the store: %s", found)
        return found

    def collect_orphans(self) -> int:
        """Delete records in any tier that the catalog does not place there."""
        removed = 0
        with self._lock:
            for index, tier in enumerate(self.tiers):
                orphans = []
                for key in tier.keys():
                    try:
                        block = BlockId.from_bytes(key[:BlockId.BYTES])
                    except ValueError:
                        orphans.append(key)
                        continue
                    entry = self._state.entries.get(block)
                    layer = int.from_bytes(key[BlockId.BYTES:], "big")
                    if entry is None or entry.tier != index or layer >= entry.n_layers:
                        orphans.append(key)
                tier.delete(orphans)
                removed += len(orphans)
        return removed

    # -- stats and shutdown ------------------------------------------------------------------------
    def stats(self) -> list[TierStats]:
        with self._lock:
            return [TierStats(TIER_NAMES[i], self._state.count[i], self._state.used[i],
                              self._state.raw[i], self.budgets[i], self.tiers[i].disk_bytes(),
                              c.hits, c.misses, c.promotions, c.demotions, c.drops, c.corrupt)
                    for i, c in enumerate(self.counters)]

    def close(self) -> None:
        """Finish queued work, write statistics, mark the store cleanly closed, release it."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._queue.put(("stop", None))
            self._worker.join()
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

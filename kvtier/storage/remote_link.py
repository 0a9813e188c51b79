"""What the tier manager does with the remote tier: send saved sequences' blocks (write-behind),
bring blocks and sessions other servers stored into the local tiers, publish sessions.

Local tiers stay the fast path and the truth for this server: a remote block is read only where no
local tier holds it, and then stored locally (warm) before it is used, so a restore never reads
from the network while llama.cpp waits. Every remote call may fail (:class:`RemoteUnavailable`):
then the request carries on with what the local tiers hold, and recomputes the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from kvtier.config import Config
from kvtier.errors import STORAGE_FAULTS, BlockCorrupt, KvtierError, RemoteUnavailable
from kvtier.storage import codec
from kvtier.storage.catalog import SessionEntry
from kvtier.storage.records import BlockId, ChainHash, Namespace, chain_hash
from kvtier.storage.remote import BlockMeta, Redis, RemoteBlock, RemoteTier
from kvtier.storage.remote_catalog import RemoteCatalog, RemoteSession
from kvtier.storage.remote_sync import Publish, RemoteSync, Upload

if TYPE_CHECKING:
    from kvtier.storage.manager import TierManager

log = logging.getLogger(__name__)

REMOTE_VERSION = "remote_version"
"""The key in a local session's ``data`` of the remote catalog version it matches."""


@dataclass(frozen=True, slots=True)
class RemoteStats:
    blocks_sent: int
    blocks_fetched: int
    sessions_written: int
    queued: int
    dropped: int
    """Blocks given up from a full send queue (sent again with their sequence's next save)."""
    errors: int
    """Redis calls that failed (timeouts, nodes down, cluster down, full memory)."""
    conflicts: int
    """Session writes refused: another server held the lease or wrote a newer version."""
    evictions: int
    available: bool
    """False while the circuit breaker is open."""


class RemoteLink:
    """The remote tier, the shared catalog and the write-behind thread of one manager."""

    def __init__(self, config: Config, manager: TierManager, background: bool = True) -> None:
        t = config.tiers
        self.manager = manager
        self.redis = Redis(t.remote_url)
        self.tier = RemoteTier(self.redis, t.remote_budget, t.remote_ttl_s,
                               weights=manager.weights)
        self.catalog = RemoteCatalog(self.redis)
        self.fetched = 0
        self.sync = RemoteSync(self.tier, self.catalog,
                               codec.tier_format(t.remote_format, t.zstd_level),
                               self._read_local, self.address) if background else None
        if self.sync is not None:
            self.catalog.needed.append(self.sync.publishing)

    # -- write-behind ----------------------------------------------------------------------------
    def content(self, block: BlockId) -> tuple[bytes, bool] | None:
        """The block's content address and whether it is full; None where it has none (a tail
        no saved sequence named, a block gone)."""
        entry = self.manager.block_entry(block)
        if entry is None:
            return None
        if entry.chain:
            return entry.chain, True
        return (entry.tail_chain, False) if entry.tail_chain else None

    def saved(self, blocks: list[BlockId]) -> None:
        """A sequence was saved: queue its blocks the remote tier may lack."""
        if self.sync is None:
            return
        uploads = []
        for block in blocks:
            address = self.address(block)
            if address is None:
                break
            uploads.append(Upload(block, address))
        self.sync.push(uploads)

    def address(self, block: BlockId) -> RemoteBlock | None:
        """Where the remote tier keeps a local block (None: it has no content address)."""
        found = self.content(block)
        return RemoteBlock(block.namespace, found[0]) if found is not None else None

    def report_attention(self, scores: dict[BlockId, float]) -> None:
        """Measured attention of local blocks, for the remote copies' eviction priority
        (addressed and sent by the write-behind thread: the engine thread only queues it)."""
        if self.sync is not None:
            self.sync.attention(scores)

    def _read_local(self, block: BlockId) -> tuple[BlockMeta, list[bytes | None]] | None:
        entry = self.manager.block_entry(block)
        if entry is None:
            return None
        _, records = self.manager.read_records(block)
        return BlockMeta(entry.n_layers, entry.n_tokens, entry.raw_bytes, 0,
                         entry.position), list(records)

    def publish(self, key: str, ready: Callable[[], bool] = lambda: True) -> None:
        """Write session ``key`` to the shared catalog once ``ready()`` (its turn's KV is
        stored locally) and the blocks queued before it are sent."""
        if self.sync is None:
            return
        built: list[RemoteSession] = []

        def build() -> RemoteSession | None:
            entry = self.manager.get_session(key)
            if entry is None:
                return None
            seq = self.manager.get_sequence(Namespace(entry.namespace), entry.sequence)
            blocks = []
            for block in seq.block_ids() if seq is not None else []:
                found = self.content(block)
                if found is None:
                    break
                blocks.append(found)
            data = {k: v for k, v in entry.data.items() if k != REMOTE_VERSION}
            session = RemoteSession(key, entry.namespace, seq.tokens if seq else b"",
                                    tuple(blocks), entry.created, entry.last_used, data,
                                    int(entry.data.get(REMOTE_VERSION, 0)))
            built.append(session)
            return session

        def written(version: int) -> None:
            entry = self.manager.get_session(key)
            # Only the turn that was written: a newer one, or a newer import, keeps its own.
            if entry is not None and built and entry.last_used == built[0].last_used and \
                    int(entry.data.get(REMOTE_VERSION, 0)) == built[0].version:
                self.manager.put_session(replace(entry, data=dict(entry.data,
                                                                  **{REMOTE_VERSION: version})))
        self.sync.publish(Publish(key, build, written, ready))

    # -- reading ---------------------------------------------------------------------------------
    def session(self, key: str) -> RemoteSession | None:
        """The shared catalog's record of session ``key`` (None: none, or Redis unreachable)."""
        try:
            return self.catalog.get(key)
        except RemoteUnavailable:
            return None

    def import_session(self, remote: RemoteSession, old: SessionEntry | None) -> SessionEntry:
        """Store a session another server wrote: its blocks (those the local tiers lack are
        read from the remote tier, up to the first it lacks too: the rest is recomputed), a
        new local sequence, and the local session entry."""
        ns = Namespace(remote.namespace)
        tokens = np.frombuffer(remote.tokens, "<i4")
        seq = self.manager.new_sequence()
        local: dict[int, BlockId] = {}
        wanted: list[int] = []
        for i, (content, full) in enumerate(remote.blocks):
            found = self.manager.find_hash(ns, ChainHash(content)) if full else None
            if found is not None:
                local[i] = found
            else:
                wanted.append(i)
        fetched = self._fetch([RemoteBlock(ns, remote.blocks[i][0]) for i in wanted])
        got = dict(zip(wanted, fetched))
        blocks: list[BlockId] = []
        for i, (content, full) in enumerate(remote.blocks):
            if i in local:
                blocks.append(local[i])
                continue
            if got.get(i) is None:
                break
            stored = self._store(BlockId(ns, seq, i), got[i],
                                 ChainHash(content) if full else None)
            if stored is None:
                break
            blocks.append(stored)
        self.manager.save_sequence(ns, seq, tokens, blocks)
        entry = SessionEntry(remote.key, remote.namespace, seq, remote.created,
                             remote.last_used, dict(remote.data,
                                                    **{REMOTE_VERSION: remote.version}))
        self.manager.put_session(entry)
        if old is not None and old.sequence != seq:
            self.manager.delete_sequence(Namespace(old.namespace), old.sequence)
        return entry

    def fetch_prefix(self, namespace: Namespace, tokens: np.ndarray, block_size: int) -> int:
        """Bring the full blocks of ``tokens``' longest prefix that the local tiers lack but the
        remote tier holds into the local tiers (held until a sequence names them); returns how
        many."""
        n_full = len(tokens) // block_size
        local = self.manager.match_prefix(namespace, tokens, block_size)
        if len(local) >= n_full:
            return 0
        chains: list[ChainHash] = []
        parent: ChainHash | None = None
        for i in range(n_full):
            parent = chain_hash(parent, tokens[i * block_size:(i + 1) * block_size])
            chains.append(parent)
        if local:
            entry = self.manager.block_entry(local[-1])
            if entry is None or entry.chain != chains[len(local) - 1]:
                return 0    # the local prefix was computed on a working set: not shared
        start = len(local)
        fetched = self._fetch([RemoteBlock(namespace, c) for c in chains[start:]])
        seq = None
        n = 0
        for i, got in enumerate(fetched):
            if got is None:
                break
            if seq is None:
                seq = self.manager.new_sequence()
            if self._store(BlockId(namespace, seq, start + i), got, chains[start + i]) is None:
                break
            n += 1
        return n

    def _fetch(self, blocks: list[RemoteBlock]) -> list[tuple[BlockMeta, list[bytes]] | None]:
        if not blocks:
            return []
        try:
            found = self.tier.get_blocks(blocks)
        except RemoteUnavailable:
            return [None] * len(blocks)
        if self.sync is not None:
            self.sync.mark_sent([b for b, f in zip(blocks, found) if f is not None])
        return found

    def _store(self, block: BlockId, got: tuple[BlockMeta, list[bytes]],
               chain: ChainHash | None) -> BlockId | None:
        """Decode (verifying every record's checksum) and store a block read from the remote
        tier; None where a record fails its checks (it is counted and left to recomputation)."""
        meta, records = got
        try:
            layers = [codec.decode_record(r)[1] for r in records]
        except (BlockCorrupt, KvtierError, ValueError) as exc:
            self.redis.errors += 1
            log.warning("a block read from the remote tier is damaged (%s): recomputed", exc)
            return None
        try:
            stored = self.manager.put_block(block, layers, chain, position=meta.position,
                                            hold=True)
        except STORAGE_FAULTS as exc:   # a full local disk: the request recomputes instead
            log.warning("a block read from the remote tier was not stored locally: %s", exc)
            return None
        self.fetched += 1
        return stored

    # -- upkeep ----------------------------------------------------------------------------------
    def stats(self) -> RemoteStats:
        sync = self.sync
        return RemoteStats(sync.sent if sync else 0, self.fetched,
                           sync.sessions_written if sync else 0, sync.queued() if sync else 0,
                           sync.dropped if sync else 0, self.redis.errors,
                           self.catalog.conflicts, self.tier.evictions,
                           self.redis.breaker.failing is None)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued block and session is sent; False on timeout."""
        return self.sync.drain(timeout) if self.sync is not None else True

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        self.catalog.close()
        self.tier.close()

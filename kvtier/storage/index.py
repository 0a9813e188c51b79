"""The in-memory block index: the catalog's block table mirrored in memory (~150 bytes a block),
per-tier usage and counters, the content-hash index, the partial tails by the full block they
follow, pins, moves in flight, and the access statistics not yet written to the catalog.

No I/O: the tier manager changes the index when the catalog change it mirrors commits. Every
method takes :attr:`BlockIndex.lock`; hold it across calls that must see one state.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kvtier.storage.catalog import BlockEntry
from kvtier.storage.policy import Candidate, decayed_hits
from kvtier.storage.records import BlockId, ChainHash, Namespace, chain_hash
from kvtier.storage.tiers import Tier


@dataclass(slots=True)
class TierUsage:
    blocks: int = 0
    stored_bytes: int = 0
    raw_bytes: int = 0
    reserved_bytes: int = 0
    """Promised to writes in flight (a new block, a moved block's copy): not in the tier yet,
    but no other write may take the room."""


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    drops: int = 0
    corrupt: int = 0
    write_errors: int = 0
    """Writes the tier refused (a full disk, an I/O error)."""


@dataclass(slots=True)
class Move:
    """A block being copied to another tier, outside the lock."""

    source: Tier
    dest: Tier
    stored_bytes: int
    """What the block holds in ``source``: freed there if the move commits."""
    n_layers: int
    cancelled: bool = False
    """The block was removed meanwhile: the copy must not commit."""


@dataclass(frozen=True, slots=True)
class TailKey:
    """How a prompt finds a sequence's partial tail block: the chain hash of the full block
    before it (empty at a sequence's start) and the chain hash of its tokens after that."""

    block: BlockId
    parent: bytes
    chain: bytes


def candidate(block: BlockId, entry: BlockEntry, pinned: bool = False) -> Candidate[BlockId]:
    """What the eviction policy needs to know of a block."""
    return Candidate(block, entry.stored_bytes, entry.tier, block.block, entry.refs, pinned,
                     entry.attention, entry.hits, entry.last_access)


class BlockIndex:
    """Where every block is, and what the tiers hold, in memory."""

    def __init__(self, blocks: Iterable[tuple[BlockId, BlockEntry]] = (),
                 hashes: Iterable[tuple[bytes, BlockId]] = ()) -> None:
        self.lock = threading.RLock()
        self._settled = threading.Condition(self.lock)
        self._entries: dict[BlockId, BlockEntry] = {}
        self._hashes: dict[bytes, BlockId] = dict(hashes)
        self._tails: dict[bytes, dict[BlockId, tuple[int, bytes]]] = {}
        """namespace | parent chain hash → the partial tails after that full block, each with
        its token count and its tail chain hash (derived from the entries, never stored)."""
        self._pins: Counter[BlockId] = Counter()
        self._promote_when_unpinned: set[BlockId] = set()
        """Pinned blocks whose promotion came up while they were: it runs once they are not."""
        self._held: set[BlockId] = set()
        """Blocks that may move between tiers but not be dropped (stored for a sequence that is
        not saved yet)."""
        self._moves: dict[BlockId, Move] = {}
        self._dirty: set[BlockId] = set()
        self.usage = {tier: TierUsage() for tier in Tier}
        self.counters = {tier: TierCounters() for tier in Tier}
        for block, entry in blocks:
            self.add(block, entry)

    # -- entries ---------------------------------------------------------------------------------
    def get(self, block: BlockId) -> BlockEntry | None:
        with self.lock:
            return self._entries.get(block)

    def __contains__(self, block: object) -> bool:
        with self.lock:
            return block in self._entries

    def snapshot(self) -> dict[BlockId, BlockEntry]:
        with self.lock:
            return dict(self._entries)

    def add(self, block: BlockId, entry: BlockEntry) -> None:
        """Put or replace a block's entry as the catalog now holds it (so it is not dirty)."""
        with self.lock:
            old = self._entries.get(block)
            self._unaccount(old)
            self._untail(block, old)
            self._entries[block] = entry
            if entry.tail_chain:
                self._tails.setdefault(block.namespace + entry.parent, {})[block] = \
                    (entry.n_tokens, entry.tail_chain)
            u = self.usage[entry.tier]
            u.blocks += 1
            u.stored_bytes += entry.stored_bytes
            u.raw_bytes += entry.raw_bytes
            self._dirty.discard(block)

    def remove(self, block: BlockId) -> BlockEntry | None:
        """Forget a block, its content hash, and any move of it in flight."""
        with self.lock:
            entry = self._entries.pop(block, None)
            self._unaccount(entry)
            self._untail(block, entry)
            self._dirty.discard(block)
            if entry is not None and entry.chain \
                    and self._hashes.get(block.namespace + entry.chain) == block:
                del self._hashes[block.namespace + entry.chain]
            move = self._moves.get(block)
            if move is not None:
                move.cancelled = True
            return entry

    def _unaccount(self, entry: BlockEntry | None) -> None:
        if entry is not None:
            u = self.usage[entry.tier]
            u.blocks -= 1
            u.stored_bytes -= entry.stored_bytes
            u.raw_bytes -= entry.raw_bytes

    def _untail(self, block: BlockId, entry: BlockEntry | None) -> None:
        if entry is not None and entry.tail_chain:
            key = block.namespace + entry.parent
            after = self._tails.get(key, {})
            after.pop(block, None)
            if not after:
                self._tails.pop(key, None)

    # -- access statistics (written to the catalog later, by flush_stats) --------------------
    def touch(self, block: BlockId, now: float, half_life_s: float) -> BlockEntry | None:
        """Count a hit at ``now``: the old count decays, then one is added."""
        with self.lock:
            entry = self._entries.get(block)
            if entry is None:
                return None
            hits = decayed_hits(entry.hits, entry.last_access, now, half_life_s) + 1.0
            entry = self._entries[block] = replace(entry, hits=hits, last_access=now)
            self._dirty.add(block)
            return entry

    def add_attention(self, scores: dict[BlockId, float], now: float, half_life_s: float
                      ) -> None:
        """Add measured attention at ``now``: a block's earlier attention decays (as hits do,
        with the same half-life), then the new score is added; reporting counts as an access."""
        with self.lock:
            for block, score in scores.items():
                entry = self._entries.get(block)
                if entry is not None:
                    before = decayed_hits(max(entry.attention, 0.0), entry.last_access, now,
                                          half_life_s)
                    self._entries[block] = replace(entry, attention=before + float(score),
                                                   last_access=now)
                    self._dirty.add(block)

    def take_dirty(self) -> list[tuple[BlockId, BlockEntry]]:
        """The entries whose statistics changed since they were last written; no longer dirty."""
        with self.lock:
            dirty = [(b, self._entries[b]) for b in self._dirty if b in self._entries]
            self._dirty.clear()
            return dirty

    # -- content hashes --------------------------------------------------------------------------
    def find_hash(self, key: bytes) -> BlockId | None:
        """The stored block for ``namespace | chain hash``, if it is still stored."""
        with self.lock:
            block = self._hashes.get(key)
            return block if block is not None and block in self._entries else None

    def hash_owner(self, key: bytes) -> BlockId | None:
        with self.lock:
            return self._hashes.get(key)

    def put_hash(self, key: bytes, block: BlockId) -> None:
        with self.lock:
            self._hashes[key] = block

    def drop_hash(self, key: bytes) -> None:
        with self.lock:
            self._hashes.pop(key, None)

    # -- partial tails ---------------------------------------------------------------------------
    def find_tail(self, namespace: Namespace, parent: ChainHash | None, tokens: np.ndarray
                  ) -> BlockId | None:
        """The partial tail after the full block with chain hash ``parent`` (None: at the start)
        whose tokens are the longest prefix of ``tokens``; None if there is none."""
        with self.lock:
            after = list(self._tails.get(namespace + (parent or b""), {}).items())
        by_length: dict[int, dict[bytes, BlockId]] = {}
        for block, (n_tokens, chain) in after:
            if n_tokens <= len(tokens):
                by_length.setdefault(n_tokens, {})[chain] = block
        for n_tokens in sorted(by_length, reverse=True):
            block = by_length[n_tokens].get(chain_hash(parent, tokens[:n_tokens]))
            if block is not None and block in self:
                return block
        return None

    def tail_key(self, tokens: np.ndarray, blocks: Sequence[BlockId]) -> TailKey | None:
        """The key of the partial tail of a sequence of ``tokens`` held by ``blocks`` (all in
        the index): its last block, if that has no chain hash, holds the last tokens, and
        follows full blocks that have one. None otherwise."""
        with self.lock:
            entries = [self._entries[b] for b in blocks]
        if not entries:
            return None
        last = entries[-1]
        start = len(tokens) - last.n_tokens
        if last.chain or start < 0 or sum(e.n_tokens for e in entries[:-1]) != start:
            return None
        parent = entries[-2].chain if len(entries) > 1 else b""
        if len(entries) > 1 and not parent:
            return None
        chain = chain_hash(ChainHash(parent) if parent else None, tokens[start:])
        return TailKey(blocks[-1], parent, chain)

    # -- pins --------------------------------------------------------------------------------------
    def pin(self, blocks: Iterable[BlockId]) -> None:
        with self.lock:
            self._pins.update(blocks)

    def unpin(self, blocks: Iterable[BlockId]) -> list[BlockId]:
        """Release one pin of each block; returns those now unpinned whose promotion was put
        off (:meth:`promote_when_unpinned`), for the caller to schedule."""
        due = []
        with self.lock:
            for block in blocks:
                self._pins[block] -= 1
                if self._pins[block] <= 0:
                    del self._pins[block]
                    if block in self._promote_when_unpinned:
                        self._promote_when_unpinned.discard(block)
                        due.append(block)
        return due

    def promote_when_unpinned(self, block: BlockId) -> bool:
        """Put off a promotion of ``block`` until its pins are released; False (nothing put
        off) when it is not pinned."""
        with self.lock:
            if block not in self._pins:
                return False
            self._promote_when_unpinned.add(block)
            return True

    def hold(self, blocks: Iterable[BlockId]) -> None:
        with self.lock:
            self._held.update(blocks)

    def unhold(self, blocks: Iterable[BlockId]) -> None:
        with self.lock:
            self._held.difference_update(blocks)

    def candidates(self, tier: Tier, dropping: bool = False) -> list[Candidate[BlockId]]:
        """Every block of ``tier`` for the eviction policy; pinned and moving ones marked pinned,
        and when ``dropping``, held ones too."""
        with self.lock:
            return [candidate(b, e, b in self._pins or b in self._moves
                              or (dropping and b in self._held))
                    for b, e in self._entries.items() if e.tier == tier]

    # -- moves and reservations ---------------------------------------------------------------
    def movable(self, block: BlockId) -> BlockEntry | None:
        """The block's entry if it may start a move now (stored, not pinned, not moving)."""
        with self.lock:
            if block in self._pins or block in self._moves:
                return None
            return self._entries.get(block)

    def begin_move(self, block: BlockId, dest: Tier) -> Move:
        with self.lock:
            entry = self._entries[block]
            move = self._moves[block] = Move(entry.tier, dest, entry.stored_bytes,
                                             entry.n_layers)
            return move

    def may_commit(self, block: BlockId, move: Move) -> bool:
        """Whether a copied block may now change tiers: still stored where it was, not pinned."""
        with self.lock:
            entry = self._entries.get(block)
            return (not move.cancelled and entry is not None and entry.tier == move.source
                    and block not in self._pins)

    def end_move(self, block: BlockId) -> None:
        with self.lock:
            self._moves.pop(block, None)
            self._settled.notify_all()

    def leaving(self, tier: Tier) -> int:
        """Bytes that demotions in flight will free in ``tier``."""
        with self.lock:
            return sum(m.stored_bytes for m in self._moves.values()
                       if m.source == tier and m.dest > tier and not m.cancelled)

    def wait_for_moves(self, timeout_s: float) -> None:
        """Wait (releasing the lock) until a move ends, or ``timeout_s``."""
        with self.lock:
            self._settled.wait(timeout_s)

    def wait_until_settled(self, block: BlockId) -> None:
        """Wait until no move of ``block`` is in flight: a block id removed while its copy was
        being written is not free again until the copy is deleted."""
        with self.lock:
            while block in self._moves:
                self._settled.wait()

    def reserve(self, tier: Tier, nbytes: int) -> None:
        with self.lock:
            self.usage[tier].reserved_bytes += nbytes

    def release(self, tier: Tier, nbytes: int) -> None:
        with self.lock:
            self.usage[tier].reserved_bytes -= nbytes

"""Snapshot and restore: between a slot of the hot tier and the block records of the store.

Snapshots are incremental: a full block is written once (and not at all when another sequence
already stored the same chain hash); the partial tail is written under a fresh id each time it
changes, so blocks stay immutable and forks can share them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine import state_codec
from kvtier.engine.hot import HotContext
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.slots import Slot
from kvtier.errors import KvtierError
from kvtier.storage.catalog import BlockEntry, SequenceEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, ChainHash, LayerKV, Namespace, chain_hash
from kvtier.storage.tiers import Tier

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredSequence:
    """What the store holds of the conversation in a slot."""

    seq_id: int
    full: list[BlockId] = field(default_factory=list)
    """Stored full blocks, in order, holding a prefix of the slot's tokens."""
    chains: list[ChainHash] = field(default_factory=list)
    """Chain hashes of the slot's full blocks (may run ahead of ``full``)."""
    tail: BlockId | None = None
    tail_tokens: int = 0

    @property
    def blocks(self) -> list[BlockId]:
        return self.full + ([self.tail] if self.tail is not None else [])

    def n_tokens(self, block_size: int) -> int:
        """Tokens the stored blocks hold."""
        return len(self.full) * block_size + self.tail_tokens

    def truncated(self, keep: int, block_size: int) -> StoredSequence:
        """The same sequence cut to its first ``keep`` tokens: the full blocks within them, and
        the tail only if all of it is kept and nothing before it was cut."""
        n_full = keep // block_size
        tail_ok = self.tail is not None and len(self.full) == n_full \
            and keep >= n_full * block_size + self.tail_tokens
        return StoredSequence(self.seq_id, self.full[:n_full], self.chains[:n_full],
                              self.tail if tail_ok else None, self.tail_tokens if tail_ok else 0)


@dataclass(frozen=True, slots=True)
class RestorePlan:
    blocks: list[BlockId]
    """Block b of the list holds positions [b*block_size, ...): full blocks, then maybe a tail."""
    n_tokens: int


@dataclass(slots=True)
class Restored:
    n_tokens: int
    seconds: float
    tiers: Counter[Tier]
    """Tokens restored from each storage tier."""


class Snapshotter:
    def __init__(self, hot: HotContext, manager: TierManager, namespace: Namespace,
                 block_size: int, throughput: ThroughputModel) -> None:
        self.hot = hot
        self.manager = manager
        self.namespace = namespace
        self.block_size = block_size
        self.throughput = throughput
        self.layout = state_codec.layout_of(hot.ptr)

    # -- snapshot --------------------------------------------------------------------------------
    def _chains(self, tokens: np.ndarray, known: list[ChainHash]) -> list[ChainHash]:
        bs = self.block_size
        chains = known[:len(tokens) // bs]
        for b in range(len(chains), len(tokens) // bs):
            chains.append(chain_hash(chains[-1] if chains else None, tokens[b * bs:(b + 1) * bs]))
        return chains

    def save(self, slot: Slot, seq: StoredSequence) -> StoredSequence:
        """Store the blocks of ``slot`` that the store lacks and record the sequence."""
        tokens = slot.tokens
        bs = self.block_size
        n_full = len(tokens) // bs
        chains = self._chains(tokens, seq.chains)
        full = seq.full[:n_full]
        # Full blocks that some sequence already stored are shared; from the first one the store
        # lacks, the rest are written (put_block still shares any that exist by then).
        while len(full) < n_full:
            existing = self.manager.find_hash(self.namespace, chains[len(full)])
            if existing is None:
                break
            full.append(existing)
        missing = list(range(len(full), n_full))
        tail_len = len(tokens) - n_full * bs
        tail_changed = tail_len > 0 and (seq.tail is None or seq.tail_tokens != tail_len
                                         or missing or len(full) < len(seq.full))
        tail, tail_tokens = (seq.tail, seq.tail_tokens) if tail_len and not tail_changed \
            else (None, 0)
        if missing or tail_changed:
            blocks = state_codec.split_blocks(
                state_codec.parse(state_codec.read_state(self.hot.ptr, slot.index)), bs)
            for b in missing:
                stored = self.manager.put_block(self._fresh_id(seq.seq_id, b), blocks[b],
                                                chains[b])
                full.append(stored)
            if tail_changed:
                tail = self.manager.put_block(self._fresh_id(seq.seq_id, n_full), blocks[n_full])
                tail_tokens = tail_len
        saved = StoredSequence(seq.seq_id, full, chains, tail, tail_tokens)
        self.manager.save_sequence(self.namespace, seq.seq_id, tokens, saved.blocks)
        return saved

    def _fresh_id(self, seq_id: int, block: int) -> BlockId:
        candidate = BlockId(self.namespace, seq_id, block)
        if not self.manager.has_block(candidate):
            return candidate
        return BlockId(self.namespace, self.manager.new_sequence(), block)

    # -- restore ---------------------------------------------------------------------------------
    def plan(self, tokens: np.ndarray, sequence: SequenceEntry | None = None) -> RestorePlan:
        """The longest stored prefix of ``tokens``: shared full blocks, then a partial tail
        whose tokens continue them: ``sequence``'s own (a session's), else any stored one."""
        bs = self.block_size
        blocks = self.manager.match_prefix(self.namespace, tokens, bs)
        n = len(blocks) * bs
        tail = self._own_tail(tokens, n, sequence) if sequence is not None else None
        if tail is None:
            tail = self._stored_tail(tokens, blocks)
        if tail is not None:
            entry = self.manager.block_entry(tail)
            if entry is not None and n + entry.n_tokens <= len(tokens):
                return RestorePlan(blocks + [tail], n + entry.n_tokens)
        return RestorePlan(blocks, n)

    def _own_tail(self, tokens: np.ndarray, n: int, sequence: SequenceEntry) -> BlockId | None:
        """``sequence``'s tail, if it follows the ``n`` matched tokens and ``tokens`` continue
        it (this also finds tails stored before tails were indexed)."""
        stored = np.frombuffer(sequence.tokens, dtype="<i4")
        if len(sequence.blocks) != n // self.block_size + 1 \
                or not 0 < len(stored) - n < self.block_size or len(tokens) < len(stored):
            return None
        if not np.array_equal(stored[n:], tokens[n:len(stored)]):
            return None
        return BlockId.from_bytes(sequence.blocks[-1])

    def _stored_tail(self, tokens: np.ndarray, full: list[BlockId]) -> BlockId | None:
        """Any stored sequence's tail that continues the matched full blocks ``full``."""
        parent = None
        if full:
            entry = self.manager.block_entry(full[-1])
            if entry is None or not entry.chain:
                return None
            parent = ChainHash(entry.chain)
        n = len(full) * self.block_size
        return self.manager.match_tail(self.namespace, parent, tokens[n:n + self.block_size - 1])

    def worth_restoring(self, plan: RestorePlan) -> bool:
        per_tier: Counter[Tier] = Counter()
        for b, block in enumerate(plan.blocks):
            entry = self.manager.block_entry(block)
            if entry is None:
                return False
            per_tier[entry.tier] += min(self.block_size, plan.n_tokens - b * self.block_size)
        return self.throughput.restore_wins(per_tier)

    def restore(self, slot: Slot, plan: RestorePlan, tokens: np.ndarray) -> Restored:
        """Put the plan's blocks into ``slot`` (cleared first). Stops at the first block that is
        missing or corrupt: what comes after it is recomputed, nothing is lost."""
        start = time.perf_counter()
        with self.manager.pinned(plan.blocks):
            entries = [self.manager.block_entry(block) for block in plan.blocks]
            usable = next((j for j, e in enumerate(entries) if e is None), len(entries))
            blocks = plan.blocks[:usable]
            if self._direct:
                blob, n_blocks = self._decode_into_blob(slot, blocks, entries)
            else:
                blob, n_blocks = self._compose(slot, blocks)
        tiers: Counter[Tier] = Counter()
        for entry in entries[:n_blocks]:
            tiers[entry.tier] += entry.n_tokens
        n = min(plan.n_tokens, tiers.total())
        self.hot.clear(slot)
        if n == 0:
            return Restored(0, 0.0, tiers)
        state_codec.write_state(self.hot.ptr, slot.index, blob)
        slot.tokens = np.array(tokens[:n], dtype=np.int32)
        seconds = time.perf_counter() - start
        for tier, count in tiers.items():
            if count:
                self.throughput.observe_restore(tier, count, seconds * count / n)
        return Restored(n, seconds, tiers)

    @property
    def _direct(self) -> bool:
        """Records can be decoded straight into the blob: one cache, V stored per token."""
        return len(self.layout.caches) == 1 and not self.layout.caches[0].v_trans

    def _decode_into_blob(self, slot: Slot, blocks: list[BlockId], entries: list[BlockEntry]
                          ) -> tuple[memoryview, int]:
        cache = self.layout.caches[0]
        while True:
            target = state_codec.allocate(
                self.layout, slot.index, state_codec.stream_of(self.layout, slot.index),
                [(j, [entries[j].n_tokens]) for j in range(len(blocks))], self.block_size)

            def destination(j: int, layer: int
                            ) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
                k, v = target.rows(j, layer)
                return k, v, cache.k_types[layer], cache.v_types[layer]

            errors = self.manager.get_blocks_into(blocks, destination)
            bad = next((j for j, e in enumerate(errors) if e is not None), None)
            if bad is None:
                return target.blob, len(blocks)
            log.warning("restore stops at block %d of %d: %s", bad, len(blocks), errors[bad])
            blocks = blocks[:bad]

    def _compose(self, slot: Slot, blocks: list[BlockId]) -> tuple[memoryview, int]:
        loaded: list[tuple[int, list[LayerKV]]] = []
        for j, result in enumerate(self.manager.get_blocks(blocks)):
            if isinstance(result, KvtierError):
                log.warning("restore stops at block %d of %d: %s", j, len(blocks), result)
                break
            loaded.append((j, result))
        blob = state_codec.compose(self.layout, slot.index,
                                   state_codec.stream_of(self.layout, slot.index), loaded,
                                   self.block_size)
        return blob, len(loaded)

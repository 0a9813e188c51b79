"""A conversation longer than its slot's hot share: its blocks in the store, a working set hot.

A :class:`Window` is the working set of one slot (:mod:`kvtier.engine.working_set` decides which
blocks and where; this module moves them). Every full block of the conversation is stored as soon
as it is complete, with the position its keys were computed at and its key summary; the hot tier
then holds only the sinks, the recent blocks and the blocks the latest queries score highest.

Moving blocks, in a unified cache (:mod:`kvtier.engine.hot`):

- drop: ``llama_memory_seq_rm`` of the block's positions;
- move: ``llama_memory_seq_add`` (the K-shift, applied by llama.cpp at the next decode);
- load: the block's records are decoded into a state blob composed for the scratch sequence at the
  position they were computed at, written there, shifted if their place differs, and handed to
  the slot with ``llama_memory_seq_cp`` (no data copied).

llama.cpp reads state without applying pending K-shifts, so a block is stored right after the
decode that completed it, and a plan (:meth:`Window.replan`) is applied only just before the
slot's next decode (:meth:`Window.apply`), never before a state read.

Storing a block, with a :class:`~kvtier.engine.store_writer.StoreWriter` (the engine's case): the
engine thread only reads the block's cells out of llama.cpp into one of the writer's buffers (its
budget, ``tiers.store_queue_budget``, is the back-pressure) and takes the key summary of the
sampled layers for scoring; the writer encodes and writes the block (held until its sequence is
saved). A block dropped from the hot tier and wanted back before its write is done is copied
from the writer's buffer; one whose write failed is not loaded again (the working set does
without it, and the sequence is saved up to it). Without a writer (benchmarks) the block is
stored on the spot.

Every block sits at a multiple of the block size (its own position, or packed), so the block
convention of :mod:`kvtier.engine.state_codec` places it by the index ``position // block_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine import state_codec, working_set
from kvtier.engine.block_scores import SummaryStack
from kvtier.engine.host_buffers import BufferPool
from kvtier.engine.hot import HotContext
from kvtier.engine.sizing import HotSizing
from kvtier.engine.slots import Slot
from kvtier.engine.store_writer import BlockWrite, StoreJob, StoreWriter, rows_at
from kvtier.errors import KvtierError
from kvtier.storage.catalog import KeySummary
from kvtier.storage.manager import TierManager
from kvtier.storage.reads import RowTargets
from kvtier.storage.records import WINDOWED, BlockId, ChainHash, LayerKV, Namespace, chain_hash
from kvtier.storage.tiers import Tier

log = logging.getLogger(__name__)

_FAR = 1 << 28
"""Moves go through positions this far up, so that no range caught by a move holds another
block on its way (llama.cpp moves every cell of a sequence inside the range it is given)."""


@dataclass(slots=True)
class StoredBlock:
    """A full block of the conversation, in the store."""

    block: BlockId
    position: int
    """Where its first token sat when its keys were computed."""
    chain: ChainHash
    summary: Summary | None
    """Per sampled layer, the per-channel (minimum, maximum) of its keys: (layers, kv, dim), and
    its representative keys (layers, n, kv, dim), if stored."""


Summary = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""A stored block's key summary in the sampled layers: minima, maxima, representatives."""

PREFETCH_FACTOR = 2
"""A selection prefetches this many times as many of the next-best blocks as it holds."""


@dataclass(slots=True)
class WindowStats:
    """What a window did, for usage and stats."""

    selections: int = 0
    loads: int = 0
    drops: int = 0
    moves: int = 0
    stored: int = 0
    prefetches: int = 0
    """Blocks a selection asked the store to promote to warm."""
    prefetch_hits: int = 0
    """Loads of a prefetched block that found it in warm."""
    prefetch_misses: int = 0
    """Loads that had to read cool or cold (the prefetch was late, or never asked)."""
    pending_reads: int = 0
    """Loads of a block still queued for the store writer, copied from its buffer."""


@dataclass(slots=True)
class Window:
    """The working set of one slot. Engine thread only."""

    hot: HotContext
    slot: Slot
    sizing: HotSizing
    manager: TierManager
    namespace: Namespace
    seq_id: int
    layers: list[int]
    """The layers whose queries are captured (and whose summaries score blocks)."""
    n_kv: int
    head_dim: int
    prefetch: bool = True
    """Promote the next-best blocks of each selection to warm."""
    writer: StoreWriter | None = None
    """Stores the blocks off the engine thread (None: on it)."""
    score_by: str = "bound"
    """``working_set.score``: ``bound`` (Quest's, over key ranges) or ``keys`` (mean keys)."""
    buffers: BufferPool | None = None
    """Host buffers (pinned on a GPU build) that loads compose their state blobs in; None: a
    fresh blob each load."""
    stored: list[StoredBlock] = field(default_factory=list)
    """The conversation's full blocks, in order."""
    held: dict[int, int] = field(default_factory=dict)
    """Block index -> the position of its first token in the hot tier."""
    tail: StoredBlock | None = None
    """A stored partial last block on its way into the hot tier (a restore)."""
    packed: bool = False
    scores: dict[int, float] = field(default_factory=dict)
    pending: working_set.Plan | None = None
    stats: WindowStats = field(default_factory=WindowStats)
    _prefetched: set[int] = field(default_factory=set)
    """Blocks a prefetch asked for since they were last loaded."""
    _failed: set[int] = field(default_factory=set)
    """Blocks whose write failed (added by the writer's thread)."""
    _stack: SummaryStack | None = None
    """The summaries of the stored blocks, as scoring reads them."""

    # -- shape ---------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.sizing.block_size

    @property
    def n_tokens(self) -> int:
        return len(self.slot.tokens)

    @property
    def n_blocks(self) -> int:
        """Blocks of the conversation, the partial last one included."""
        return -(-self.n_tokens // self.block_size)

    def lengths_of(self, blocks: Sequence[int]) -> list[int]:
        """Tokens in each of these blocks of the conversation."""
        bs = self.block_size
        return [min(bs, self.n_tokens - b * bs) for b in blocks]

    def lengths(self) -> dict[int, int]:
        """Tokens of each held block."""
        return dict(zip(self.held, self.lengths_of(list(self.held))))

    @property
    def next_position(self) -> int:
        """Where the slot's next token is decoded: after the last held token (llama.cpp takes a
        sequence's next token at its largest position + 1)."""
        return working_set.next_position(self.held, self.lengths())

    @property
    def held_tokens(self) -> int:
        return sum(self.lengths().values())

    @property
    def hot_prefix(self) -> int:
        """Tokens of the conversation's start that the slot holds in order at their own
        positions: all that a new prompt sharing that start can keep of this slot's cells (the
        rest of what it holds is a working set, not the conversation's next tokens)."""
        bs, b = self.block_size, 0
        while self.held.get(b) == b * bs:
            b += 1
        return min(self.n_tokens, b * bs)

    # -- building ------------------------------------------------------------------------------
    def adopt_hot(self, chains: Sequence[ChainHash]) -> None:
        """Take over a slot whose conversation is hot from position 0 (a conversation that just
        outgrew its share, or a prompt started from nothing): its full blocks are stored now."""
        bs = self.block_size
        self.held = {b: b * bs for b in range(self.n_blocks)}
        for b in range(len(self.stored), self.n_tokens // bs):
            self.store_block(b, chains[b] if b < len(chains) else None)

    def restore(self, tokens: np.ndarray, full: Sequence[StoredBlock],
                tail: StoredBlock | None) -> None:
        """Start from stored blocks holding ``tokens``: full ones, and maybe a partial tail; the
        slot is empty. Its sinks and recent blocks are brought in (the rest when queries ask)."""
        self.stored, self.tail, self.held = list(full), tail, {}
        self._stack = None
        self.slot.tokens = np.asarray(tokens, dtype=np.int32)
        self.load_summaries()
        self.replan(0)
        self.apply()
        self.tail = None

    def store_tail(self) -> StoredBlock | None:
        """Store the partial last block, hot now (a new block each time: blocks are immutable);
        None when the conversation ends on a block boundary."""
        bs, n = self.block_size, self.n_tokens
        if n % bs == 0:
            return None
        b = n // bs
        position = self.held[b]
        if self.writer is not None:
            tail = StoredBlock(self._fresh_id(b), position, ChainHash(b""), None)
            self._submit(tail, n % bs)
            return tail
        blob = self.hot.read_range(self.slot.index, position, position + n % bs)
        layers = rows_at(state_codec.parse(blob), position, n % bs)
        stored = self.manager.put_block(self._fresh_id(b), layers, None, position)
        return StoredBlock(stored, position, ChainHash(b""), None)

    def _fresh_id(self, b: int) -> BlockId:
        """An id for block ``b`` that no stored block has (blocks are immutable: a tail that
        grew is a new block)."""
        block = BlockId(self.namespace, self.seq_id, b)
        if self.manager.has_block(block) or \
                (self.writer is not None and self.writer.is_pending(block)):
            block = BlockId(self.namespace, self.manager.new_sequence(), b)
        return block

    def _block(self, b: int) -> StoredBlock:
        """Stored block ``b``: a full one, or the tail being restored."""
        if b < len(self.stored):
            return self.stored[b]
        if self.tail is not None and b == len(self.stored):
            return self.tail
        raise KvtierError(f"block {b} of the conversation is not stored")

    def block_id(self, b: int) -> BlockId:
        """The id stored block ``b`` has in the store: the one it was promised, or the shared
        block's once the writer found its chain hash stored."""
        stored = self._block(b)
        if self.writer is not None:
            stored.block = self.writer.resolve(stored.block)
        return stored.block

    # -- storing -------------------------------------------------------------------------------
    def store_block(self, b: int, chain: ChainHash | None = None) -> StoredBlock:
        """Store full block ``b``, hot now and complete since the last decode."""
        bs = self.block_size
        if b != len(self.stored):
            raise KvtierError(f"block {b} stored out of order ({len(self.stored)} are stored)")
        position = self.held[b]
        if chain is None:
            parent = self.stored[-1].chain if self.stored else None
            exact = len(self.held) == self.n_blocks and all(
                self.held.get(i) == i * bs for i in range(b + 1))
            chain = chain_hash(parent, self.slot.tokens[b * bs:(b + 1) * bs],
                               b"" if exact else WINDOWED)
        if self.writer is None:
            blob = self.hot.read_range(self.slot.index, position, position + bs)
            layers = rows_at(state_codec.parse(blob), position, bs)
            stored = self.manager.put_block(self._fresh_id(b), layers, chain, position)
            block = StoredBlock(stored, position, chain, self._summary_of(layers))
        else:
            block = StoredBlock(self._fresh_id(b), position, chain, None)
            self._submit(block, bs, lambda error: self._written(b, block, error))
        self.stored.append(block)
        self.stats.stored += 1
        return block

    def _written(self, b: int, block: StoredBlock, error: BaseException | None) -> None:
        """On the writer's thread, once block ``b`` is stored (or failed): its key summary,
        which the store computed from all its rows, is read back for scoring. The engine thread
        computes one itself only for a block a selection may choose before the writer got to it
        (a summary cost an 8B block 20-29 ms on one core of an H200 host)."""
        if error is not None:
            self._failed.add(b)
            return
        assert self.writer is not None
        summary = self.manager.key_summaries([self.writer.resolve(block.block)])[0]
        block.summary = self._sampled(summary)

    def _submit(self, block: StoredBlock, n: int,
                done: Callable[[BaseException | None], None] | None = None) -> None:
        """Read ``n`` cells of ``block`` from its position into a writer's buffer and queue their
        store under its id; ``done(error)`` runs on the writer's thread when it is stored."""
        assert self.writer is not None
        position = block.position
        buffer, nbytes = self.hot.read_range_into(self.slot.index, position, position + n,
                                                  self.writer.pool)
        chain = block.chain if n == self.block_size else None
        self.writer.submit(StoreJob(buffer, nbytes, [BlockWrite(
            block.block, chain, position, n, position=position)], done=done))

    def _summary_of(self, layers: Sequence[LayerKV]) -> Summary | None:
        """The key summary of the sampled layers (copied out of ``layers``)."""
        from kvtier.storage.summary import key_summary
        summary = key_summary([layers[i] for i in self.layers])
        return self._shaped(summary)

    def _sampled(self, summary: KeySummary | None) -> Summary | None:
        """A whole block's key summary (from the catalog) in the sampled layers."""
        if summary is None:
            return None
        reps = summary.representatives
        return self._shaped(KeySummary(summary.bounds[self.layers],
                                       None if reps is None else reps[self.layers]))

    def _shaped(self, summary: KeySummary | None) -> Summary | None:
        if summary is None:
            return None
        layers = summary.bounds.shape[0]
        bounds = summary.bounds.astype(np.float32)
        shape = (layers, self.n_kv, self.head_dim)
        reps = summary.representatives
        if reps is not None:
            reps = reps.astype(np.float32).reshape(layers, reps.shape[1], self.n_kv,
                                                   self.head_dim)
        return bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape), reps

    def load_summaries(self) -> None:
        """Fill in the key summaries of stored blocks that lack them, from the catalog."""
        missing = [i for i, s in enumerate(self.stored) if s.summary is None]
        for i, summary in zip(missing, self.manager.key_summaries(
                [self.stored[i].block for i in missing])):
            self.stored[i].summary = self._sampled(summary)

    # -- choosing ------------------------------------------------------------------------------
    def score(self, queries: np.ndarray) -> dict[int, float]:
        """Score the stored blocks for ``queries`` (sampled layers, rows, heads, dim): each one's
        share of their attention by its key summary, times the number of blocks (1 is average).

        Every score is reported to the store (measured attention drives the tiers); the blocks
        that may be selected (not sinks, not recent) are remembered for the next selections, and
        the best of them that sit below warm are prefetched there."""
        shape = self.sizing.shape
        first_recent = max(shape.sink, self.n_blocks - shape.recent)
        stack = self._stacked(range(shape.sink, first_recent))
        if not len(stack):
            return {}
        # Blocks stored without representative keys make every block scored by the bound.
        shares = stack.shares(queries, self.score_by)
        attention = dict(zip(stack.blocks, (float(s) * len(stack) for s in shares)))
        self.manager.report_attention({self.block_id(b): a for b, a in attention.items()})
        self.scores = {b: a for b, a in attention.items() if shape.sink <= b < first_recent}
        self.stats.selections += 1
        if self.prefetch:
            room = shape.budget - shape.sink - shape.recent
            best = [b for b in sorted(self.scores, key=lambda b: -self.scores[b])
                    [:PREFETCH_FACTOR * room] if b not in self.held]
            self.stats.prefetches += self.manager.prefetch([self.block_id(b) for b in best])
            self._prefetched.update(best)
        return self.scores

    def _stacked(self, candidates: range) -> SummaryStack:
        """The scoring stack, with every stored block whose summary is known by now (the store
        writer reads a block's back once it is written) and every block of ``candidates`` (those
        a selection may choose): one still queued for the writer is summarized from the
        writer's buffer."""
        if self._stack is None:
            self._stack = SummaryStack(len(self.layers), self.n_kv, self.head_dim)
        stack = self._stack
        if len(stack) < len(self.stored):
            for b, stored in enumerate(self.stored):
                if b in stack:
                    continue
                if stored.summary is None and b in candidates and b not in self._failed:
                    self._summarize(b)
                if stored.summary is not None:
                    stack.add(b, *stored.summary)
        return stack

    def _summarize(self, b: int) -> None:
        """Fill in the summary of stored block ``b``, which the writer has not reported on yet:
        from the writer's buffer while it is queued, else from the store."""
        stored = self.stored[b]

        def take(layers: list[LayerKV]) -> None:
            stored.summary = self._summary_of(layers)
        if self.writer is None or not self.writer.read_pending(stored.block, take):
            stored.summary = self._sampled(self.manager.key_summaries([self.block_id(b)])[0])

    def replan(self, n_upcoming: int = 0) -> working_set.Plan:
        """Choose the working set for the slot's next decode (of ``n_upcoming`` tokens, which
        may start a new block) and keep the plan until :meth:`apply`."""
        bs = self.block_size
        span = self.n_tokens + n_upcoming
        wanted = working_set.select(-(-span // bs), self.scores, self.sizing.shape, self.held)
        # The new block is not a block yet; a block whose write failed cannot come back.
        wanted = [b for b in wanted if b < self.n_blocks and (b in self.held or
                                                              b not in self._failed)]
        if not self.packed and (self.sizing.packed or span > self.sizing.max_position):
            if not self.hot.can_shift:
                raise KvtierError("this model's KV cache cannot be shifted, so a conversation "
                                  "cannot go past its trained context")
            self.packed = True
        placement = working_set.place(wanted, bs, self.sizing.max_position + 1 if self.packed
                                      else span, self.sizing.max_position)
        self.pending = working_set.plan(self.held, placement)
        return self.pending

    # -- around a decode -------------------------------------------------------------------------
    def prepare(self, n_upcoming: int) -> int:
        """Before decoding ``n_upcoming`` tokens of this slot: choose and arrange the working set
        for them, and return the position the first of them goes to."""
        self.replan(n_upcoming)
        self.apply()
        position = self.next_position
        if self.n_tokens % self.block_size == 0:
            self.held[self.n_blocks] = position     # the block these tokens start
        return position

    def completed(self, queries: np.ndarray | None = None) -> None:
        """After a decode: store the blocks it completed, and score with its queries."""
        while len(self.stored) < self.n_tokens // self.block_size:
            self.store_block(len(self.stored))
        if queries is not None:
            self.score(queries)

    def retract(self, n: int) -> None:
        """Forget the last ``n`` tokens decoded (at most a block): their cells are freed, so they
        can be decoded again, on another working set. A stored block they were in stays stored:
        decoding the same tokens again gives the block it holds."""
        bs = self.block_size
        keep = self.n_tokens - n
        end = self.next_position
        self.hot.remove(self.slot.index, end - n, end)
        self.slot.tokens = self.slot.tokens[:keep]
        if keep % bs == 0:
            self.held.pop(keep // bs, None)

    # -- moving --------------------------------------------------------------------------------
    def apply(self) -> None:
        """Carry out the pending plan: drops, moves, then loads from the store."""
        plan, self.pending = self.pending, None
        if plan is None or plan.empty:
            return
        seq = self.slot.index
        for drop in plan.drop:
            self.hot.remove(seq, drop.source, drop.source + self.lengths()[drop.block])
            del self.held[drop.block]
            self.stats.drops += 1
        for move in plan.move:
            length = self.lengths()[move.block]
            self.hot.shift(seq, move.source, move.source + length, _FAR + move.target - move.source)
        for move in plan.move:
            length = self.lengths()[move.block]
            self.hot.shift(seq, _FAR + move.target, _FAR + move.target + length, -_FAR)
            self.held[move.block] = move.target
            self.stats.moves += 1
        if plan.load:
            self._load(plan.load)

    def _load(self, loads: Sequence[working_set.Move]) -> None:
        """Bring stored blocks in, in as few state blobs as their positions allow: each block is
        written into the scratch sequence at the position it was computed at, then moved to its
        place, so blocks computed at the same position (a packed conversation's) need separate
        blobs."""
        groups: list[list[working_set.Move]] = []
        for move in loads:
            at = self._block(move.block).position
            group = next((g for g in groups
                          if all(self._block(m.block).position != at for m in g)), None)
            if group is None:
                groups.append([move])
            else:
                group.append(move)
        for group in groups:
            self._load_group(group)

    def _load_group(self, group: Sequence[working_set.Move]) -> None:
        held = []

        def memory(nbytes: int) -> np.ndarray:
            assert self.buffers is not None
            held.append(self.buffers.acquire(nbytes))
            return held[-1].view(nbytes)
        try:
            self._load_blob(group, memory if self.buffers is not None else None)
        finally:
            for buffer in held:
                self.buffers.release(buffer)

    def _load_blob(self, group: Sequence[working_set.Move],
                   memory: Callable[[int], np.ndarray] | None) -> None:
        bs = self.block_size
        blocks = [self._block(m.block) for m in group]
        lengths = self.lengths_of([m.block for m in group])
        layout = self.hot.layout
        target = state_codec.allocate(layout, self.hot.scratch, 0,
                                      [(s.position // bs, [n]) for s, n in zip(blocks, lengths)],
                                      bs, out=memory)
        row_of = [target.blocks.index(s.position // bs) for s in blocks]

        def copy_into(i: int) -> Callable[[list[LayerKV]], None]:
            def copy(layers: list[LayerKV]) -> None:
                for layer, kv in enumerate(layers):
                    target.rows(row_of[i], layer)[0][...] = kv.k.rows
                    target.put_v(row_of[i], layer, kv.v.rows)
            return copy

        # A block dropped from the hot tier may still be on its way into the store: its rows
        # come from the writer's buffer; the others from the store.
        fetch = [i for i, s in enumerate(blocks)
                 if self.writer is None or not self.writer.read_pending(s.block, copy_into(i))]
        self.stats.pending_reads += len(blocks) - len(fetch)
        ids = [self.block_id(group[i].block) for i in fetch]
        for i, block in zip(fetch, ids):
            entry = self.manager.block_entry(block)
            if entry is not None and entry.tier != Tier.WARM:
                self.stats.prefetch_misses += 1
            elif group[i].block in self._prefetched:
                self.stats.prefetch_hits += 1
        self._prefetched.difference_update(m.block for m in group)
        with self.manager.pinned(ids):
            errors = self.manager.get_blocks_into(ids, self._destination(
                target, [row_of[i] for i in fetch], [lengths[i] for i in fetch]))
        bad = [(group[i], e) for i, e in zip(fetch, errors) if e is not None]
        if bad:
            # The working set does without a block it cannot read (its write failed, or the store
            # lost it): the conversation goes on, and its sequence is saved up to that block.
            log.warning("%d blocks of the working set could not be read (the first: %s); it "
                        "goes on without them", len(bad), bad[0][1])
            self._failed.update(m.block for m, _ in bad)
            rest = [m for m in group if m.block not in self._failed]
            if rest:
                self._load_blob(rest, memory)
            return
        self.hot.write_scratch(target.blob)
        # Every block goes to its place by way of a far position, so that no range moved holds
        # another block of the blob (llama.cpp moves every cell of the sequence in the range).
        shifted = [(m, s, n) for m, s, n in zip(group, blocks, lengths) if m.target != s.position]
        scratch = self.hot.scratch
        for move, stored, n in shifted:
            self.hot.shift(scratch, stored.position, stored.position + n,
                           _FAR + move.target - stored.position)
        for move, stored, n in shifted:
            self.hot.shift(scratch, _FAR + move.target, _FAR + move.target + n, -_FAR)
        self.hot.adopt_scratch(self.slot.index)
        for move in group:
            self.held[move.block] = move.target
            self.stats.loads += 1

    def _destination(self, target: state_codec.ComposedState, rows: list[int],
                     lengths: list[int]) -> RowTargets | Callable:
        """Where the store decodes the blocks fetched (``rows``: their places in the blob): by
        address where V is stored per token, so no Python runs per record; else through
        :meth:`~state_codec.ComposedState.rows` (a transposed V is written by ``put_v``)."""
        cache = self.hot.layout.caches[0]
        if not cache.v_trans:
            base = np.frombuffer(target.blob, np.uint8).__array_interface__["data"][0]
            return RowTargets(base + target.k_offsets[rows], base + target.v_offsets[rows],
                              cache.k_types, cache.v_types, cache.k_row_bytes,
                              cache.v_row_bytes, tuple(lengths))

        def destination(j: int, layer: int):
            k, v = target.rows(rows[j], layer)
            return k, v, cache.k_types[layer], cache.v_types[layer]
        return destination

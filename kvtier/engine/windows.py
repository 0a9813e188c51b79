"""The scheduler's side of long conversations: which slots run a working set, and what a job on
such a slot does differently (:mod:`kvtier.engine.paging` moves the blocks).

A job runs on a working set when its conversation is longer than a slot's hot share. Then:

- its stored prefix is not restored whole: its sinks and recent blocks are, the rest stays in the
  store until queries ask for it;
- its prompt is prefilled a block at a time, each chunk ending on a block boundary so that the
  block is stored right after; the queries of each chunk's last tokens choose the working set of
  the next (as InfLLM does, one chunk late);
- the prompt's last chunk is decoded twice: once to capture its queries, then again on the working
  set they chose (the question of a long document is what must find the right blocks);
- while generating, queries are captured every ``working_set.reselect_tokens`` tokens and the
  working set is chosen again; each block that fills up is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.engine.host_buffers import BufferPool
from kvtier.engine.hot import HotContext
from kvtier.engine.paging import StoredBlock, Window, WindowStats
from kvtier.engine.query_capture import RowRange
from kvtier.engine.sizing import HotSizing
from kvtier.engine.slots import Slot
from kvtier.engine.snapshot import RestorePlan, StoredSequence
from kvtier.engine.store_writer import SequenceWrite, StoreJob, StoreWriter
from kvtier.errors import KvtierError
from kvtier.storage.manager import TierManager
from kvtier.storage.records import ChainHash, Namespace


@dataclass(slots=True)
class WindowedTurn:
    """What one job on a working set is doing, beyond an ordinary job."""

    window: Window
    second_pass: bool = False
    """The prompt's last chunk was decoded once and is being decoded again."""
    since_selection: int = 0
    """Tokens generated since the working set was last chosen."""
    capture_first: int = -1
    """Row of the job's first captured query in the current batch (-1: none captured)."""


class WindowedSlots:
    """The working sets of the hot tier's slots (engine thread only)."""

    def __init__(self, hot: HotContext, sizing: HotSizing, manager: TierManager,
                 namespace: Namespace, query_tokens: int, reselect_tokens: int,
                 prefetch: bool = True, writer: StoreWriter | None = None,
                 score_by: str = "bound", buffers: BufferPool | None = None) -> None:
        self.hot = hot
        self.sizing = sizing
        self.manager = manager
        self.namespace = namespace
        self.query_tokens = query_tokens
        self.reselect_tokens = reselect_tokens
        self.prefetch = prefetch
        self.writer = writer
        """Stores the working sets' blocks off the engine thread."""
        self.score_by = score_by
        self.buffers = buffers
        """Host buffers that loads compose their blobs in (the restores' pinned ones)."""
        self.windows: dict[int, Window] = {}
        self.totals = WindowStats()
        model = hot.model
        self._n_kv = model.n_head_kv
        self._head_dim = model.head_dim_k

    # -- which slots ---------------------------------------------------------------------------
    def get(self, slot: Slot) -> Window | None:
        return self.windows.get(slot.index)

    def needed(self, slot: Slot, prompt: np.ndarray) -> bool:
        """Whether a job with this prompt runs on a working set in this slot."""
        return slot.index in self.windows or self.sizing.windowed(len(prompt))

    def continues(self, slot: Slot, prompt: np.ndarray) -> bool:
        """Whether the slot's working set holds a conversation that ``prompt`` extends."""
        window = self.windows.get(slot.index)
        n = len(slot.tokens)
        return window is not None and 0 < n < len(prompt) and \
            bool(np.array_equal(slot.tokens, prompt[:n]))

    def drop(self, slot: Slot) -> None:
        """Forget a slot's working set (its blocks stay in the store)."""
        window = self.windows.pop(slot.index, None)
        if window is not None:
            self._add_stats(window)

    def _new(self, slot: Slot, seq_id: int) -> Window:
        self.drop(slot)
        window = Window(self.hot, slot, self.sizing, self.manager, self.namespace, seq_id,
                        self.hot.capture.layers, self._n_kv, self._head_dim, self.prefetch,
                        self.writer, self.score_by, self.buffers)
        self.windows[slot.index] = window
        return window

    # -- starting a job ------------------------------------------------------------------------
    def start(self, slot: Slot, prompt: np.ndarray, plan: RestorePlan, seq: StoredSequence,
              hot_prefix: int) -> tuple[WindowedTurn, int, int]:
        """Set the slot up for a job on a working set; returns its turn, the prompt tokens whose
        KV it has (hot or stored) and, of those, how many came from the store."""
        bs = self.sizing.block_size
        if self.continues(slot, prompt):
            return WindowedTurn(self.windows[slot.index]), len(slot.tokens), 0
        if plan.n_tokens > hot_prefix:
            self.hot.clear(slot)
            window = self._new(slot, seq.seq_id)
            n_full = plan.n_tokens // bs
            full = [self._stored(plan.blocks[b], b, seq) for b in range(n_full)]
            tail = self._stored(plan.blocks[n_full], n_full, seq) \
                if plan.n_tokens % bs else None
            window.restore(prompt[:plan.n_tokens], full, tail)
            return WindowedTurn(window), plan.n_tokens, plan.n_tokens
        window = self._new(slot, seq.seq_id)
        if hot_prefix:   # the slot holds a prefix, all of it hot from position 0
            self.hot.truncate(slot, hot_prefix)
            window.adopt_hot(seq.chains)
        return WindowedTurn(window), hot_prefix, 0

    def _stored(self, block, index: int, seq: StoredSequence) -> StoredBlock:
        entry = self.manager.block_entry(block)
        if entry is None:
            raise KvtierError(f"block {index} of the conversation left the store")
        position = entry.position if entry.position >= 0 else index * self.sizing.block_size
        return StoredBlock(block, position, ChainHash(entry.chain), None)

    # -- a decode step -------------------------------------------------------------------------
    def prefill_chunk(self, turn: WindowedTurn, pending: np.ndarray, budget: int) -> np.ndarray:
        """The next chunk of a prompt: up to the next block boundary, within ``budget``."""
        n = len(turn.window.slot.tokens)
        room = self.sizing.block_size - n % self.sizing.block_size
        return pending[:min(room, budget)]

    def wants_queries(self, turn: WindowedTurn, prefill: bool) -> bool:
        """Whether this step's decode should capture the job's queries."""
        return prefill or turn.since_selection + 1 >= self.reselect_tokens

    def capture_range(self, first_row: int, n_tokens: int) -> RowRange:
        n = min(self.query_tokens, n_tokens)
        return RowRange(first_row + n_tokens - n, n)

    def after_prefill(self, turn: WindowedTurn, chunk: np.ndarray, last: bool,
                      queries: np.ndarray | None) -> bool:
        """After a prompt chunk was decoded; False when it must be decoded again (the last
        chunk's first pass: its queries chose a new working set)."""
        window = turn.window
        if last and not turn.second_pass and queries is not None and window.stored:
            window.score(queries)
            window.retract(len(chunk))
            turn.second_pass = True
            return False
        window.completed(queries)
        return True

    def after_token(self, turn: WindowedTurn, queries: np.ndarray | None) -> None:
        turn.since_selection = 0 if queries is not None else turn.since_selection + 1
        turn.window.completed(queries)

    # -- finishing ---------------------------------------------------------------------------
    def finish(self, turn: WindowedTurn) -> tuple[StoredSequence, StoreJob]:
        """Queue the store of what is not stored yet (the partial last block); returns the
        sequence as the store will hold it, and the job that records it, for the writer (it
        runs after the block writes queued before it)."""
        window = turn.window
        tail = window.store_tail()
        full = [window.block_id(b) for b in range(len(window.stored))]
        blocks = full + ([tail.block] if tail is not None else [])
        n_tail = window.n_tokens % self.sizing.block_size
        saved = StoredSequence(window.seq_id, full, [s.chain for s in window.stored],
                               tail.block if tail is not None else None, n_tail if tail else 0)
        return saved, StoreJob(None, 0, sequence=SequenceWrite(
            self.namespace, window.seq_id, np.array(window.slot.tokens, np.int32), tuple(blocks)))

    # -- stats -------------------------------------------------------------------------------
    def _add_stats(self, window: Window) -> None:
        for name in WindowStats.__slots__:
            setattr(self.totals, name, getattr(self.totals, name) + getattr(window.stats, name))
        window.stats = WindowStats()

    def stats(self) -> WindowStats:
        total = WindowStats(**{n: getattr(self.totals, n) for n in WindowStats.__slots__})
        for window in self.windows.values():
            for name in WindowStats.__slots__:
                setattr(total, name, getattr(total, name) + getattr(window.stats, name))
        return total


def session_prefetch(blocks: list, attention: list[float], sizing: HotSizing) -> list:
    """The blocks of a stored conversation worth promoting to warm before its request's turn: all
    of them when it fits a slot's share (they will all be restored), else its sinks, its recent
    blocks and those with the most measured attention, as many as a working set holds."""
    shape = sizing.shape
    if len(blocks) * sizing.block_size <= sizing.slot_tokens:
        return list(blocks)
    keep = set(range(min(shape.sink, len(blocks))))
    keep.update(range(max(0, len(blocks) - shape.recent), len(blocks)))
    ranked = sorted((b for b in range(len(blocks)) if b not in keep),
                    key=lambda b: -attention[b])
    keep.update(ranked[:shape.budget - len(keep)])
    return [blocks[b] for b in sorted(keep)]

"""Storing off the engine thread: the engine reads a sequence's new cells out of llama.cpp into a
host buffer and hands a :class:`StoreJob` to the :class:`StoreWriter`, whose thread parses the
state, encodes the blocks (numba), checksums and writes them, then records the sequence and runs
the job's follow-up (a session update).

Why: storing an 8B, 32K-token conversation took 12.3 s on an H200 machine, 7.3 s of it encoding
and writing; on the engine thread every other slot stopped generating meanwhile. Reading the state
out of llama.cpp (``llama_state_seq_get_data`` into a pinned buffer: 0.08 s for those 4.3 GB) is
the only part that must happen there, before the next decode changes the cells.

Memory is bounded: the buffers come from a :class:`~kvtier.engine.host_buffers.BufferPool` with
a byte budget, so when the writer falls behind, the engine waits for a buffer (back-pressure,
counted). Jobs run in order. A block id promised to a queued job is reported by
:meth:`StoreWriter.is_pending` and its chain hash by :meth:`StoreWriter.pending_chain`, so the
engine neither reuses an id nor stores a shared block twice while the first write is queued; a
session with a turn in the queue is waited for (:meth:`StoreWriter.wait_session`) before anyone
reads it. A job that fails is logged and counted, and its sequence is reported broken once
(:meth:`StoreWriter.take_broken`), so the engine stores that sequence afresh next time instead of
naming blocks that never arrived.

A job stores blocks from any position range of a state read (``BlockWrite.first_pos``), so the same
writer serves a working set that stores blocks of a long prompt as they are prefilled
(:mod:`kvtier.engine.paging`): a block that leaves the hot tier before its job is done is read
back from the job's buffer (:meth:`StoreWriter.read_pending`), never waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine.api import StoreStats
from kvtier.engine.host_buffers import BufferPool, HostBuffer
from kvtier.engine.state_codec import SequenceState, parse
from kvtier.errors import STORAGE_FAULTS, KvtierError, UnsupportedLayout
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, ChainHash, LayerKV, Namespace, TensorRows
from kvtier.storage.workers import n_cores

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockWrite:
    """One block to store from a job's state read."""

    block: BlockId
    """The id to store it under (a full block whose chain hash is stored by then is shared
    instead, see :meth:`StoreWriter.resolve`)."""
    chain: ChainHash | None
    """The chain hash of a full block; None for a partial tail or a block that is not a prefix."""
    first_pos: int
    """The position of its first row in the state read."""
    n_tokens: int
    part: int = 0
    """Which of the job's state blobs holds it (see :attr:`StoreJob.parts`)."""
    position: int = -1
    """Where its first token sat when its keys were computed, if not its own position (a
    working set's packed block)."""


@dataclass(frozen=True, slots=True)
class SequenceWrite:
    """The stored sequence to record once a job's blocks are written."""

    namespace: Namespace
    seq_id: int
    tokens: np.ndarray
    blocks: tuple[BlockId, ...]


@dataclass(slots=True)
class StoreJob:
    """A state read and what to store from it."""

    buffer: HostBuffer | None
    """Holds the ``llama_state_seq_get_data`` bytes (None: nothing to parse); given back to the
    writer's pool when the job is done."""
    nbytes: int
    blocks: list[BlockWrite] = field(default_factory=list)
    sequence: SequenceWrite | None = None
    after: Callable[[], None] | None = None
    """Runs on the writer thread once the sequence is recorded, before the job leaves the queue."""
    done: Callable[[BaseException | None], None] | None = None
    """Runs last, with the error the job met or None."""
    session_id: str | None = None
    """The session this job updates: readers of it wait until the job is done."""
    read_s: float = 0.0
    """What reading the state out of llama.cpp cost the engine thread."""
    parts: tuple[int, ...] = ()
    """The byte lengths of several state blobs laid one after the other in ``buffer`` (empty:
    one blob of ``nbytes``). A sliding-window model's blocks are read in parts, each ending
    within a window of its blocks, so that each block keeps the window rows llama.cpp still
    holds for it."""

    def states(self) -> list[SequenceState]:
        """The job's state blobs, parsed."""
        assert self.buffer is not None
        view = self.buffer.view(self.nbytes)
        if not self.parts:
            return [parse(view)]
        states, offset = [], 0
        for n in self.parts:
            states.append(parse(view[offset:offset + n]))
            offset += n
        return states


def rows_at(state: SequenceState, first: int, n: int) -> list[LayerKV]:
    """The rows of positions ``[first, first + n)`` of a parsed state, one :class:`LayerKV` per
    layer over all caches, as block records hold them (a sliding-window cache may hold only the
    last rows of the range, or none). Views into the state where its cells are in position order.
    Raises :class:`UnsupportedLayout` when the range is not held as a block can be."""
    layers: list[LayerKV] = []
    longest = 0
    for ci, (cache, layout) in enumerate(zip(state.caches, state.layout.caches)):
        pos = cache.positions
        order = None if pos.size < 2 or np.all(pos[1:] > pos[:-1]) \
            else np.argsort(pos, kind="stable")
        sorted_pos = pos if order is None else pos[order]
        lo, hi = np.searchsorted(sorted_pos, [first, first + n])
        m = int(hi - lo)
        if m and (sorted_pos[lo] != first + n - m or sorted_pos[hi - 1] != first + n - 1
                  or (m > 1 and np.any(sorted_pos[lo + 1:hi] == sorted_pos[lo:hi - 1]))):
            raise UnsupportedLayout(f"cache {ci} holds positions {sorted_pos[lo]}.."
                                    f"{sorted_pos[hi - 1]} ({m} cells) of the block at "
                                    f"{first}..{first + n - 1}: not a run ending with it")
        longest = max(longest, m)
        take = slice(int(lo), int(hi)) if order is None else order[lo:hi]
        for il in range(layout.n_layer):
            layers.append(LayerKV(TensorRows(layout.k_types[il], cache.k[il][take]),
                                  TensorRows(layout.v_types[il], cache.v[il][take])))
    if longest != n:
        raise UnsupportedLayout(f"the state holds {longest} of the {n} positions from {first}")
    return layers


def write_blocks(manager: TierManager, states: Sequence[SequenceState],
                 blocks: Sequence[BlockWrite], pool: ThreadPoolExecutor | None = None
                 ) -> list[BlockId]:
    """Store blocks from parsed state reads (each from ``states[w.part]``), several at once in
    ``pool`` if given (encoding holds no GIL; the manager serializes what must be); returns the
    id each is stored under (another one than asked where its chain hash was stored by then, and
    it is shared)."""
    def put(w: BlockWrite) -> BlockId:
        return manager.put_block(w.block, rows_at(states[w.part], w.first_pos, w.n_tokens),
                                 w.chain, w.position, hold=True)
    if pool is None or len(blocks) < 2:
        return [put(w) for w in blocks]
    return list(pool.map(put, blocks))


def default_threads() -> int:
    """Blocks a writer encodes at once: a quarter of the cores (one on a small machine, where
    llama.cpp needs every core to decode)."""
    return max(1, n_cores() // 4)


class StoreWriter:
    """One background thread that runs :class:`StoreJob`\\ s in order (see the module)."""

    def __init__(self, manager: TierManager, pool: BufferPool, threads: int | None = None,
                 name: str = "kvtier-store") -> None:
        self.manager = manager
        self.pool = pool
        """Buffers for state reads: acquiring one waits while queued jobs hold the budget."""
        threads = default_threads() if threads is None else threads
        self._encoders = ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-encode") \
            if threads > 1 else None
        self._queue: deque[StoreJob] = deque()
        self._cv = threading.Condition()
        self._pending_blocks: Counter[BlockId] = Counter()
        self._pending_rows: dict[BlockId, tuple[StoreJob, BlockWrite]] = {}
        self._pending_chains: dict[bytes, BlockId] = {}
        self._pending_sessions: Counter[str] = Counter()
        self._aliases: dict[BlockId, BlockId] = {}
        self._broken: set[int] = set()
        self._running = 0
        self._jobs = 0
        self._blocks_written = 0
        self._bytes_read = 0
        self._failures = 0
        self._read_s = 0.0
        self._write_s = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- the engine's side -----------------------------------------------------------------------
    def submit(self, job: StoreJob) -> None:
        """Queue a job, its buffer already filled."""
        with self._cv:
            if self._stopping:
                if job.buffer is not None:
                    self.pool.release(job.buffer)
                raise KvtierError("the store writer is closed")
            for w in job.blocks:
                self._pending_blocks[w.block] += 1
                self._pending_rows[w.block] = (job, w)
                if w.chain is not None:
                    self._pending_chains[w.block.namespace + w.chain] = w.block
            if job.session_id is not None:
                self._pending_sessions[job.session_id] += 1
            self._read_s += job.read_s
            self._bytes_read += job.nbytes
            self._queue.append(job)
            self._cv.notify_all()

    def is_pending(self, block: BlockId) -> bool:
        """Whether a queued job will store ``block`` (so the id is taken)."""
        with self._cv:
            return block in self._pending_blocks

    def read_pending(self, block: BlockId, take: Callable[[list[LayerKV]], None]) -> bool:
        """Call ``take`` with the rows of ``block`` if a queued job is storing it (the job's
        buffer stays valid meanwhile: copy out of the rows, do not keep them); False if none
        is, and the block is in the store by then (or its write failed)."""
        with self._cv:
            pending = self._pending_rows.get(block)
            if pending is None:
                return False
            job, w = pending
            take(rows_at(job.states()[w.part], w.first_pos, w.n_tokens))
            return True

    def pending_chain(self, namespace: Namespace, chain: ChainHash) -> BlockId | None:
        """The block a queued job stores with this chain hash, if any."""
        with self._cv:
            return self._pending_chains.get(namespace + chain)

    def resolve(self, block: BlockId) -> BlockId:
        """The id a written block is stored under: another one when its chain hash had been
        stored by someone else before the writer got to it."""
        with self._cv:
            return self._aliases.get(block, block)

    def take_broken(self, seq_id: int) -> bool:
        """Whether a job of this sequence failed since the last call (once per failure)."""
        with self._cv:
            if seq_id in self._broken:
                self._broken.discard(seq_id)
                return True
            return False

    def wait_session(self, session_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait until no queued job updates ``session_id`` (None: any session); False on
        timeout."""
        with self._cv:
            return self._cv.wait_for(
                lambda: (self._pending_sessions[session_id] == 0) if session_id is not None
                else not +self._pending_sessions, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far is done; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._running, timeout)

    def stats(self) -> StoreStats:
        pool = self.pool.stats()
        with self._cv:
            queued = sum(j.nbytes for j in self._queue)
            return StoreStats(len(self._queue), queued, self._jobs,
                              self._blocks_written, self._failures, pool.waits,
                              round(pool.wait_s, 4), round(self._read_s, 4),
                              round(self._write_s, 4), self._bytes_read, pool.pinned)

    def close(self) -> None:
        """Finish every queued job, then stop the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()
        if self._encoders is not None:
            self._encoders.shutdown()
        self.pool.close()

    # -- the writer thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                job = self._queue[0]
                self._running = 1
            error: BaseException | None = None
            start = time.perf_counter()
            try:
                self._run(job)
            except STORAGE_FAULTS as exc:   # counted and logged where the store met it
                error = exc
                log.warning("storing %d blocks%s failed: %s", len(job.blocks),
                            f" of sequence {job.sequence.seq_id}" if job.sequence else "", exc)
            except Exception as exc:  # a failed store must not stop the writer
                error = exc
                log.exception("storing %d blocks%s failed", len(job.blocks),
                              f" of sequence {job.sequence.seq_id}" if job.sequence else "")
            finally:
                self._finish(job, error, time.perf_counter() - start)

    def _run(self, job: StoreJob) -> None:
        if job.blocks:
            if job.buffer is None:
                raise ValueError("a job with blocks to store needs a state read")
            try:
                stored_as = write_blocks(self.manager, job.states(), job.blocks, self._encoders)
            except STORAGE_FAULTS as exc:
                # A full disk or a damaged tier: the sequence is saved with the blocks before
                # the first that is missing (the rest is recomputed); the job still counts as
                # failed.
                failed = exc
                stored_as = []
            else:
                failed = None
            for w, stored in zip(job.blocks, stored_as):
                with self._cv:
                    self._blocks_written += 1
                    if stored != w.block:
                        self._aliases[w.block] = stored
        else:
            failed = None
        if job.sequence is not None:
            s = job.sequence
            self.manager.save_sequence(s.namespace, s.seq_id, s.tokens,
                                       [self.resolve(b) for b in s.blocks])
        if job.after is not None:
            job.after()
        if failed is not None:
            raise failed

    def _finish(self, job: StoreJob, error: BaseException | None, seconds: float) -> None:
        with self._cv:
            self._queue.popleft()
            self._running = 0
            self._jobs += 1
            self._write_s += seconds
            if error is not None:
                self._failures += 1
                if job.sequence is not None:
                    self._broken.add(job.sequence.seq_id)
                    self.manager.release_fresh(list(job.sequence.blocks)
                                               + [self._aliases.get(b, b)
                                                  for b in job.sequence.blocks])
            for w in job.blocks:
                if self._pending_rows.get(w.block, (None,))[0] is job:
                    del self._pending_rows[w.block]
                self._pending_blocks[w.block] -= 1
                if self._pending_blocks[w.block] <= 0:
                    del self._pending_blocks[w.block]
                if w.chain is not None and \
                        self._pending_chains.get(w.block.namespace + w.chain) == w.block:
                    del self._pending_chains[w.block.namespace + w.chain]
            if job.session_id is not None:
                self._pending_sessions[job.session_id] -= 1
                if self._pending_sessions[job.session_id] <= 0:
                    del self._pending_sessions[job.session_id]
            self._cv.notify_all()
        if job.buffer is not None:      # after read_pending can no longer reach it
            self.pool.release(job.buffer)
        if job.done is not None:
            try:
                job.done(error)
            except Exception:
                log.exception("a store job's completion callback failed")

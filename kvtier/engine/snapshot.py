"""Snapshot and restore: between a slot of the hot tier and the block records of the store.

Snapshots are incremental: a full block is written once (and not at all when another sequence
already stored the same chain hash); the partial tail is written under a fresh id each time it
changes, so blocks stay immutable and forks can share them. Storing has two halves: the engine
thread reads only the cells the store lacks out of llama.cpp into a host buffer
(:meth:`Snapshotter.prepare`), and a :class:`~kvtier.engine.store_writer.StoreWriter` parses,
encodes and writes them in the background (or :meth:`Snapshotter.save` does it all at once).

A restore decodes records straight into a state blob in a reusable (pinned, on a GPU build) host
buffer. Where the context has a scratch sequence (one unified KV cache), it goes in chunks of
blocks: chunk k is written into the scratch sequence and copied into the slot's (metadata only)
while chunk k+1 decodes in the pool threads, so reading and decoding overlap llama.cpp's copy.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import llama_cpp
import numpy as np

from kvtier.engine import state_codec
from kvtier.engine.host_buffers import BufferPool, CudaRegistrar, HostBuffer
from kvtier.engine.hot import HotContext
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.slots import Slot
from kvtier.engine.store_writer import (BlockWrite, SequenceWrite, StoreJob, StoreWriter,
                                        write_blocks)
from kvtier.errors import STORAGE_FAULTS, KvtierError, StateRejected
from kvtier.storage.catalog import BlockEntry, SequenceEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.reads import RowTargets
from kvtier.storage.workers import n_cores
from kvtier.storage.records import (BlockId, ChainHash, LayerKV, Namespace, TensorRows,
                                    chain_hash)
from kvtier.storage.tiers import Tier

log = logging.getLogger(__name__)

RESTORE_CHUNK_BYTES = 256 << 20
"""KV bytes (as llama.cpp holds them) per restore chunk where the context has a scratch sequence:
decoding chunk k+1 overlaps writing chunk k (see :meth:`Snapshotter.restore`), and the two
buffers in flight bound the restore's host memory. A chunk holds at least ``BLOCKS_PER_THREAD``
blocks per decoding thread, so that every core decodes (an 8B model's 32 MiB blocks make 8-block
chunks of 256 MiB, which left half of a 16-core machine idle)."""
BLOCKS_PER_THREAD = 2


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
    """Stores what a slot computed and restores stored prefixes into slots (engine thread)."""

    def __init__(self, hot: HotContext, manager: TierManager, namespace: Namespace,
                 block_size: int, throughput: ThroughputModel, writer: StoreWriter | None = None,
                 restore_chunk_bytes: int = RESTORE_CHUNK_BYTES) -> None:
        self.hot = hot
        self.manager = manager
        self.namespace = namespace
        self.block_size = block_size
        self.throughput = throughput
        self.writer = writer
        """Where :meth:`prepare`'s jobs go; its pending ids and chains are taken into account."""
        self.restore_chunk_bytes = restore_chunk_bytes
        self.layout = hot.layout
        self._window: tuple[int, int] | None = None
        """(first layer, n_swa) of the sliding-window cache, for models that have one."""
        if hot.model.n_swa > 0 and len(self.layout.caches) == 2:
            self._window = (self.layout.caches[0].n_layer, hot.model.n_swa)
        registrar = CudaRegistrar.find()
        self.restore_buffers = BufferPool(sys.maxsize, registrar, "restore buffers")
        """Blobs of restores: two at most (one written while the next decodes), kept for reuse."""
        self._inline_buffers = BufferPool(sys.maxsize, registrar, "state reads")
        self._chunk_decoder = ThreadPoolExecutor(1, thread_name_prefix="kvtier-restore")

    def close(self) -> None:
        self._chunk_decoder.shutdown()
        self.restore_buffers.close()
        self._inline_buffers.close()

    @property
    def scratch_seq(self) -> int | None:
        """The hot tier's scratch sequence where its cache is unified (copying cells between
        sequences is then metadata only), else None."""
        return self.hot.scratch if self.layout.n_stream == 1 else None

    # -- snapshot --------------------------------------------------------------------------------
    def _chains(self, tokens: np.ndarray, known: list[ChainHash]) -> list[ChainHash]:
        bs = self.block_size
        chains = known[:len(tokens) // bs]
        for b in range(len(chains), len(tokens) // bs):
            chains.append(chain_hash(chains[-1] if chains else None, tokens[b * bs:(b + 1) * bs]))
        return chains

    def _find(self, chain: ChainHash) -> BlockId | None:
        """The stored block (or one a queued job stores) with this chain hash."""
        found = self.manager.find_hash(self.namespace, chain)
        if found is None and self.writer is not None:
            found = self.writer.pending_chain(self.namespace, chain)
        return found

    def prepare(self, slot: Slot, seq: StoredSequence, buffers: BufferPool | None = None
                ) -> tuple[StoredSequence, StoreJob]:
        """What storing ``slot`` takes: the sequence as the store will hold it once the job is
        done, and the job, with the cells the store lacks already read out of llama.cpp into a
        buffer of ``buffers`` (the writer's by default: it waits while the writer is behind).
        Full blocks that some sequence stored (or a queued job stores) are shared."""
        if self.writer is not None and self.writer.take_broken(seq.seq_id):
            log.warning("sequence %d: a store failed, storing it afresh", seq.seq_id)
            seq = StoredSequence(seq.seq_id)
        tokens = slot.tokens
        bs = self.block_size
        n_full = len(tokens) // bs
        chains = self._chains(tokens, seq.chains)
        full = seq.full[:n_full]
        # From the first full block the store lacks, the rest are written (the writer still
        # shares any whose chain hash is stored by the time it gets there).
        while len(full) < n_full:
            existing = self._find(chains[len(full)])
            if existing is None:
                break
            full.append(existing)
        writes = []
        for b in range(len(full), n_full):
            full.append(self._fresh_id(seq.seq_id, b))
            writes.append(BlockWrite(full[-1], chains[b], b * bs, bs))
        tail_len = len(tokens) - n_full * bs
        tail_changed = tail_len > 0 and (seq.tail is None or seq.tail_tokens != tail_len
                                         or bool(writes) or len(full) < len(seq.full))
        tail, tail_tokens = (seq.tail, seq.tail_tokens) if tail_len and not tail_changed \
            else (None, 0)
        if tail_changed:
            tail, tail_tokens = self._fresh_id(seq.seq_id, n_full), tail_len
            writes.append(BlockWrite(tail, None, n_full * bs, tail_len))
        saved = StoredSequence(seq.seq_id, full, chains, tail, tail_tokens)
        job = StoreJob(None, 0, writes, SequenceWrite(self.namespace, seq.seq_id,
                                                      np.array(tokens, np.int32),
                                                      tuple(saved.blocks)))
        if writes:
            if buffers is None:
                buffers = self.writer.pool if self.writer is not None else self._inline_buffers
            job.buffer, job.nbytes, job.parts, job.read_s = self._read_cells(
                slot, self._read_parts(slot, writes), buffers)
        return saved, job

    def save(self, slot: Slot, seq: StoredSequence) -> StoredSequence:
        """Store the blocks of ``slot`` that the store lacks and record the sequence, now."""
        saved, job = self.prepare(slot, seq, self._inline_buffers)
        try:
            if job.blocks:
                stored = write_blocks(self.manager, job.states(), job.blocks)
                alias = {w.block: s for w, s in zip(job.blocks, stored)}
                saved.full = [alias.get(b, b) for b in saved.full]
                saved.tail = alias.get(saved.tail, saved.tail) if saved.tail else None
        finally:
            if job.buffer is not None:
                self._inline_buffers.release(job.buffer)
        self.manager.save_sequence(self.namespace, seq.seq_id, job.sequence.tokens,
                                   saved.blocks)
        return saved

    def _fresh_id(self, seq_id: int, block: int) -> BlockId:
        candidate = BlockId(self.namespace, seq_id, block)
        if not self.manager.has_block(candidate) and \
                (self.writer is None or not self.writer.is_pending(candidate)):
            return candidate
        return BlockId(self.namespace, self.manager.new_sequence(), block)

    def _read_parts(self, slot: Slot, writes: list[BlockWrite]) -> list[tuple[int, int]]:
        """The position ranges to read the writes' cells in (assigning each write its part): one,
        from the first write on; on a sliding-window model whose window cache still holds cells
        the window has passed (llama.cpp's full-size window cache keeps them until it needs the
        room), consecutive ranges no longer than the window, because llama.cpp writes only the
        window cells that the range's last position still sees."""
        end = len(slot.tokens)
        if self._window is None or self.scratch_seq is None:
            return [(writes[0].first_pos, end)]
        n_swa = self._window[1]
        if llama_cpp.llama_memory_seq_pos_min(self.hot.memory, slot.index) >= end - n_swa:
            return [(writes[0].first_pos, end)]
        parts: list[tuple[int, int]] = []
        for i, w in enumerate(writes):
            w_end = w.first_pos + w.n_tokens
            if parts and w_end - parts[-1][0] <= n_swa:
                parts[-1] = (parts[-1][0], w_end)
            else:
                parts.append((w.first_pos, w_end))
            writes[i] = replace(w, part=len(parts) - 1)
        return parts

    def _read_cells(self, slot: Slot, parts: list[tuple[int, int]], buffers: BufferPool
                    ) -> tuple[HostBuffer, int, tuple[int, ...], float]:
        """The states of ``slot``'s cells in the position ranges ``parts``, one after the other
        in a buffer: (buffer, bytes, each state's bytes, the seconds llama.cpp took, a wait for
        the buffer not included). Each range goes through the scratch sequence (metadata only)
        where there is one; else the one range must reach the end, and the whole sequence is
        read."""
        ctx, memory = self.hot.ptr, self.hot.memory
        start = time.perf_counter()
        scratch = self.scratch_seq
        direct = scratch is None or parts == [(0, len(slot.tokens))]
        if direct and len(parts) > 1:
            raise ValueError("reading several ranges needs a scratch sequence")

        def select(p0: int, p1: int) -> int:
            if direct:
                return slot.index
            llama_cpp.llama_memory_seq_rm(memory, scratch, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, slot.index, scratch, p0, p1)
            return scratch

        buffer = None
        try:
            sizes = [llama_cpp.llama_state_seq_get_size(ctx, select(p0, p1)) for p0, p1 in parts]
            waited = time.perf_counter()
            buffer = buffers.acquire(sum(sizes))
            start += time.perf_counter() - waited
            offset = 0
            for (p0, p1), size in zip(parts, sizes):
                source = select(p0, p1)
                n = llama_cpp.llama_state_seq_get_data(
                    ctx, ctypes.cast(buffer.address + offset, ctypes.POINTER(ctypes.c_uint8)),
                    size, source)
                if n != size:
                    raise StateRejected(f"llama_state_seq_get_data wrote {n} of {size} bytes "
                                        f"for sequence {source}")
                offset += size
        except BaseException:
            if buffer is not None:
                buffers.release(buffer)
            raise
        finally:
            if not direct:
                llama_cpp.llama_memory_seq_rm(memory, scratch, -1, -1)
        return buffer, offset, tuple(sizes) if len(sizes) > 1 else (), \
            time.perf_counter() - start

    # -- restore ---------------------------------------------------------------------------------
    def plan(self, tokens: np.ndarray, sequence: SequenceEntry | None = None,
             any_tail: bool = True) -> RestorePlan:
        """The longest stored prefix of ``tokens``: shared full blocks, then a partial tail
        whose tokens continue them: ``sequence``'s own (a session's), else (``any_tail``) any
        stored one."""
        bs = self.block_size
        blocks = self.manager.match_prefix(self.namespace, tokens, bs)
        n = len(blocks) * bs
        tail = self._own_tail(tokens, n, sequence) if sequence is not None else None
        if tail is None and any_tail:
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
        self.hot.clear(slot)
        with self.manager.pinned(plan.blocks):
            entries = [self.manager.block_entry(block) for block in plan.blocks]
            usable = next((j for j, e in enumerate(entries) if e is None), len(entries))
            blocks = plan.blocks[:usable]
            try:
                if self._direct:
                    n_blocks = self._restore_direct(slot, blocks, entries)
                else:
                    n_blocks = self._restore_composed(slot, blocks)
            except STORAGE_FAULTS as exc:
                # Whatever the store met, the prompt is recomputed: a cache miss, not a failure.
                log.warning("restore abandoned, recomputing the prompt: %s", exc)
                self.hot.clear(slot)
                return Restored(0, 0.0, Counter())
        tiers: Counter[Tier] = Counter()
        for entry in entries[:n_blocks]:
            tiers[entry.tier] += entry.n_tokens
        n = min(plan.n_tokens, tiers.total())
        if n == 0:
            return Restored(0, 0.0, tiers)
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

    def _restore_direct(self, slot: Slot, blocks: list[BlockId], entries: list[BlockEntry]
                        ) -> int:
        """Decode the blocks into blobs and write them into ``slot``: one blob, or chunks
        pipelined through the scratch sequence. Returns how many blocks (a prefix) it wrote."""
        if not blocks:
            return 0
        chunks = self._chunks(entries[:len(blocks)])
        pending: Future | None = self._chunk_decoder.submit(self._decode_chunk, slot, blocks,
                                                            entries, chunks[0])
        written = 0
        try:
            for k, chunk in enumerate(chunks):
                current, pending = pending, None
                buffer, blob, good = current.result()
                try:
                    if good == len(chunk) and k + 1 < len(chunks):
                        pending = self._chunk_decoder.submit(self._decode_chunk, slot, blocks,
                                                             entries, chunks[k + 1])
                    ok = good > 0 and self._write_chunk(slot, blob, first=written == 0)
                finally:
                    if buffer is not None:
                        self.restore_buffers.release(buffer)
                if not ok:
                    break
                written += good
                if good < len(chunk):
                    break
        finally:
            if pending is not None:
                self._drop(pending)
        return written

    def _chunks(self, entries: list[BlockEntry]) -> list[range]:
        """Consecutive runs of blocks of at most ``restore_chunk_bytes`` (one block at least);
        a single run without a scratch sequence to pass them through."""
        if self.scratch_seq is None:
            return [range(len(entries))]
        limit = max(self.restore_chunk_bytes,
                    BLOCKS_PER_THREAD * n_cores() * max(e.raw_bytes for e in entries))
        chunks, start, size = [], 0, 0
        for j, entry in enumerate(entries):
            if j > start and size + entry.raw_bytes > limit:
                chunks.append(range(start, j))
                start, size = j, 0
            size += entry.raw_bytes
        chunks.append(range(start, len(entries)))
        return chunks

    def _drop(self, pending: Future) -> None:
        """Wait for a chunk that will not be written and give its buffer back."""
        try:
            buffer, _, _ = pending.result()
        except Exception:
            return   # the restore ends anyway; what this chunk met does not matter
        if buffer is not None:
            self.restore_buffers.release(buffer)

    def _decode_chunk(self, slot: Slot, blocks: list[BlockId], entries: list[BlockEntry],
                      chunk: range) -> tuple[HostBuffer | None, memoryview | None, int]:
        """Decode ``blocks[chunk]`` into a blob in a restore buffer: (buffer, blob, blocks in
        it), the blob holding the chunk's blocks up to the first that failed."""
        cache = self.layout.caches[0]
        stream = state_codec.stream_of(self.layout, slot.index)
        j0, j1 = chunk.start, chunk.stop
        while j1 > j0:
            held: list[HostBuffer] = []

            def memory(nbytes: int) -> np.ndarray:
                held.append(self.restore_buffers.acquire(nbytes))
                return held[-1].view(nbytes)

            target = state_codec.allocate(self.layout, slot.index, stream,
                                          [(j, [entries[j].n_tokens]) for j in range(j0, j1)],
                                          self.block_size, out=memory)
            base = np.frombuffer(target.blob, np.uint8).__array_interface__["data"][0]
            targets = RowTargets(base + target.k_offsets, base + target.v_offsets,
                                 cache.k_types, cache.v_types, cache.k_row_bytes,
                                 cache.v_row_bytes,
                                 tuple(entries[j].n_tokens for j in range(j0, j1)))
            try:
                errors = self.manager.get_blocks_into(blocks[j0:j1], targets)
            except BaseException:
                self.restore_buffers.release(held[0])
                raise
            bad = next((i for i, e in enumerate(errors) if e is not None), None)
            if bad is None:
                return held[0], target.blob, j1 - j0
            log.warning("restore stops at block %d of %d: %s", j0 + bad, len(blocks),
                        errors[bad])
            self.restore_buffers.release(held[0])
            j1 = j0 + bad
        return None, None, 0

    def _write_chunk(self, slot: Slot, blob: memoryview, first: bool) -> bool:
        """Write a chunk's blob: the first straight into the slot's sequence, the others into the
        scratch sequence, then copied into the slot's (metadata only in a unified cache). False
        (the restore ends there, the rest is recomputed) when llama.cpp refuses it."""
        try:
            if first:
                state_codec.write_state(self.hot.ptr, slot.index, blob)
                return True
            self.hot.write_scratch(blob)
            self.hot.adopt_scratch(slot.index)
            return True
        except StateRejected as exc:
            log.warning("restore stops at a chunk llama.cpp refused: %s", exc)
            if not first:
                llama_cpp.llama_memory_seq_rm(self.hot.memory, self.scratch_seq, -1, -1)
            return False

    def _restore_composed(self, slot: Slot, blocks: list[BlockId]) -> int:
        """The general path (two caches, or V transposed): decoded layers composed into a blob."""
        loaded: list[tuple[int, list[LayerKV]]] = []
        for j, result in enumerate(self.manager.get_blocks(blocks)):
            if isinstance(result, KvtierError):
                log.warning("restore stops at block %d of %d: %s", j, len(blocks), result)
                break
            loaded.append((j, result))
        if self._window is not None:
            loaded = self._fit_window(loaded)
        if not loaded:
            return 0
        blob = state_codec.compose(self.layout, slot.index,
                                   state_codec.stream_of(self.layout, slot.index), loaded,
                                   self.block_size)
        try:
            state_codec.write_state(self.hot.ptr, slot.index, blob)
        except StateRejected as exc:
            log.warning("restore skipped, llama.cpp refused the state: %s", exc)
            self.hot.clear(slot)
            return 0
        return len(loaded)

    def _fit_window(self, loaded: list[tuple[int, list[LayerKV]]]
                    ) -> list[tuple[int, list[LayerKV]]]:
        """The leading blocks that restore exactly on a sliding-window model, with only the
        window rows their restore needs (see :mod:`.state_codec.window`)."""
        base, n_swa = self._window
        bs = self.block_size
        spans = [state_codec.BlockSpan(j * bs, j * bs + layers[0].n_tokens, layers[base].n_tokens)
                 for j, layers in loaded]
        k = state_codec.exact_blocks(spans, n_swa)
        if k < len(loaded):
            log.info("sliding window: %d of %d stored blocks restore exactly (the store lacks "
                     "window rows the rest need); the rest is recomputed", k, len(loaded))
        fitted = []
        drops = state_codec.rows_to_drop(spans[:k], None if self.hot.swa_full else n_swa)
        for (j, layers), drop in zip(loaded[:k], drops):
            if drop:
                layers = layers[:base] + [
                    LayerKV(TensorRows(kv.k.ggml_type, kv.k.rows[drop:]),
                            TensorRows(kv.v.ggml_type, kv.v.rows[drop:]))
                    for kv in layers[base:]]
            fitted.append((j, layers))
        return fitted

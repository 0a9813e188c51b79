"""The hot tier T0: a llama.cpp context whose sequences are kvtier's slots.

One context with a unified KV cache (``kv_unified``): the slots' sequences and a scratch sequence
share its cells (:mod:`kvtier.engine.sizing` says how many), so a block written into the scratch
sequence joins a live one by ``llama_memory_seq_cp`` without copying data, and a position range of
a live sequence is read out through the scratch sequence the same way. The context's eval callback
is a :class:`~kvtier.engine.query_capture.QueryCapture`, idle unless a selection needs queries.

Only the engine thread touches this object (llama.cpp contexts are not thread-safe).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from kvtier.config import Config, ModelConfig
from kvtier.engine import state_codec
from kvtier.engine.host_buffers import BufferPool, HostBuffer
from kvtier.engine.model import Model
from kvtier.engine.query_capture import QueryCapture
from kvtier.engine.sizing import HotSizing, hot_sizing
from kvtier.engine.slots import Slot
from kvtier.errors import KvtierError, StateRejected
from kvtier.ggml import CACHE_TYPES
from kvtier.storage.workers import n_cores

FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
              "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


@dataclass(frozen=True, slots=True)
class BatchItem:
    """Tokens of one slot to decode at consecutive positions from ``pos``."""

    slot: int
    tokens: np.ndarray
    pos: int
    want_logits: bool
    """Logits for the last token (a prompt's end or a generated token)."""
    all_logits: bool = False
    """Logits for every token (perplexity measurements); :meth:`HotContext.decode` then returns
    the batch index of the first, the others follow."""


class HotContext:
    """The hot tier: one llama.cpp context with a sequence per slot, decoded in batches."""

    def __init__(self, model: Model, cfg: ModelConfig, sizing: HotSizing,
                 layer_stride: int = 1) -> None:
        self.model = model
        self.sizing = sizing
        if model.n_swa and sizing.context_size > sizing.slot_tokens:
            raise ValueError("a sliding-window model's sizing has no working set "
                             "(hot_sizing's sliding_window)")
        self.n_slots = cfg.n_slots
        self.n_batch = cfg.n_batch
        self.scratch = sizing.scratch_seq
        self.capture = QueryCapture(model.n_layer, model.n_head, model.head_dim_k,
                                    layer_stride)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sizing.n_ctx
        params.n_batch = cfg.n_batch
        self.n_ubatch = min(cfg.n_batch, 512)
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = cfg.n_slots + 1
        params.kv_unified = True
        # A sliding-window model's window cache as big as the context (llama.cpp's default):
        # cells the window has passed stay until the room is needed, so a store reads every
        # block's window rows and a restore lays them out as a sequence computed in place
        # (state_codec.window says why that matters). Its memory cost: docs/models.md.
        params.swa_full = cfg.swa_full
        self.swa_full = cfg.swa_full
        params.cb_eval = self.capture.callback
        params.cb_eval_user_data = self.capture.user_data
        threads = cfg.n_threads or n_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTN[cfg.flash_attn]
        params.type_k = CACHE_TYPES[cfg.cache_type_k].id
        params.type_v = CACHE_TYPES[cfg.cache_type_v].id
        params.no_perf = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise KvtierError("llama.cpp could not create a context with these settings "
                              f"(n_ctx={params.n_ctx}, cache types {cfg.cache_type_k}/"
                              f"{cfg.cache_type_v}, flash_attn={cfg.flash_attn})")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.slots = [Slot(i) for i in range(cfg.n_slots)]
        self._batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self._layout: state_codec.StateLayout | None = None
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.memory))
        """Whether llama.cpp can move cells to other positions (re-rotating K): not for every
        model; without it a working set keeps every block at its own position."""

    @classmethod
    def for_config(cls, model: Model, config: Config) -> HotContext:
        """The hot tier that ``config`` describes, for ``model``."""
        sizing = hot_sizing(config, model.kv_bytes_per_token(*config.model.cache_types),
                            model.n_ctx_train, model.n_swa)
        return cls(model, config.model, sizing, config.working_set.query_layer_stride)

    @property
    def layout(self) -> state_codec.StateLayout:
        """The layout of this context's state blobs, read once (by a one-token probe decode when
        nothing is held yet: it cost 3 s on the loaded 2-core machine, so never per use)."""
        if self._layout is None:
            self._layout = state_codec.layout_of(self.ptr)
        return self._layout

    # -- KV of a slot ----------------------------------------------------------------------------
    def truncate(self, slot: Slot, keep: int) -> None:
        """Keep the first ``keep`` tokens of a slot, freeing the rest of its cells."""
        if keep >= len(slot.tokens):
            return
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.index, keep, -1):
            raise KvtierError(f"llama.cpp could not trim slot {slot.index} to {keep} tokens")
        slot.tokens = slot.tokens[:keep]

    def reusable(self, slot: Slot, keep: int) -> int:
        """How many of the first ``keep`` tokens a slot holds can be kept for a next token at
        position ``keep``: all of them, or none on a sliding-window model whose window cache no
        longer holds the positions that token sees (llama.cpp reuses the window's masked cells,
        so a branch from an older point of the conversation finds them gone)."""
        n_swa = self.model.n_swa
        if not n_swa or keep == 0:
            return keep
        oldest = llama_cpp.llama_memory_seq_pos_min(self.memory, slot.index)
        return keep if 0 <= oldest <= max(0, keep - n_swa + 1) else 0

    def clear(self, slot: Slot) -> None:
        """Free all of a slot's cells; it then holds nothing and belongs to nobody."""
        llama_cpp.llama_memory_seq_rm(self.memory, slot.index, -1, -1)
        slot.tokens = np.zeros(0, dtype=np.int32)
        slot.owner = None

    def pos_range(self, seq: int) -> tuple[int, int]:
        """The smallest and largest position sequence ``seq`` holds ((-1, -1) when empty)."""
        return (llama_cpp.llama_memory_seq_pos_min(self.memory, seq),
                llama_cpp.llama_memory_seq_pos_max(self.memory, seq))

    # -- moving cells (working sets) -----------------------------------------------------------
    def remove(self, seq: int, p0: int, p1: int) -> None:
        """Free sequence ``seq``'s cells at positions ``[p0, p1)``."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1):
            raise KvtierError(f"llama.cpp could not remove positions [{p0}, {p1}) of sequence "
                              f"{seq}")

    def shift(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Move sequence ``seq``'s cells at ``[p0, p1)`` by ``delta`` positions; llama.cpp
        re-rotates their keys at the next decode (until then, never read them out)."""
        if not self.can_shift:
            raise KvtierError("this model's KV cache cannot be shifted")
        llama_cpp.llama_memory_seq_add(self.memory, seq, p0, p1, delta)

    def write_scratch(self, blob: bytes | bytearray | memoryview) -> None:
        """Replace the scratch sequence with ``blob`` (a state blob composed for it)."""
        state_codec.write_state(self.ptr, self.scratch, blob)

    def adopt_scratch(self, seq: int) -> None:
        """Give the scratch sequence's cells to live sequence ``seq`` (no data is copied)."""
        llama_cpp.llama_memory_seq_cp(self.memory, self.scratch, seq, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, self.scratch, -1, -1)

    def read_range(self, seq: int, p0: int, p1: int) -> memoryview:
        """The state blob of sequence ``seq``'s cells at positions ``[p0, p1)`` alone, read
        through the scratch sequence (which is left empty)."""
        llama_cpp.llama_memory_seq_rm(self.memory, self.scratch, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, seq, self.scratch, p0, p1)
        try:
            if llama_cpp.llama_memory_seq_pos_max(self.memory, self.scratch) < 0:
                raise StateRejected(f"sequence {seq} holds nothing at [{p0}, {p1})")
            return state_codec.read_state(self.ptr, self.scratch)
        finally:
            llama_cpp.llama_memory_seq_rm(self.memory, self.scratch, -1, -1)

    def read_range_into(self, seq: int, p0: int, p1: int,
                        buffers: BufferPool) -> tuple[HostBuffer, int]:
        """:meth:`read_range` into a buffer of ``buffers`` (waiting while their budget is spent):
        the buffer and the blob's bytes. The caller releases the buffer."""
        ctx, memory = self.ptr, self.memory
        llama_cpp.llama_memory_seq_rm(memory, self.scratch, -1, -1)
        llama_cpp.llama_memory_seq_cp(memory, seq, self.scratch, p0, p1)
        try:
            if llama_cpp.llama_memory_seq_pos_max(memory, self.scratch) < 0:
                raise StateRejected(f"sequence {seq} holds nothing at [{p0}, {p1})")
            size = llama_cpp.llama_state_seq_get_size(ctx, self.scratch)
            buffer = buffers.acquire(size)
            n = llama_cpp.llama_state_seq_get_data(
                ctx, ctypes.cast(buffer.address, ctypes.POINTER(ctypes.c_uint8)), size,
                self.scratch)
            if n != size:
                buffers.release(buffer)
                raise StateRejected(f"llama_state_seq_get_data wrote {n} of {size} bytes for "
                                    f"sequence {self.scratch}")
            return buffer, n
        finally:
            llama_cpp.llama_memory_seq_rm(memory, self.scratch, -1, -1)

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, items: list[BatchItem]) -> list[int]:
        """Decode one batch; returns, per item, the batch index of its logits (or -1)."""
        b = self._batch
        n = 0
        out: list[int] = []
        for item in items:
            count = len(item.tokens)
            first = n
            for i in range(count):
                b.token[n] = int(item.tokens[i])
                b.pos[n] = item.pos + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = item.slot
                b.logits[n] = item.all_logits
                n += 1
            if item.all_logits and count:
                out.append(first)
            elif item.want_logits and count:
                b.logits[n - 1] = True
                out.append(n - 1)
            else:
                out.append(-1)
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch {self.n_batch}")
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ptr, b)
        if rc != 0:
            raise KvtierError(f"llama_decode failed with status {rc} (context full?)")
        now = time.monotonic()
        for item in items:
            slot = self.slots[item.slot]
            slot.tokens = np.concatenate([slot.tokens, np.asarray(item.tokens, np.int32)])
            slot.last_used = now
        return out

    def logits(self, index: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

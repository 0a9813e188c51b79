"""The hot tier T0: a llama.cpp context whose sequences are kvtier's slots.

Only the engine thread touches this object (llama.cpp contexts are not thread-safe).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from kvtier.config import ModelConfig
from kvtier.engine.model import Model
from kvtier.engine.slots import Slot
from kvtier.errors import KvtierError
from kvtier.ggml import CACHE_TYPES

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


class HotContext:
    """The hot tier: one llama.cpp context with a sequence per slot, decoded in batches."""

    def __init__(self, model: Model, cfg: ModelConfig, n_ctx_per_slot: int) -> None:
        self.model = model
        self.n_slots = cfg.n_slots
        self.n_ctx_per_slot = n_ctx_per_slot
        self.n_batch = cfg.n_batch
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_slot * cfg.n_slots
        params.n_batch = cfg.n_batch
        params.n_ubatch = min(cfg.n_batch, 512)
        params.n_seq_max = cfg.n_slots
        threads = cfg.n_threads or _cpu_count()
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

    # -- KV of a slot ----------------------------------------------------------------------------
    def truncate(self, slot: Slot, keep: int) -> None:
        """Keep the first ``keep`` tokens of a slot, freeing the rest of its cells."""
        if keep >= len(slot.tokens):
            return
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.index, keep, -1):
            raise KvtierError(f"llama.cpp could not trim slot {slot.index} to {keep} tokens")
        slot.tokens = slot.tokens[:keep]

    def clear(self, slot: Slot) -> None:
        """Free all of a slot's cells; it then holds nothing and belongs to nobody."""
        llama_cpp.llama_memory_seq_rm(self.memory, slot.index, -1, -1)
        slot.tokens = np.zeros(0, dtype=np.int32)
        slot.owner = None

    def pos_range(self, slot: Slot) -> tuple[int, int]:
        return (llama_cpp.llama_memory_seq_pos_min(self.memory, slot.index),
                llama_cpp.llama_memory_seq_pos_max(self.memory, slot.index))

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, items: list[BatchItem]) -> list[int]:
        """Decode one batch; returns, per item, the batch index of its logits (or -1)."""
        b = self._batch
        n = 0
        out: list[int] = []
        for item in items:
            count = len(item.tokens)
            for i in range(count):
                b.token[n] = int(item.tokens[i])
                b.pos[n] = item.pos + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = item.slot
                b.logits[n] = False
                n += 1
            if item.want_logits and count:
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


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

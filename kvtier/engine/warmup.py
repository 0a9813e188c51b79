"""The one-time costs of a server's first request, paid at startup instead.

Measured on the default model with 2 threads, on a quiet machine unless said otherwise:

- llama.cpp's first ``llama_decode`` on a new context took 0.43 s of CPU time (under load; later
  one-token decodes 0.02–0.03 s). llama-server pays this at startup too (its warm-up decode).
- numba loading the record kernels from its cache took 0.15 s (compiling them, without a cache,
  ~12 s); the store's background warm-up may not have finished by the first request.
- The first restore's state blob (66 MB for 2.8K tokens) took 81 ms to allocate, the next ones
  3 ms: the first time a process faults in that much fresh memory, the kernel is slow (numpy asks
  for transparent huge pages); once memory of that size has been touched and freed, it is fast.
  That was 40% of the first resumed session's time to first token (0.20 s against 0.13 s for
  the second, the same restore otherwise).

Reading and writing a sequence's state, the chat template, the tokenizer, the sampler and the
HTTP layer cost nothing measurable the first time (< 3 ms).
"""

from __future__ import annotations

import time

import numpy as np

from kvtier.engine import state_codec
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model
from kvtier.storage import codec

PAGE_BYTES = 4096


def warm_up(hot: HotContext, model: Model) -> float:
    """Decode a short prompt and one more token in the first slot, write its state back as a
    restore does, touch as much memory as a full slot's state blob, and empty the slot again;
    load the record kernels. Runs on the engine thread, whose llama.cpp thread pool the requests
    use. Returns the seconds it took."""
    started = time.perf_counter()
    codec.warm_up()
    slot = hot.slots[0]
    tokens = model.tokenize("Hello, world.", add_special=True)
    hot.decode([BatchItem(slot.index, tokens, 0, True)])
    hot.decode([BatchItem(slot.index, tokens[-1:], len(tokens), True)])
    state = state_codec.read_state(hot.ptr, slot.index)
    state_codec.write_state(hot.ptr, slot.index, state)
    _touch(len(state) * hot.sizing.slot_tokens // len(slot.tokens))
    hot.clear(slot)
    slot.last_used = 0.0  # as if never used: the warm-up must not steer the slot choice
    return time.perf_counter() - started


def _touch(nbytes: int) -> None:
    """Fault in ``nbytes`` of fresh memory, one write per page, and free it."""
    np.empty(nbytes, np.uint8)[::PAGE_BYTES] = 0

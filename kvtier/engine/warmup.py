"""The one-time costs of a server's first request, paid at startup instead.

Measured on the default model with 2 threads (process CPU time, which other processes' load
inflates less than wall time): llama.cpp's first ``llama_decode`` on a new context took 0.43 s of
CPU, later one-token decodes 0.02–0.03 s (llama-server pays this at startup too: its warm-up
decode); numba loading the record kernels from its cache took 0.15 s (compiling them, without a
cache, ~12 s), which the store's background warm-up may not have finished when the first
request comes. Reading and writing a sequence's state, the chat template, the tokenizer and
the sampler cost nothing measurable the first time.
"""

from __future__ import annotations

import time

from kvtier.engine import state_codec
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model
from kvtier.storage import codec


def warm_up(hot: HotContext, model: Model) -> float:
    """Decode a short prompt and one more token in the first slot, write its state back as a
    restore does, and empty the slot again; load the record kernels. Runs on the engine thread,
    whose llama.cpp thread pool the requests use. Returns the seconds it took."""
    started = time.perf_counter()
    codec.warm_up()
    slot = hot.slots[0]
    tokens = model.tokenize("Hello, world.", add_special=True)
    hot.decode([BatchItem(slot.index, tokens, 0, True)])
    hot.decode([BatchItem(slot.index, tokens[-1:], len(tokens), True)])
    state_codec.write_state(hot.ptr, slot.index, state_codec.read_state(hot.ptr, slot.index))
    hot.clear(slot)
    slot.last_used = 0.0  # as if never used: the warm-up must not steer the slot choice
    return time.perf_counter() - started

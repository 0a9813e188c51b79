"""A live llama.cpp context's side of the codec: reading and writing one sequence's state, and
finding the context's layout."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from kvtier.engine.state_codec.layout import VERIFIED_LLAMA_CPP_PYTHON, StateLayout
from kvtier.engine.state_codec.parse import parse
from kvtier.errors import StateRejected, UnsupportedLayout


def read_state(ctx: llama_cpp.llama_context_p, seq_id: int) -> memoryview:
    """``llama_state_seq_get_data`` of one sequence, copied once into a new byte memoryview."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = np.empty(size, dtype=np.uint8)
    n = llama_cpp.llama_state_seq_get_data(ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                           size, seq_id)
    if n != size:
        raise StateRejected(f"llama_state_seq_get_data wrote {n} of {size} bytes for sequence "
                            f"{seq_id}")
    return memoryview(buf)


def write_state(ctx: llama_cpp.llama_context_p, seq_id: int,
                blob: bytes | bytearray | memoryview) -> int:
    """``llama_state_seq_set_data`` into ``seq_id`` without copying ``blob``; returns bytes read.

    llama.cpp clears the sequence's cells of each cache section that has cells, then places the
    blob's. Raises :class:`StateRejected` when it refuses the blob (a layout that is not the
    context's, or no free cells for it; llama.cpp's log says which) or reads only part of it.
    """
    data = np.frombuffer(memoryview(blob).cast("B"), dtype=np.uint8)
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    n = llama_cpp.llama_state_seq_set_data(ctx, ptr, data.size, seq_id)
    if n == 0:
        raise StateRejected(f"llama_state_seq_set_data refused a {data.size}-byte state for "
                            f"sequence {seq_id}")
    if n != data.size:
        raise StateRejected(f"llama_state_seq_set_data read {n} of {data.size} bytes for sequence "
                            f"{seq_id}")
    return n


def layout_of(ctx: llama_cpp.llama_context_p, seq_id: int = 0) -> StateLayout:
    """The state layout of a live context, read from ``seq_id``'s own state.

    If the sequence is empty, one token is decoded into it at position 0 and removed again (the
    context's last logits are overwritten). Refuses llama-cpp-python versions whose layout was not
    verified and models that write a per-cell ``llama_kv_cell_ext`` (M-RoPE).
    """
    if llama_cpp.__version__ not in VERIFIED_LLAMA_CPP_PYTHON:
        raise UnsupportedLayout(f"llama-cpp-python {llama_cpp.__version__}: the state layout was "
                                f"verified on {', '.join(VERIFIED_LLAMA_CPP_PYTHON)} only, and "
                                f"blobs carry no version to check")
    model = llama_cpp.llama_get_model(ctx)
    rope = llama_cpp.llama_model_rope_type(model)
    if rope in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE):
        raise UnsupportedLayout(f"rope type {rope} (M-RoPE): llama.cpp writes a llama_kv_cell_ext "
                                f"per cell, whose size and meaning kvtier has not verified")
    mem = llama_cpp.llama_get_memory(ctx)
    if llama_cpp.llama_memory_seq_pos_max(mem, seq_id) >= 0:
        layout = parse(read_state(ctx, seq_id)).layout
    else:
        _decode_probe(ctx, model, seq_id)
        try:
            state = parse(read_state(ctx, seq_id))
        finally:
            llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)
        if any(c.positions.tolist() != [0] for c in state.caches):
            raise UnsupportedLayout("a one-token probe did not come back as one cell at "
                                    "position 0 in every cache")
        layout = state.layout
    n_seq_max = llama_cpp.llama_n_seq_max(ctx)
    if layout.n_stream not in (1, n_seq_max):
        raise UnsupportedLayout(f"n_stream {layout.n_stream} is neither 1 nor n_seq_max "
                                f"{n_seq_max}")
    return layout


def _decode_probe(ctx: llama_cpp.llama_context_p, model: llama_cpp.llama_model_p,
                  seq_id: int) -> None:
    token = llama_cpp.llama_vocab_bos(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        batch.n_tokens = 1
        batch.token[0] = max(token, 0)
        batch.pos[0] = 0
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = seq_id
        batch.logits[0] = 1
        rc = llama_cpp.llama_decode(ctx, batch)
    finally:
        llama_cpp.llama_batch_free(batch)
    if rc != 0:
        raise StateRejected(f"llama_decode of a one-token probe into sequence {seq_id} "
                            f"returned {rc}")

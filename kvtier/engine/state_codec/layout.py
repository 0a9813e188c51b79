"""The layout of llama.cpp's per-sequence state blobs, and the types that describe one.

A blob from ``llama_state_seq_get_data`` (llama-cpp-python 0.3.36), all little-endian::

    u32 magic = 0xaf143cd8 ; i32 seq_id
    one section per attention cache (two for sliding-window models: full, then SWA):
      u32 n_stream
      n_stream x { u32 cell_count ;
                   if cell_count: cell_count x { i32 pos ; u32 n_seq_id (= 1) ; i32 seq_id }
                                  u32 v_trans ; u32 n_layer
                                  n_layer x { i32 type ; u64 row_bytes ; cell_count rows }      K
                                  v_trans == 0: n_layer x { i32 type ; u64 row_bytes ; rows }   V
                                  v_trans == 1: n_layer x { i32 type ; u32 elem_bytes ;
                                                  u32 n_embd ; n_embd x cell_count elems } }

The blob has no version field: the magic, the exact byte count and the pinned llama-cpp-python
(:func:`layout_of` checks it) are all that guard the layout, so anything unexpected is refused with
:class:`~kvtier.errors.UnsupportedLayout` rather than guessed at.

Block convention (:func:`split_blocks` / :func:`compose`): block ``b`` covers positions
``[b*block_size, (b+1)*block_size)``. Within a block, the layers of one cache share their cells, and
every cache's rows are a run of consecutive positions *ending* where the block's longest run ends;
the longest run (the full-attention cache's) starts at ``b*block_size``. So with ``n`` the largest
row count among a block's layers, a layer with ``m`` rows holds positions
``[b*block_size + n - m, b*block_size + n)``. For single-cache models every layer has ``n`` rows at
``b*block_size + row``. A sliding-window cache only holds the last ``n_swa`` positions: its layers
have 0 rows in blocks that left the window, and a suffix of the block where the window starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

STATE_MAGIC = 0xAF143CD8
VERIFIED_LLAMA_CPP_PYTHON = ("0.3.36",)
"""Versions whose blob layout was checked byte for byte (the blob itself carries no version)."""

ELEM_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
HEADER = struct.Struct("<Ii")
U32 = struct.Struct("<I")
TRANS_LAYERS = struct.Struct("<II")       # v_trans, n_layer
TENSOR_HEAD = struct.Struct("<iQ")        # K, and V when not transposed: type, row bytes
TENSOR_HEAD_T = struct.Struct("<iII")     # transposed V: type, element bytes, n_embd; 12 bytes too
CELL_BYTES = 12                           # i32 pos, u32 n_seq_id, i32 seq_id


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """One attention-cache section of a blob, minus the data."""

    n_stream: int
    v_trans: bool
    n_layer: int
    k_types: tuple[int, ...]
    k_row_bytes: tuple[int, ...]
    v_types: tuple[int, ...]
    v_row_bytes: tuple[int, ...]
    """Per-token row bytes, also when the blob stores V transposed."""
    cell_ext_bytes: int = 0
    """Bytes of ``llama_kv_cell_ext`` per cell; always 0 here: models that have it are refused."""

    @property
    def row_bytes(self) -> int:
        """K+V bytes of one token over this cache's layers."""
        return sum(self.k_row_bytes) + sum(self.v_row_bytes)


@dataclass(frozen=True, slots=True)
class StateLayout:
    caches: tuple[CacheLayout, ...]
    """One for most models, two for sliding-window models (full, then SWA)."""

    @property
    def n_layers(self) -> int:
        """Layers over all caches; a record's layer index runs over the caches in order."""
        return sum(c.n_layer for c in self.caches)

    @property
    def n_stream(self) -> int:
        return self.caches[0].n_stream


@dataclass(frozen=True, slots=True)
class CacheCells:
    positions: np.ndarray
    """int32 (n_cells,), in the order the blob lists them."""
    k: tuple[np.ndarray, ...]
    """Per layer, uint8 (n_cells, row_bytes); may be read-only views into the blob."""
    v: tuple[np.ndarray, ...]
    """Per layer, uint8 (n_cells, row_bytes): one row per token even where the blob transposes V."""


@dataclass(frozen=True, slots=True)
class SequenceState:
    seq_id: int
    stream: int
    """The stream the sequence's cells are in (0 unless n_stream > 1)."""
    layout: StateLayout
    caches: tuple[CacheCells, ...]


def stream_of(layout: StateLayout, seq_id: int) -> int:
    """The stream that holds ``seq_id``'s cells: its own with one stream per sequence (n_seq_max > 1
    and kv_unified off), else the single shared one."""
    if layout.n_stream == 1:
        return 0
    if not 0 <= seq_id < layout.n_stream:
        raise ValueError(f"seq_id {seq_id} has no stream among {layout.n_stream}")
    return seq_id

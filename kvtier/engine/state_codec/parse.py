"""Reading a state blob: :func:`parse` it into positions and per-layer rows, and
:func:`split_blocks` those into block records (the block convention is in :mod:`.layout`)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from kvtier.engine.state_codec.layout import (CELL_BYTES, ELEM_DTYPES, HEADER, STATE_MAGIC,
                                              TENSOR_HEAD, TENSOR_HEAD_T, TRANS_LAYERS, U32,
                                              CacheCells, CacheLayout, SequenceState, StateLayout)
from kvtier.errors import UnsupportedLayout
from kvtier.ggml import BY_ID
from kvtier.storage.records import LayerKV, TensorRows

_MAX_CACHES = 2
_MAX_STREAMS = 256                         # LLAMA_MAX_SEQ


class _Reader:
    __slots__ = ("buf", "off")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.off = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.off

    def skip(self, n: int, what: str) -> int:
        if n > self.left:
            raise UnsupportedLayout(f"blob truncated in {what}: needs {n} bytes at offset "
                                    f"{self.off}, {self.left} left")
        start = self.off
        self.off += n
        return start

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack_from(self.buf, self.skip(fmt.size, what))


def parse(blob: bytes | bytearray | memoryview,
          n_stream_expected: int | None = None) -> SequenceState:
    """Split a ``llama_state_seq_get_data`` blob into positions and per-layer K/V rows.

    K and non-transposed V rows are views into ``blob`` (keep it alive and unchanged); transposed V
    is copied into per-token rows. Raises :class:`UnsupportedLayout` for anything but exactly one
    or two well-formed attention-cache sections holding cells of the blob's own sequence.
    """
    buf = memoryview(blob).cast("B")
    data = np.frombuffer(buf, dtype=np.uint8)
    r = _Reader(buf)
    magic, seq_id = r.unpack(HEADER, "the header")
    if magic != STATE_MAGIC:
        raise UnsupportedLayout(f"magic {magic:#010x} is not llama.cpp's sequence-state magic "
                                f"{STATE_MAGIC:#010x}")
    if seq_id < 0:
        raise UnsupportedLayout(f"blob of seq_id {seq_id}: only single-sequence states are parsed")
    layouts: list[CacheLayout] = []
    cells: list[CacheCells] = []
    stream: int | None = None
    while r.left and len(layouts) < _MAX_CACHES:
        left = r.left
        try:
            s, layout, cache = _parse_cache(r, data, seq_id, n_stream_expected)
        except UnsupportedLayout as e:
            if not layouts:
                raise
            raise UnsupportedLayout(f"the {left} bytes after the first cache section are not "
                                    f"a second attention cache (trailing data or another memory "
                                    f"type, e.g. recurrent state): {e}") from e
        if layouts and layout.n_stream != layouts[0].n_stream:
            raise UnsupportedLayout(f"cache sections disagree on n_stream: {layouts[0].n_stream} "
                                    f"then {layout.n_stream}")
        if stream is not None and s != stream:
            raise UnsupportedLayout(f"sequence's cells are in stream {stream} of the first cache "
                                    f"but stream {s} of the next")
        stream = s
        layouts.append(layout)
        cells.append(cache)
    if not layouts:
        raise UnsupportedLayout("blob ends after its header: no attention-cache section")
    if r.left:
        raise UnsupportedLayout(f"{r.left} trailing bytes after {len(layouts)} cache sections")
    assert stream is not None
    return SequenceState(seq_id, stream, StateLayout(tuple(layouts)), tuple(cells))


def _parse_cache(r: _Reader, data: np.ndarray, seq_id: int, n_stream_expected: int | None
                 ) -> tuple[int, CacheLayout, CacheCells]:
    (n_stream,) = r.unpack(U32, "n_stream")
    if n_stream_expected is not None and n_stream != n_stream_expected:
        raise UnsupportedLayout(f"blob has n_stream {n_stream}, the context has "
                                f"{n_stream_expected}")
    if not 1 <= n_stream <= _MAX_STREAMS:
        raise UnsupportedLayout(f"n_stream {n_stream} is outside 1..{_MAX_STREAMS}")
    found: tuple[int, CacheLayout, CacheCells] | None = None
    for s in range(n_stream):
        (n_cells,) = r.unpack(U32, f"cell_count of stream {s}")
        if n_cells == 0:
            continue
        if found is not None:
            raise UnsupportedLayout(f"sequence {seq_id} has cells in streams {found[0]} and {s}: "
                                    f"one sequence lives in one stream")
        layout, cache = _parse_cells(r, data, seq_id, n_stream, n_cells)
        found = (s, layout, cache)
    if found is None:
        # An empty section says nothing about types, row sizes or v_trans: no layout to return.
        raise UnsupportedLayout("a cache section holds no cells of the sequence, so the blob "
                                "carries no layout for it (is the sequence empty?)")
    return found


def _parse_cells(r: _Reader, data: np.ndarray, seq_id: int, n_stream: int, n_cells: int
                 ) -> tuple[CacheLayout, CacheCells]:
    meta = data[r.skip(n_cells * CELL_BYTES, "cell metadata"):r.off].view("<i4")
    meta = meta.reshape(n_cells, 3)
    if np.any(meta[:, 1] != 1):
        # A per-sequence blob lists only the requested sequence per cell; more ids (or a
        # llama_kv_cell_ext between n_seq_id and the ids, as M-RoPE models write) is another layout.
        raise UnsupportedLayout("a cell does not list exactly one sequence id (cell ext or a "
                                "whole-context state?)")
    if np.any(meta[:, 2] != seq_id):
        raise UnsupportedLayout(f"cells name sequences other than the blob's {seq_id}")
    positions = meta[:, 0].copy()
    if np.any(positions < 0):
        raise UnsupportedLayout("a cell has a negative position")
    v_trans, n_layer = r.unpack(TRANS_LAYERS, "v_trans and n_layer")
    if v_trans not in (0, 1):
        raise UnsupportedLayout(f"v_trans is {v_trans}, not 0 or 1")
    if n_layer == 0 or n_layer * 2 * TENSOR_HEAD.size > r.left:
        raise UnsupportedLayout(f"n_layer {n_layer} does not fit the {r.left} bytes left")
    k_types, k_rb, k_rows = _parse_tensors(r, data, n_layer, n_cells, "K")
    if v_trans:
        v_types, v_rb, v_rows = _parse_transposed(r, data, n_layer, n_cells)
    else:
        v_types, v_rb, v_rows = _parse_tensors(r, data, n_layer, n_cells, "V")
    layout = CacheLayout(n_stream, bool(v_trans), n_layer, k_types, k_rb, v_types, v_rb)
    return layout, CacheCells(positions, k_rows, v_rows)


def _check_type(ggml_type: int, row_bytes: int, what: str) -> None:
    if ggml_type not in BY_ID:
        raise UnsupportedLayout(f"{what}: ggml type {ggml_type} is not a KV cache type kvtier "
                                f"knows")
    block_bytes = BY_ID[ggml_type].block_bytes
    if row_bytes <= 0 or row_bytes % block_bytes:
        raise UnsupportedLayout(f"{what}: {row_bytes} bytes is not a row of ggml type {ggml_type} "
                                f"(blocks of {block_bytes} bytes)")


def _parse_tensors(r: _Reader, data: np.ndarray, n_layer: int, n_cells: int, kind: str
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[np.ndarray, ...]]:
    types, row_bytes, rows = [], [], []
    for il in range(n_layer):
        what = f"{kind} of layer {il}"
        t, rb = r.unpack(TENSOR_HEAD, what)
        _check_type(t, rb, what)
        start = r.skip(n_cells * rb, what)
        types.append(t)
        row_bytes.append(rb)
        rows.append(data[start:r.off].reshape(n_cells, rb))
    return tuple(types), tuple(row_bytes), tuple(rows)


def _parse_transposed(r: _Reader, data: np.ndarray, n_layer: int, n_cells: int
                      ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[np.ndarray, ...]]:
    types, row_bytes, rows = [], [], []
    for il in range(n_layer):
        what = f"transposed V of layer {il}"
        t, elem, n_embd = r.unpack(TENSOR_HEAD_T, what)
        _check_type(t, elem * n_embd, what)
        if BY_ID[t].block_values != 1 or BY_ID[t].block_bytes != elem or elem not in ELEM_DTYPES:
            raise UnsupportedLayout(f"{what}: element size {elem} does not match ggml type {t} "
                                    f"(a transposed V cache holds whole elements)")
        start = r.skip(n_embd * n_cells * elem, what)
        by_channel = data[start:r.off].view(ELEM_DTYPES[elem]).reshape(n_embd, n_cells)
        types.append(t)
        row_bytes.append(n_embd * elem)
        rows.append(np.ascontiguousarray(by_channel.T).view(np.uint8))
    return tuple(types), tuple(row_bytes), tuple(rows)


def split_blocks(state: SequenceState, block_size: int) -> dict[int, list[LayerKV]]:
    """Cut a parsed state into blocks: block index -> one :class:`LayerKV` per layer (all caches).

    Rows are sorted by position and follow the module's block convention: a sliding-window cache's
    layers have 0 rows in blocks that left its window. Rows are views into the state where the blob
    lists cells in position order (the usual case), copies otherwise. Raises
    :class:`UnsupportedLayout` when positions cannot be expressed that way (two cells at one
    position, or a gap inside a block, e.g. after a ``seq_rm`` of a middle range).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    per_cache = [_block_runs(ci, cache.positions, block_size)
                 for ci, cache in enumerate(state.caches)]
    out: dict[int, list[LayerKV]] = {}
    for b in sorted(set().union(*(runs for _, runs in per_cache))):
        spans = [(p0, p0 + hi - lo) for _, runs in per_cache if b in runs
                 for lo, hi, p0 in (runs[b],)]
        end = max(e for _, e in spans)
        if min(s for s, _ in spans) != b * block_size or any(e != end for _, e in spans):
            raise UnsupportedLayout(f"block {b}: the caches hold positions {spans} (half-open), "
                                    f"not runs that end together with the longest starting at "
                                    f"{b * block_size}")
        layers: list[LayerKV] = []
        for cache, layout, (order, runs) in zip(state.caches, state.layout.caches, per_cache):
            lo, hi, _ = runs.get(b, (0, 0, 0))
            take = slice(lo, hi) if order is None else order[lo:hi]
            for il in range(layout.n_layer):
                layers.append(LayerKV(TensorRows(layout.k_types[il], cache.k[il][take]),
                                      TensorRows(layout.v_types[il], cache.v[il][take])))
        out[b] = layers
    return out


def _block_runs(ci: int, positions: np.ndarray, block_size: int
                ) -> tuple[np.ndarray | None, dict[int, tuple[int, int, int]]]:
    """The position order of a cache's cells (None: already sorted) and, per block, the
    [lo, hi) range of that order holding the block's cells and their first position."""
    order: np.ndarray | None = None
    pos = positions
    if pos.size > 1 and not np.all(pos[1:] > pos[:-1]):
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        if np.any(pos[1:] == pos[:-1]):
            raise UnsupportedLayout(f"cache {ci} holds two cells at one position")
    ids, starts = np.unique(pos // block_size, return_index=True)
    ends = np.append(starts[1:], pos.size)
    runs: dict[int, tuple[int, int, int]] = {}
    for b, lo, hi in zip(ids.tolist(), starts.tolist(), ends.tolist()):
        first, last = int(pos[lo]), int(pos[hi - 1])
        if last - first != hi - 1 - lo:
            raise UnsupportedLayout(f"cache {ci}: positions {first}..{last} of block {b} have a "
                                    f"gap; a block record holds consecutive tokens")
        runs[b] = (lo, hi, first)
    return order, runs

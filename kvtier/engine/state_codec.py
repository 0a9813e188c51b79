"""Codec between llama.cpp's per-sequence state blobs and kvtier's block records.

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

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from kvtier.errors import ModelMismatch, StateRejected, UnsupportedLayout
from kvtier.ggml import BY_ID
from kvtier.storage.records import LayerKV, TensorRows

STATE_MAGIC = 0xAF143CD8
VERIFIED_LLAMA_CPP_PYTHON = ("0.3.36",)
"""Versions whose blob layout was checked byte for byte (the blob itself carries no version)."""

_ELEM_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_HEADER = struct.Struct("<Ii")
_U32 = struct.Struct("<I")
_TRANS_LAYERS = struct.Struct("<II")       # v_trans, n_layer
_TENSOR_HEAD = struct.Struct("<iQ")        # K, and V when not transposed: type, row bytes
_TENSOR_HEAD_T = struct.Struct("<iII")     # transposed V: type, element bytes, n_embd; 12 bytes too
_CELL_BYTES = 12                           # i32 pos, u32 n_seq_id, i32 seq_id
_MAX_CACHES = 2
_MAX_STREAMS = 256                         # LLAMA_MAX_SEQ


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
    magic, seq_id = r.unpack(_HEADER, "the header")
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
    (n_stream,) = r.unpack(_U32, "n_stream")
    if n_stream_expected is not None and n_stream != n_stream_expected:
        raise UnsupportedLayout(f"blob has n_stream {n_stream}, the context has "
                                f"{n_stream_expected}")
    if not 1 <= n_stream <= _MAX_STREAMS:
        raise UnsupportedLayout(f"n_stream {n_stream} is outside 1..{_MAX_STREAMS}")
    found: tuple[int, CacheLayout, CacheCells] | None = None
    for s in range(n_stream):
        (n_cells,) = r.unpack(_U32, f"cell_count of stream {s}")
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
    meta = data[r.skip(n_cells * _CELL_BYTES, "cell metadata"):r.off].view("<i4")
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
    v_trans, n_layer = r.unpack(_TRANS_LAYERS, "v_trans and n_layer")
    if v_trans not in (0, 1):
        raise UnsupportedLayout(f"v_trans is {v_trans}, not 0 or 1")
    if n_layer == 0 or n_layer * 2 * _TENSOR_HEAD.size > r.left:
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
        t, rb = r.unpack(_TENSOR_HEAD, what)
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
        t, elem, n_embd = r.unpack(_TENSOR_HEAD_T, what)
        _check_type(t, elem * n_embd, what)
        if BY_ID[t].block_values != 1 or BY_ID[t].block_bytes != elem or elem not in _ELEM_DTYPES:
            raise UnsupportedLayout(f"{what}: element size {elem} does not match ggml type {t} "
                                    f"(a transposed V cache holds whole elements)")
        start = r.skip(n_embd * n_cells * elem, what)
        by_channel = data[start:r.off].view(_ELEM_DTYPES[elem]).reshape(n_embd, n_cells)
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


@dataclass(slots=True)
class ComposedState:
    """A state blob being composed: headers and cell metadata written, row data to be filled.

    :meth:`rows` gives the destination of each block's rows in each layer, so records can be
    decoded straight into the blob (the restore path) instead of into arrays copied in after.
    """

    blob: memoryview
    """The whole blob, for :func:`write_state` once every row is filled."""
    blocks: list[int]
    """Block indices in blob order (ascending)."""
    k_rows: list[list[np.ndarray | None]]
    """[block position][layer] -> (n_rows, row_bytes) destination of K, None without rows."""
    v_rows: list[list[np.ndarray | None]]
    """The same for V; None too where the blob stores V transposed (see :meth:`put_v`)."""
    v_transposed: list[np.ndarray | None]
    """Per layer, the (n_embd, n_cells) element view of a transposed V, else None."""
    row_start: list[list[int]]
    """[block position][layer] -> the block's first row among its cache's cells."""

    def rows(self, j: int, layer: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Where block ``blocks[j]``'s K and V rows of ``layer`` go (see the fields)."""
        return self.k_rows[j][layer], self.v_rows[j][layer]

    def put_v(self, j: int, layer: int, rows: np.ndarray) -> None:
        """Write V rows (one per token), transposing them where the blob stores V transposed."""
        v = self.v_rows[j][layer]
        if v is not None:
            v[...] = rows
            return
        dst = self.v_transposed[layer]
        if dst is None or self.k_rows[j][layer] is None:
            raise ValueError(f"block {self.blocks[j]} has no rows in layer {layer}")
        first, m = self.row_start[j][layer], rows.shape[0]
        dst[:, first:first + m] = np.ascontiguousarray(rows).view(dst.dtype).T


def allocate(layout: StateLayout, seq_id: int, stream: int,
             blocks: Sequence[tuple[int, Sequence[int]]], block_size: int) -> ComposedState:
    """Lay out a state blob for ``llama_state_seq_set_data`` holding the given blocks, each with
    its row count per cache (``(block, [rows in cache 0, ...])``), and return where every block's
    rows go. Row data is left unwritten: fill it through the result, or use :func:`compose`.

    ``layout`` is the context's (:func:`layout_of`); ``stream`` is the sequence's stream
    (:func:`stream_of`), every other stream gets cell_count 0. Blocks may be given in any order and
    need not be contiguous; their rows land at the positions the module's block convention gives.
    A cache with no rows at all gets cell_count 0 everywhere, and llama.cpp then leaves that cache's
    cells of the sequence as they were: clear the sequence (``llama_memory_seq_rm``) first.
    The memory is never zero-filled (that would cost as much as a third of the copy).
    """
    if any(c.cell_ext_bytes for c in layout.caches):
        raise UnsupportedLayout("block records carry no llama_kv_cell_ext; cannot compose cells "
                                "for a model that needs one")
    if not 0 <= stream < layout.n_stream:
        raise ValueError(f"stream {stream} is not one of the layout's {layout.n_stream}")
    if seq_id < 0:
        raise ValueError(f"seq_id must be >= 0, got {seq_id}")
    ordered = sorted(blocks, key=lambda item: item[0])
    for (b0, _), (b1, _) in zip(ordered, ordered[1:]):
        if b0 == b1:
            raise ValueError(f"block {b0} given twice")
    positions: list[list[np.ndarray]] = [[] for _ in layout.caches]
    for b, counts in ordered:
        if len(counts) != len(layout.caches):
            raise ValueError(f"block {b} gives rows for {len(counts)} caches, the layout has "
                             f"{len(layout.caches)}")
        n = max(counts)
        if n > block_size:
            raise ValueError(f"block {b} has {n} rows, more than block_size {block_size}")
        for ci, m in enumerate(counts):
            if m:
                start = b * block_size + n - m
                positions[ci].append(np.arange(start, start + m, dtype="<i4"))

    n_cells = [sum(p.size for p in ps) for ps in positions]
    total = _HEADER.size + sum(
        _U32.size * (1 + c.n_stream)
        + (n * (_CELL_BYTES + c.row_bytes) + _TRANS_LAYERS.size + 2 * c.n_layer * _TENSOR_HEAD.size
           if n else 0)
        for c, n in zip(layout.caches, n_cells))
    data = np.empty(total, dtype=np.uint8)
    out = memoryview(data)
    n_layers = layout.n_layers
    k_rows: list[list[np.ndarray | None]] = [[None] * n_layers for _ in ordered]
    v_rows: list[list[np.ndarray | None]] = [[None] * n_layers for _ in ordered]
    row_start = [[0] * n_layers for _ in ordered]
    v_transposed: list[np.ndarray | None] = [None] * n_layers
    _HEADER.pack_into(out, 0, STATE_MAGIC, seq_id)
    off = _HEADER.size
    base = 0
    for ci, cache in enumerate(layout.caches):
        n = n_cells[ci]
        _U32.pack_into(out, off, cache.n_stream)
        off += _U32.size
        for s in range(cache.n_stream):
            count = n if s == stream else 0
            _U32.pack_into(out, off, count)
            off += _U32.size
            if not count:
                continue
            meta = data[off:off + n * _CELL_BYTES].view("<i4").reshape(n, 3)
            meta[:, 0] = np.concatenate(positions[ci])
            meta[:, 1] = 1
            meta[:, 2] = seq_id
            off += n * _CELL_BYTES
            _TRANS_LAYERS.pack_into(out, off, int(cache.v_trans), cache.n_layer)
            off += _TRANS_LAYERS.size
            spans = []   # (position in ordered, first row, rows) of blocks with rows here
            first = 0
            for j, (_, counts) in enumerate(ordered):
                if counts[ci]:
                    spans.append((j, first, counts[ci]))
                    first += counts[ci]
            for il in range(cache.n_layer):
                rb = cache.k_row_bytes[il]
                _TENSOR_HEAD.pack_into(out, off, cache.k_types[il], rb)
                off += _TENSOR_HEAD.size
                region = data[off:off + n * rb].reshape(n, rb)
                for j, first, m in spans:
                    k_rows[j][base + il] = region[first:first + m]
                    row_start[j][base + il] = first
                off += n * rb
            for il in range(cache.n_layer):
                t, rb = cache.v_types[il], cache.v_row_bytes[il]
                if cache.v_trans:
                    elem = BY_ID[t].block_bytes
                    _TENSOR_HEAD_T.pack_into(out, off, t, elem, rb // elem)
                    off += _TENSOR_HEAD_T.size
                    v_transposed[base + il] = data[off:off + n * rb].view(
                        _ELEM_DTYPES[elem]).reshape(rb // elem, n)
                else:
                    _TENSOR_HEAD.pack_into(out, off, t, rb)
                    off += _TENSOR_HEAD.size
                    region = data[off:off + n * rb].reshape(n, rb)
                    for j, first, m in spans:
                        v_rows[j][base + il] = region[first:first + m]
                off += n * rb
        base += cache.n_layer
    assert off == total
    return ComposedState(out, [b for b, _ in ordered], k_rows, v_rows, v_transposed, row_start)


def compose(layout: StateLayout, seq_id: int, stream: int,
            blocks: Sequence[tuple[int, Sequence[LayerKV]]], block_size: int) -> memoryview:
    """Build a state blob for ``llama_state_seq_set_data`` from block records (placement as in
    :func:`allocate`): a writable byte memoryview, for :func:`write_state` or ``bytes()``.

    Raises :class:`~kvtier.errors.ModelMismatch` when a record's type or row size is not the
    layout's, ValueError for records that are inconsistent in themselves.
    """
    by_block = dict(blocks)
    if len(by_block) != len(blocks):
        raise ValueError("a block is given twice")
    target = allocate(layout, seq_id, stream,
                      [(b, _check_block(layout, b, layers)) for b, layers in blocks], block_size)
    for j, b in enumerate(target.blocks):
        for layer, kv in enumerate(by_block[b]):
            k, _ = target.rows(j, layer)
            if k is not None:
                k[...] = kv.k.rows
                target.put_v(j, layer, kv.v.rows)
    return target.blob


def _check_block(layout: StateLayout, b: int, layers: Sequence[LayerKV]) -> list[int]:
    """Row count per cache of one block's records, after checking them against the layout."""
    if len(layers) != layout.n_layers:
        raise ValueError(f"block {b} has {len(layers)} layers, the layout {layout.n_layers}")
    counts: list[int] = []
    base = 0
    u8 = np.dtype(np.uint8)
    for cache in layout.caches:
        m = layers[base].k.n_tokens
        for il in range(cache.n_layer):
            k, v = layers[base + il].k, layers[base + il].v
            # One cheap test per layer on the hot path; _explain finds out what is wrong.
            if (k.ggml_type != cache.k_types[il] or v.ggml_type != cache.v_types[il]
                    or k.rows.shape != (m, cache.k_row_bytes[il])
                    or v.rows.shape != (m, cache.v_row_bytes[il])
                    or k.rows.dtype != u8 or v.rows.dtype != u8):
                _explain(cache, b, base, il, m, k, v)
        counts.append(m)
        base += cache.n_layer
    return counts


def _explain(cache: CacheLayout, b: int, base: int, il: int, m: int, k: TensorRows,
             v: TensorRows) -> None:
    for rows, t, rb, kind in ((k, cache.k_types[il], cache.k_row_bytes[il], "K"),
                              (v, cache.v_types[il], cache.v_row_bytes[il], "V")):
        where = f"block {b} layer {base + il} {kind}"
        if rows.rows.dtype != np.uint8 or rows.rows.ndim != 2:
            raise ValueError(f"{where}: rows are {rows.rows.dtype} {rows.rows.shape}, "
                             f"not 2-D uint8")
        if rows.ggml_type != t or rows.row_bytes != rb:
            raise ModelMismatch(f"{where}: type {rows.ggml_type} x {rows.row_bytes} bytes, the "
                                f"context caches type {t} x {rb} bytes")
        if rows.n_tokens != m:
            raise ValueError(f"{where}: {rows.n_tokens} rows, but the cache's first layer has {m}; "
                             f"the layers of one cache share their cells")
    raise AssertionError("unreachable: _check_block saw a mismatch")


def stream_of(layout: StateLayout, seq_id: int) -> int:
    """The stream that holds ``seq_id``'s cells: its own with one stream per sequence (n_seq_max > 1
    and kv_unified off), else the single shared one."""
    if layout.n_stream == 1:
        return 0
    if not 0 <= seq_id < layout.n_stream:
        raise ValueError(f"seq_id {seq_id} has no stream among {layout.n_stream}")
    return seq_id


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

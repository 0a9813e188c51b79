"""Writing a state blob from block records: :func:`allocate` lays it out and says where each
block's rows go, :func:`compose` fills it (the block convention is in :mod:`.layout`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.engine.state_codec.layout import (CELL_BYTES, ELEM_DTYPES, HEADER, STATE_MAGIC,
                                              TENSOR_HEAD, TENSOR_HEAD_T, TRANS_LAYERS, U32,
                                              CacheLayout, StateLayout)
from kvtier.errors import ModelMismatch, UnsupportedLayout
from kvtier.ggml import BY_ID
from kvtier.storage.records import LayerKV, TensorRows


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
    k_offsets: np.ndarray
    """int64 [block position, layer] -> byte offset in ``blob`` of the block's first K row, -1
    without rows: the destinations by address, for a decode that makes no Python call per row."""
    v_offsets: np.ndarray
    """The same for V; -1 too where the blob stores V transposed."""

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
             blocks: Sequence[tuple[int, Sequence[int]]], block_size: int,
             out: np.ndarray | Callable[[int], np.ndarray] | None = None) -> ComposedState:
    """Lay out a state blob for ``llama_state_seq_set_data`` holding the given blocks, each with
    its row count per cache (``(block, [rows in cache 0, ...])``), and return where every block's
    rows go. Row data is left unwritten: fill it through the result, or use :func:`compose`.

    ``layout`` is the context's (:func:`layout_of`); ``stream`` is the sequence's stream
    (:func:`stream_of`), every other stream gets cell_count 0. Blocks may be given in any order and
    need not be contiguous; their rows land at the positions the module's block convention gives.
    A cache with no rows at all gets cell_count 0 everywhere, and llama.cpp then leaves that cache's
    cells of the sequence as they were: clear the sequence (``llama_memory_seq_rm``) first.
    The memory is never zero-filled (that would cost as much as a third of the copy). With
    ``out`` (a 1-D uint8 array, e.g. a reusable pinned host buffer, or a function of the blob's
    size that returns one), the blob is its first bytes; ValueError if it is too small.
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
    total = HEADER.size + sum(
        U32.size * (1 + c.n_stream)
        + (n * (CELL_BYTES + c.row_bytes) + TRANS_LAYERS.size + 2 * c.n_layer * TENSOR_HEAD.size
           if n else 0)
        for c, n in zip(layout.caches, n_cells))
    if callable(out):
        out = out(total)
    if out is None:
        data = np.empty(total, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size < total:
        raise ValueError(f"a blob of {total} bytes does not fit the given buffer")
    else:
        data = out[:total]
    out = memoryview(data)
    n_layers = layout.n_layers
    k_rows: list[list[np.ndarray | None]] = [[None] * n_layers for _ in ordered]
    v_rows: list[list[np.ndarray | None]] = [[None] * n_layers for _ in ordered]
    row_start = [[0] * n_layers for _ in ordered]
    k_offsets = np.full((len(ordered), n_layers), -1, np.int64)
    v_offsets = np.full((len(ordered), n_layers), -1, np.int64)
    v_transposed: list[np.ndarray | None] = [None] * n_layers
    HEADER.pack_into(out, 0, STATE_MAGIC, seq_id)
    off = HEADER.size
    base = 0
    for ci, cache in enumerate(layout.caches):
        n = n_cells[ci]
        U32.pack_into(out, off, cache.n_stream)
        off += U32.size
        for s in range(cache.n_stream):
            count = n if s == stream else 0
            U32.pack_into(out, off, count)
            off += U32.size
            if not count:
                continue
            meta = data[off:off + n * CELL_BYTES].view("<i4").reshape(n, 3)
            meta[:, 0] = np.concatenate(positions[ci])
            meta[:, 1] = 1
            meta[:, 2] = seq_id
            off += n * CELL_BYTES
            TRANS_LAYERS.pack_into(out, off, int(cache.v_trans), cache.n_layer)
            off += TRANS_LAYERS.size
            spans = []   # (position in ordered, first row, rows) of blocks with rows here
            first = 0
            for j, (_, counts) in enumerate(ordered):
                if counts[ci]:
                    spans.append((j, first, counts[ci]))
                    first += counts[ci]
            for il in range(cache.n_layer):
                rb = cache.k_row_bytes[il]
                TENSOR_HEAD.pack_into(out, off, cache.k_types[il], rb)
                off += TENSOR_HEAD.size
                region = data[off:off + n * rb].reshape(n, rb)
                for j, first, m in spans:
                    k_rows[j][base + il] = region[first:first + m]
                    row_start[j][base + il] = first
                    k_offsets[j, base + il] = off + first * rb
                off += n * rb
            for il in range(cache.n_layer):
                t, rb = cache.v_types[il], cache.v_row_bytes[il]
                if cache.v_trans:
                    elem = BY_ID[t].block_bytes
                    TENSOR_HEAD_T.pack_into(out, off, t, elem, rb // elem)
                    off += TENSOR_HEAD_T.size
                    v_transposed[base + il] = data[off:off + n * rb].view(
                        ELEM_DTYPES[elem]).reshape(rb // elem, n)
                else:
                    TENSOR_HEAD.pack_into(out, off, t, rb)
                    off += TENSOR_HEAD.size
                    region = data[off:off + n * rb].reshape(n, rb)
                    for j, first, m in spans:
                        v_rows[j][base + il] = region[first:first + m]
                        v_offsets[j, base + il] = off + first * rb
                off += n * rb
        base += cache.n_layer
    assert off == total
    return ComposedState(out, [b for b, _ in ordered], k_rows, v_rows, v_transposed, row_start,
                         k_offsets, v_offsets)


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

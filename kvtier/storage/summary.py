"""Per-block key summaries: the per-channel minimum and maximum of K.

Stored with every f16 block in every tier, they let a query-aware working set score a block
(Quest's bound: sum_i max(q_i * max_i, q_i * min_i)) without reading its payload. Computed in numba
on the f16 bits: numpy's float16 reductions ran at ~0.1 GB/s, which made them the slowest step of
storing a block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from kvtier.storage.catalog import KeySummary
from kvtier.storage.records import LayerKV


@njit(cache=True, nogil=True)
def _min_max(bits: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    # Compare f16 values through an integer key that orders them like their values (sign and
    # magnitude → two's complement; -0 and +0 tie); NaNs are skipped.
    n, width = bits.shape
    lo_key = np.full(width, np.int32(0x7FFF), dtype=np.int32)
    hi_key = np.full(width, np.int32(-0x7FFF), dtype=np.int32)
    for t in range(n):
        for c in range(width):
            b = np.int32(bits[t, c])
            magnitude = b & 0x7FFF
            if magnitude > 0x7C00:
                continue
            key = -magnitude if b & 0x8000 else magnitude
            if key < lo_key[c] or (key == lo_key[c] and lo[c] == 0x7E00):
                lo_key[c] = key
                lo[c] = b
            if key > hi_key[c] or (key == hi_key[c] and hi[c] == 0x7E00):
                hi_key[c] = key
                hi[c] = b


def key_min_max(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) of f16 rows given as uint16 bits (n_tokens, width), as f16 bits.

    NaNs are ignored; a channel with nothing but NaN gets NaN bits for both."""
    width = bits.shape[1]
    lo = np.full(width, 0x7E00, dtype=np.uint16)
    hi = np.full(width, 0x7E00, dtype=np.uint16)
    _min_max(np.ascontiguousarray(bits), lo, hi)
    return lo, hi


def key_summary(layers: Sequence[LayerKV]) -> KeySummary | None:
    """A block's key summary over all its layers; None unless every layer's K is f16 rows of one
    width (llama.cpp's quantized caches, or layers of several widths, are not summarized)."""
    if not layers or any(not layer.k.is_f16 or layer.n_tokens == 0 for layer in layers):
        return None
    width = layers[0].k.rows.shape[1] // 2
    if any(layer.k.rows.shape[1] != 2 * width for layer in layers):
        return None
    bounds = np.empty((len(layers), 2, width), dtype=np.uint16)
    for i, layer in enumerate(layers):
        bounds[i, 0], bounds[i, 1] = key_min_max(layer.k.rows.view(np.uint16))
    return KeySummary(bounds.view(np.float16))

"""Per-block key summaries: the per-channel minimum and maximum of K, and the mean key.

Stored with every f16 block in every tier, they let a query-aware working set score a block
without reading its payload: by Quest's bound (sum_i max(q_i * max_i, q_i * min_i)) from the
ranges, or by ``q . k`` with the block's representative key (the mean of its keys per channel,
per layer: every KV head's mean key side by side). Computed in numba on the f16 bits: numpy's
float16 reductions ran at ~0.1 GB/s, which made them the slowest step of storing a block.
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


@njit(cache=True, nogil=True)
def _f16_to_f32(b: np.int32) -> np.float32:
    sign = np.float32(-1.0) if b & 0x8000 else np.float32(1.0)
    exponent = (b >> 10) & 0x1F
    mantissa = b & 0x3FF
    if exponent == 0:
        return sign * np.float32(mantissa) * np.float32(2.0 ** -24)
    if exponent == 0x1F:
        return sign * np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    return sign * np.float32(1024 + mantissa) * np.float32(2.0) ** np.float32(exponent - 25)


@njit(cache=True, nogil=True)
def _mean(bits: np.ndarray, out: np.ndarray) -> None:
    # Non-finite values are skipped (a channel with nothing else gets 0).
    n, width = bits.shape
    total = np.zeros(width, dtype=np.float64)
    count = np.zeros(width, dtype=np.int64)
    for t in range(n):
        for c in range(width):
            b = np.int32(bits[t, c])
            if b & 0x7C00 == 0x7C00:
                continue
            total[c] += _f16_to_f32(b)
            count[c] += 1
    for c in range(width):
        out[c] = total[c] / count[c] if count[c] else 0.0


def key_mean(bits: np.ndarray) -> np.ndarray:
    """Per-channel mean of f16 rows given as uint16 bits (n_tokens, width), float32."""
    out = np.empty(bits.shape[1], dtype=np.float32)
    _mean(np.ascontiguousarray(bits), out)
    return out


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
    means = np.empty((len(layers), 1, width), dtype=np.float32)
    for i, layer in enumerate(layers):
        bits = layer.k.rows.view(np.uint16)
        bounds[i, 0], bounds[i, 1] = key_min_max(bits)
        means[i, 0] = key_mean(bits)
    return KeySummary(bounds.view(np.float16), means.astype(np.float16))

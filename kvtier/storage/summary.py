"""Per-block key summaries: the per-channel minimum and maximum of K, and the mean key.

Stored with every f16 block in every tier, they let a query-aware working set score a block
without reading its payload: by Quest's bound (sum_i max(q_i * max_i, q_i * min_i)) from the
ranges, or by ``q . k`` with the block's representative key (the mean of its keys per channel,
per layer: every KV head's mean key side by side). Computed in one numba pass over the f16 bits,
values looked up in a table of all 65,536: numpy's float16 reductions ran at ~0.1 GB/s, and a pass
each for the range and the mean, decoding every value bit by bit, cost 53 ms of an 8B block's
58.6 ms on the engine thread (a working set's store).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from kvtier.storage import workers
from kvtier.storage.catalog import KeySummary
from kvtier.storage.records import LayerKV


_F32_OF_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
"""Every f16 bit pattern's float32 value (exact): the kernels look values up instead of decoding
them bit by bit."""


@njit(cache=True, nogil=True)
def _range_and_sum(bits: np.ndarray, table: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   total: np.ndarray, count: np.ndarray) -> None:
    # Branch-free selects over a row at a time, so the compiler vectorizes the channels: the
    # smallest and largest value per channel (NaN compares false and is skipped; the first row
    # holding a value wins a tie, so -0 and +0 keep the first) and the sum and count of the
    # finite values.
    n, width = bits.shape
    for t in range(n):
        for c in range(width):
            x = table[bits[t, c]]
            lo[c] = x if x < lo[c] else lo[c]
            hi[c] = x if x > hi[c] else hi[c]
            finite = abs(x) < np.inf
            total[c] += x if finite else 0.0
            count[c] += 1 if finite else 0


def _summarize(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel (min, max) as f16 bits (NaN bits where a channel holds nothing but NaN) and
    the mean of the finite values (float32; 0 where there are none) of f16 rows given as uint16
    bits (n_tokens, width)."""
    width = bits.shape[1]
    lo = np.full(width, np.inf, dtype=np.float32)
    hi = np.full(width, -np.inf, dtype=np.float32)
    total = np.zeros(width, dtype=np.float64)
    count = np.zeros(width, dtype=np.int64)
    _range_and_sum(np.ascontiguousarray(bits), _F32_OF_F16, lo, hi, total, count)
    empty = lo > hi                        # only NaN: neither bound moved
    lo_bits = lo.astype(np.float16).view(np.uint16)
    hi_bits = hi.astype(np.float16).view(np.uint16)
    lo_bits[empty] = hi_bits[empty] = 0x7E00
    mean = np.divide(total, count, out=np.zeros(width), where=count > 0).astype(np.float32)
    return lo_bits, hi_bits, mean


def key_mean(bits: np.ndarray) -> np.ndarray:
    """Per-channel mean of f16 rows given as uint16 bits (n_tokens, width), float32; non-finite
    values are skipped (a channel with nothing else gets 0)."""
    return _summarize(bits)[2]


def key_min_max(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) of f16 rows given as uint16 bits (n_tokens, width), as f16 bits.

    NaNs are ignored; a channel with nothing but NaN gets NaN bits for both."""
    lo, hi, _ = _summarize(bits)
    return lo, hi


def key_summary(layers: Sequence[LayerKV], pool: workers.Workers = workers.ENGINE
                ) -> KeySummary | None:
    """A block's key summary over all its layers; None unless every layer's K is f16 rows of one
    width (llama.cpp's quantized caches, or layers of several widths, are not summarized)."""
    if not layers or any(not layer.k.is_f16 or layer.n_tokens == 0 for layer in layers):
        return None
    width = layers[0].k.rows.shape[1] // 2
    if any(layer.k.rows.shape[1] != 2 * width for layer in layers):
        return None
    # The layers in parts on the worker threads (the kernel holds no GIL): an 8B block's 32
    # layers took 20-29 ms on one core of an H200 host.
    parts = pool.map_in_parts(lambda layer: _summarize(layer.k.rows.view(np.uint16)), layers)
    bounds = np.stack([np.stack([lo, hi]) for lo, hi, _ in parts])
    means = np.stack([mean[None] for _, _, mean in parts])
    return KeySummary(bounds.view(np.float16), means.astype(np.float16))

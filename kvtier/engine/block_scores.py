"""How much attention each stored block would get from the current queries, from its summary alone.

For a query ``q`` and a block whose keys have per-channel minimum ``lo`` and maximum ``hi``, Quest's
bound ``sum_i max(q_i * hi_i, q_i * lo_i)`` is at least the largest dot product ``q . k`` over the
block's keys, so a block whose bound is low cannot hold a key that the query attends to strongly.
Per query head and sampled layer, the bounds (scaled by ``1/sqrt(head_dim)``) become a share of
attention by a softmax over the blocks; a block's score is its mean share over heads, layers and
query rows, so the scores of all blocks sum to 1. Under grouped-query attention a query head reads
the summary of the KV head it shares.

:func:`representative_scores` does the same with the largest ``q . k`` over a few representative
keys of each block (its mean key) in place of the bound: a bound is as high for a block whose keys
spread wide as for one whose keys point where the query does, and running text could not tell them
apart (docs/benchmarks.md, perplexity).

Pure numeric code on plain arrays (numpy; the products run in BLAS), so tests can call it with
synthetic numbers.
"""

from __future__ import annotations

import numpy as np


def _scores(queries: np.ndarray, key_min: np.ndarray, key_max: np.ndarray) -> np.ndarray:
    # max(q*hi, q*lo) is q*hi where q > 0 and q*lo elsewhere, so the bound is
    # hi . max(q, 0) + lo . min(q, 0): two matrix products per (layer, KV head), in BLAS.
    layers, rows, heads, dim = queries.shape
    n_blocks, _, n_kv, _ = key_min.shape
    group = heads // n_kv
    # queries grouped by the KV head they read: (layer, kv, dim, rows * group)
    q = queries.reshape(layers, rows, n_kv, group, dim).transpose(0, 2, 4, 1, 3)
    q = q.reshape(layers, n_kv, dim, rows * group)
    hi = key_max.transpose(1, 2, 0, 3)       # (layer, kv, block, dim)
    lo = key_min.transpose(1, 2, 0, 3)
    bound = (hi @ np.maximum(q, 0) + lo @ np.minimum(q, 0)) * (1.0 / np.sqrt(dim))
    bound -= bound.max(axis=2, keepdims=True)
    share = np.exp(bound)
    share /= share.sum(axis=2, keepdims=True)  # softmax over blocks
    return share.sum(axis=(0, 1, 3), dtype=np.float64) / (layers * rows * heads)


def block_scores(queries: np.ndarray, key_min: np.ndarray, key_max: np.ndarray) -> np.ndarray:
    """Each block's share of the queries' attention, by Quest's bound; sums to 1.

    ``queries``: (layers, rows, heads, head_dim) float32, after RoPE. ``key_min``/``key_max``:
    (blocks, layers, kv_heads, head_dim), the per-channel range of each block's keys in the same
    layers. Heads must be a multiple of kv_heads. No blocks: an empty array.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    key_min = np.ascontiguousarray(key_min, dtype=np.float32)
    key_max = np.ascontiguousarray(key_max, dtype=np.float32)
    if queries.ndim != 4 or key_min.ndim != 4 or key_min.shape != key_max.shape:
        raise ValueError(f"queries {queries.shape} and key ranges {key_min.shape} / "
                         f"{key_max.shape} are not (layers, rows, heads, dim) and "
                         f"(blocks, layers, kv_heads, dim)")
    layers, rows, heads, dim = queries.shape
    if key_min.shape[1] != layers or key_min.shape[3] != dim or heads % key_min.shape[2]:
        raise ValueError(f"queries {queries.shape} do not match key ranges {key_min.shape}")
    if key_min.shape[0] == 0 or rows == 0:
        return np.zeros(key_min.shape[0], dtype=np.float64)
    return _scores(queries, key_min, key_max)


def representative_scores(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each block's share of the queries' attention, by the largest ``q . k`` over its
    representative keys; sums to 1.

    ``queries``: (layers, rows, heads, head_dim). ``keys``: (blocks, layers, n, kv_heads,
    head_dim), ``n`` representatives per block, layer and KV head.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if queries.ndim != 4 or keys.ndim != 5 or keys.shape[1] != queries.shape[0] or \
            keys.shape[4] != queries.shape[3] or queries.shape[2] % keys.shape[3]:
        raise ValueError(f"queries {queries.shape} do not match representative keys "
                         f"{keys.shape}")
    layers, rows, heads, dim = queries.shape
    n_blocks, _, n, n_kv, _ = keys.shape
    if n_blocks == 0 or rows == 0:
        return np.zeros(n_blocks, dtype=np.float64)
    group = heads // n_kv
    q = queries.reshape(layers, rows, n_kv, group, dim).transpose(0, 2, 4, 1, 3)
    q = q.reshape(layers, n_kv, dim, rows * group)
    k = keys.transpose(1, 3, 0, 2, 4).reshape(layers, n_kv, n_blocks * n, dim)
    logits = (k @ q).reshape(layers, n_kv, n_blocks, n, rows * group).max(axis=3)
    logits *= 1.0 / np.sqrt(dim)
    logits -= logits.max(axis=2, keepdims=True)
    share = np.exp(logits)
    share /= share.sum(axis=2, keepdims=True)
    return share.sum(axis=(0, 1, 3), dtype=np.float64) / (layers * rows * heads)

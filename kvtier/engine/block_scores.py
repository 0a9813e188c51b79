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
synthetic numbers. (Scoring the layers in parallel on worker threads was measured on an H200 host
and did not help: 11-17 ms against 15 ms for an 8B model's 32 layers at 75 blocks.)
"""

from __future__ import annotations

import numpy as np


def _grouped(queries: np.ndarray, n_kv: int) -> np.ndarray:
    """Queries grouped by the KV head they read: (layer, kv, dim, rows * group)."""
    layers, rows, heads, dim = queries.shape
    q = queries.reshape(layers, rows, n_kv, heads // n_kv, dim).transpose(0, 2, 4, 1, 3)
    return q.reshape(layers, n_kv, dim, rows * (heads // n_kv))


def _share_sums(logits: np.ndarray) -> np.ndarray:
    # logits: (layer, kv, block, rows * group), already scaled; a softmax over the blocks per
    # query row and head, summed per block over all of them.
    logits -= logits.max(axis=2, keepdims=True)
    share = np.exp(logits, out=logits)
    share /= share.sum(axis=2, keepdims=True)
    return share.sum(axis=(0, 1, 3), dtype=np.float64)


def bound_shares(queries: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """:func:`block_scores` on key ranges already laid out per (layer, KV head): ``lo`` and
    ``hi`` are (layers, kv_heads, blocks, head_dim) float32 (a slice of a larger array is fine:
    no copy is made), ``queries`` float32 (layers, rows, heads, head_dim)."""
    layers, n_kv, _, dim = lo.shape
    q = _grouped(queries, n_kv)
    # max(q*hi, q*lo) is q*hi where q > 0 and q*lo elsewhere, so the bound is
    # hi . max(q, 0) + lo . min(q, 0): two matrix products per (layer, KV head), in BLAS.
    bound = hi @ np.maximum(q, 0)
    bound += lo @ np.minimum(q, 0)
    bound *= 1.0 / np.sqrt(dim)
    return _share_sums(bound) / (layers * n_kv * q.shape[3])


def representative_shares(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """:func:`representative_scores` on representative keys laid out per (layer, KV head):
    ``keys`` (layers, kv_heads, blocks, n, head_dim) float32."""
    layers, n_kv, n_blocks, n, dim = keys.shape
    q = _grouped(queries, n_kv)
    logits = (keys.reshape(layers, n_kv, n_blocks * n, dim) @ q).reshape(
        layers, n_kv, n_blocks, n, -1).max(axis=3)
    logits *= 1.0 / np.sqrt(dim)
    return _share_sums(logits) / (layers * n_kv * q.shape[3])


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
    return bound_shares(queries, key_min.transpose(1, 2, 0, 3), key_max.transpose(1, 2, 0, 3))


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
    return representative_shares(queries, keys.transpose(1, 3, 0, 2, 4))


class SummaryStack:
    """The key summaries of a conversation's stored blocks, laid out per (layer, KV head) for
    :func:`bound_shares` and :func:`representative_shares`, and grown in place as blocks are
    stored: a selection then scores them without stacking every summary again."""

    def __init__(self, layers: int, n_kv: int, dim: int) -> None:
        self.blocks: list[int] = []
        """The conversation's block index of each row, in the order they were added."""
        self._added: set[int] = set()
        self._lo = np.empty((layers, n_kv, 0, dim), dtype=np.float32)
        self._hi = np.empty_like(self._lo)
        self._reps: np.ndarray | None = None
        """(layers, kv, capacity, n, dim) while every block added has ``n`` representatives
        (None from the first that has not)."""

    def __contains__(self, block: int) -> bool:
        return block in self._added

    def __len__(self) -> int:
        return len(self.blocks)

    def add(self, block: int, lo: np.ndarray, hi: np.ndarray, reps: np.ndarray | None) -> None:
        """Add block ``block``'s summary: ranges (layers, kv, dim), representatives (layers, n,
        kv, dim) or None."""
        j = len(self.blocks)
        if j == 0 and reps is not None:
            layers, n_kv, _, dim = self._lo.shape
            self._reps = np.empty((layers, n_kv, 0, reps.shape[1], dim), dtype=np.float32)
        if j == self._lo.shape[2]:
            self._lo, self._hi = _grown(self._lo, j), _grown(self._hi, j)
            if self._reps is not None:
                self._reps = _grown(self._reps, j)
        self._lo[:, :, j] = lo
        self._hi[:, :, j] = hi
        if self._reps is not None:
            if reps is None or reps.shape[1] != self._reps.shape[3]:
                self._reps = None
            else:
                self._reps[:, :, j] = reps.transpose(0, 2, 1, 3)
        self.blocks.append(block)
        self._added.add(block)

    def shares(self, queries: np.ndarray, by: str = "bound") -> np.ndarray:
        """Each added block's share of the queries' attention (in :attr:`blocks` order), by
        ``bound`` or, if every block has representatives, by ``keys``."""
        n = len(self.blocks)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if n == 0 or queries.shape[1] == 0:
            return np.zeros(n, dtype=np.float64)
        if by == "keys" and self._reps is not None:
            return representative_shares(queries, self._reps[:, :, :n])
        return bound_shares(queries, self._lo[:, :, :n], self._hi[:, :, :n])


def _grown(array: np.ndarray, used: int) -> np.ndarray:
    """``array`` with twice the room (16 at least) along axis 2, its first ``used`` kept."""
    shape = list(array.shape)
    shape[2] = max(16, 2 * used)
    grown = np.empty(shape, dtype=array.dtype)
    grown[:, :, :used] = array[:, :, :used]
    return grown

"""Product (vector) quantization of one KV tensor, prototyped in numpy for ``bench_compression``
(issue 13, third round).

Each token's row is cut, per head, into sub-vectors of ``d`` adjacent channels; one codebook of
``2^b`` centroids of ``d`` dims is fit by k-means to the sub-vectors of one record (one layer of a
block) -- shared by all heads and sub-vector positions, or one per head -- and each sub-vector is
stored as the ``b``-bit index of its nearest centroid: ``b / d`` bits per value plus the codebook
(f16). ``norm`` first maps each channel of the record to zero mean and unit spread (mean and scale
stored in f16, CQ's and KVQuant's per-channel normalization), so one codebook fits all channels.
Keys may be quantized before RoPE (``prerope``), as ``bench_compression``'s ``P+`` rows do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PQ:
    """``d`` channels a sub-vector, ``b`` bits a code, a codebook per record or per ``head``,
    per-channel ``norm``, keys before RoPE (``prerope``), ``iters`` Lloyd iterations from a
    k-means++ start with a fixed seed, or a ``fixed`` codebook."""

    d: int
    b: int
    per_head: bool = False
    norm: bool = False
    prerope: bool = False
    iters: int = 8
    fixed: bool = False
    """One codebook per layer and tensor, fit on the first block seen and reused for every later
    block and window (a stand-in for codebooks learned once per model): not stored per record."""

    @property
    def bits(self) -> int:
        """Bits of one code, as ``bench_compression.pack`` takes them."""
        return self.b

    def label(self) -> str:
        return (("P+" if self.prerope else "") + f"PQ d{self.d} b{self.b}"
                + (" /head" if self.per_head else "") + (" norm" if self.norm else "")
                + (" fixed" if self.fixed else ""))


HEAD_DIM = 64


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]


def kmeans(x: np.ndarray, k: int, iters: int, seed: int = 0) -> np.ndarray:
    """``k`` centroids of the rows of ``x`` (float32): k-means++ seeding, then Lloyd's
    iterations; an emptied centroid keeps its place."""
    rng = np.random.default_rng(seed)
    n = len(x)
    if n <= k:
        return np.concatenate([x, np.repeat(x[:1], k - n, 0)])
    c = np.empty((k, x.shape[1]), np.float32)
    c[0] = x[rng.integers(n)]
    best = ((x - c[0]) ** 2).sum(1)
    for i in range(1, k):
        total = best.sum()
        j = rng.choice(n, p=best / total) if total > 0 else rng.integers(n)
        c[i] = x[j]
        best = np.minimum(best, ((x - c[i]) ** 2).sum(1))
    for _ in range(iters):
        a = _sq_dist(x, c).argmin(1)
        w = np.bincount(a, minlength=k)
        for j in range(x.shape[1]):
            s = np.bincount(a, x[:, j], minlength=k)
            c[:, j] = np.where(w > 0, s / np.maximum(w, 1), c[:, j])
    return c


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


@dataclass(frozen=True)
class Encoded:
    """One record's PQ form: codes (tokens, sub-vectors) as uint16, the codebooks (heads or 1,
    2^b, d) and the per-channel mean and scale (or None), all f16 values held as float32."""

    codes: np.ndarray
    books: np.ndarray
    mean: np.ndarray | None
    scale: np.ndarray | None

    def param_bytes(self) -> int:
        return 2 * self.books.size + (4 * self.mean.size if self.mean is not None else 0)


def normalize(x: np.ndarray, q: PQ
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x to quantize, per-channel mean, scale): the identity unless ``q.norm``."""
    if not q.norm:
        return x, None, None
    mean = f16(x.mean(0))
    scale = f16(np.maximum(x.std(0), 1e-3))
    return (x - mean) / scale, mean, scale


def _subvectors(x: np.ndarray, q: PQ) -> np.ndarray:
    n, w = x.shape
    return x.reshape(n, w // HEAD_DIM, HEAD_DIM // q.d, q.d)


def fit(x: np.ndarray, q: PQ) -> np.ndarray:
    """The record's codebooks (1 or heads, 2^b, d), f16 values as float32, for normalized
    ``x``: the k-means that a codec with codebooks per record pays on every encode."""
    sub = _subvectors(x, q)
    if q.per_head:
        return np.stack([f16(kmeans(sub[:, h].reshape(-1, q.d), 2 ** q.b, q.iters))
                         for h in range(sub.shape[1])])
    return f16(kmeans(sub.reshape(-1, q.d), 2 ** q.b, q.iters))[None]


def assign(x: np.ndarray, q: PQ, books: np.ndarray) -> np.ndarray:
    """Codes (tokens, sub-vectors) as uint16: each sub-vector's nearest centroid; all the
    encode costs when the codebooks are given (learned once per model)."""
    sub = _subvectors(x, q)
    n, heads = sub.shape[:2]
    if q.per_head:
        codes = np.stack([_sq_dist(sub[:, h].reshape(-1, q.d), books[h]).argmin(1)
                          .reshape(n, -1) for h in range(heads)], 1)
    else:
        codes = _sq_dist(sub.reshape(-1, q.d), books[0]).argmin(1)
    return codes.reshape(n, -1).astype(np.uint16)


def encode(x: np.ndarray, q: PQ) -> Encoded:
    """``x`` (tokens, heads x 64) float32, already before RoPE if ``q.prerope``."""
    z, mean, scale = normalize(x, q)
    books = fit(z, q)
    return Encoded(assign(z, q, books), books, mean, scale)


def decode(e: Encoded, q: PQ) -> np.ndarray:
    n = len(e.codes)
    heads = e.books.shape[0] if q.per_head else None
    codes = e.codes.reshape(n, heads or -1, HEAD_DIM // q.d) if heads else e.codes
    if heads:
        x = e.books[np.arange(heads)[None, :, None], codes]
    else:
        x = e.books[0][codes]
    x = x.reshape(n, -1)
    if e.mean is not None:
        x = x * e.scale + e.mean
    return x

"""Quantizers for KV blocks: f16 bit patterns in, a payload out, and back (numba, no GIL held).

A payload's layout is fully determined by ``(n_tokens, width, encoding, grouping, group_size)``;
it carries no header of its own. All multi-byte fields are little-endian.

- ``F16``: the f16 bits, row-major, 2 bytes per value (``grouping`` and ``group_size`` are ignored).
- ``Q8`` / ``Q4`` / ``Q6`` (asymmetric, ``levels`` = 255 / 15 / 63)::

      [min: f16 x n_groups][scale: f16 x n_groups][codes]

  ``PER_TOKEN``: group ``t * ceil(width / g) + j`` holds row ``t``, columns ``[j*g, (j+1)*g)``.
  ``PER_CHANNEL``: group ``i * width + c`` holds column ``c``, rows ``[i*g, (i+1)*g)``.
  The last group of a row (or column) is partial when ``g`` does not divide it.
  Codes are row-major, one row after the other. Q8: one byte per value. Q4: ``h = ceil(width/2)``
  bytes per row; byte ``j`` holds column ``j`` in its low nibble and column ``j + h`` in its high
  nibble (0 when ``j + h == width``), the split-halves order of ggml's Q4_0 blocks, which packs
  and unpacks with contiguous vector loads. Q6: ``3 * q`` bytes per row, ``q = ceil(width/4)``,
  column ``c`` in quarter ``c // q`` at ``c % q``: two planes of low nibbles (quarters 0 | 2 << 4,
  then 1 | 3 << 4) and a plane of the top two bits (quarter ``k`` at bit ``2k``).

  ``min`` is the group's smallest finite value (exact: it is an f16 already); ``scale`` is
  ``(max - min) / levels`` computed in f32 and rounded *up* to the next f16, so every code fits and
  ``|x - x_hat| <= scale / 2`` (plus the final rounding to f16). Encoding picks
  ``code = floor((x - min) * (1 / scale) + 0.5)`` clamped to ``[0, levels]``; decoding computes
  ``x_hat = min + code * scale`` in f32, caps it at 65504 and rounds it to the nearest-even f16.

  Non-finite inputs never reach the arithmetic: they are left out of the group's range; ``+inf``
  encodes as code ``levels`` (the group's maximum), ``-inf`` and NaN as code 0 (the minimum). A
  group with no finite value decodes to zeros; an all-equal group has scale 0 and decodes exactly.

numba has no float16 type. The kernels convert f16 <-> f32 with integer bit arithmetic (exact;
tested against numpy's casts on every f16 pattern): unlike lookups in a 65,536-entry table, it
vectorizes, which made the per-group parameter pass 3.3x faster; see docs/quantization.md.
"""

from __future__ import annotations

import sys
import threading
from enum import IntEnum

import numba
import numpy as np
from numba import njit, prange
from numpy.lib.stride_tricks import as_strided

from kvtier.errors import BlockCorrupt

if sys.byteorder != "little":
    raise ImportError("kvtier's payloads are little-endian; this machine is not")


class Encoding(IntEnum):
    F16 = 0
    """Raw f16 bits, a bit-exact copy."""
    Q8 = 1
    """8-bit codes, asymmetric (min + scale) per group."""
    Q4 = 2
    """4-bit codes, asymmetric (min + scale) per group, two per byte."""
    Q6 = 3
    """6-bit codes, asymmetric (min + scale) per group, as a 4-bit and a 2-bit plane per row."""


class Grouping(IntEnum):
    PER_TOKEN = 0
    """A group is ``group_size`` consecutive values of one row (one token)."""
    PER_CHANNEL = 1
    """A group is ``group_size`` consecutive tokens of one channel (column)."""


KEY_GROUPING = Grouping.PER_CHANNEL
"""Keys have outlier channels: per-channel groups keep them from inflating every token's scale."""
VALUE_GROUPING = Grouping.PER_TOKEN
"""Values per token, as KIVI does: each token's error stays in that token's row of V."""
DEFAULT_GROUP_SIZE = 32
"""Values per group; docs/quantization.md has the error and size measurements behind it."""
PARALLEL_MIN_VALUES = 1 << 15
"""Blocks smaller than this run on one thread even when more are allowed: splitting a block of
128 x 192 values was a wash or a loss, 256 x 192 gained 1.2-2.9x (docs/quantization.md)."""

_LEVELS = (0, 255, 15, 63)
_F16_MAX = np.float32(65504.0)


# ---------------------------------------------------------------------------------------------
# Element helpers. Explicit 32-bit types matter: numba widens integer arithmetic to 64 bits,
# which halves the vector width (a 64-bit min/max pass ran 5x slower than the 32-bit one).


@njit(cache=True, nogil=True)
def _f32_to_f16_finite(x: np.float32) -> np.uint16:
    """Round-to-nearest-even f32 -> f16 bits for |x| <= 65504 (no inf or NaN handling)."""
    u = np.float32(x).view(np.int32)
    a = np.int32(u & np.int32(0x7FFFFFFF))
    sign = np.int32((u >> np.int32(16)) & np.int32(0x8000))
    # Normal results: rebias the exponent; adding 0xfff plus the kept lsb rounds to nearest even,
    # and a carry out of the mantissa correctly bumps the exponent.
    normal = np.int32(np.int32(a - np.int32(0x37FFF001) + ((a >> np.int32(13)) & np.int32(1)))
                      >> np.int32(13))
    # Subnormal results: adding 0.5 aligns the 10 mantissa bits at the bottom (rounded by the FPU).
    aligned = np.int32(a).view(np.float32) + np.float32(0.5)
    small = np.int32(np.float32(aligned).view(np.int32) - np.int32(0x3F000000))
    h = normal if a >= np.int32(0x38800000) else small
    return np.uint16(h | sign)


@njit(cache=True, nogil=True)
def _f32_to_f16(x: np.float32) -> np.uint16:
    """Round-to-nearest-even f32 -> f16 bits, overflow to inf, NaN to a quiet NaN."""
    u = np.float32(x).view(np.int32)
    a = np.int32(u & np.int32(0x7FFFFFFF))
    special = np.int32(0x7C00) if a <= np.int32(0x7F800000) else np.int32(
        np.int32(0x7E00) | ((a >> np.int32(13)) & np.int32(0x3FF)))
    special = np.int32(special | ((u >> np.int32(16)) & np.int32(0x8000)))
    return np.uint16(special) if a >= np.int32(0x47800000) else _f32_to_f16_finite(x)


@njit(cache=True, nogil=True)
def _f16_to_f32(bits: np.uint16) -> np.float32:
    """Exact f16 bits -> f32 in integer arithmetic."""
    h = np.int32(bits)
    o = np.int32((h & np.int32(0x7FFF)) << np.int32(13))  # exponent and mantissa, in place
    exp = np.int32(o & np.int32(0x0F800000))
    o = np.int32(o + np.int32(0x38000000))  # rebias the exponent: 127 - 15
    o = np.int32(o + np.int32(0x38000000)) if exp == np.int32(0x0F800000) else o  # inf / NaN
    # Zero and subnormals: make a normal number 2^-14 too large, then subtract 2^-14 (exact).
    renorm = np.int32(o + np.int32(0x00800000)).view(np.float32) - np.float32(6.103515625e-05)
    o = np.float32(renorm).view(np.int32) if exp == np.int32(0) else o
    return np.int32(o | ((h & np.int32(0x8000)) << np.int32(16))).view(np.float32)


@njit(cache=True, nogil=True)
def _order_key(bits: np.uint16) -> np.int32:
    """f16 bits -> an integer with the same order as the values, so min/max are integer ops:
    ``b ^ 0x8000`` for positive values, ``b ^ 0xFFFF`` for negative ones. Arithmetic, not a
    select: where LLVM leaves a loop scalar, a select became a branch that mispredicted on every
    other value (30x slower)."""
    b = np.int32(bits)
    return np.int32(b ^ (np.int32(np.int32(b >> np.int32(15)) * np.int32(0x7FFF))
                         | np.int32(0x8000)))


@njit(cache=True, nogil=True)
def _is_finite(bits: np.uint16) -> bool:
    return (np.int32(bits) & np.int32(0x7C00)) != np.int32(0x7C00)


@njit(cache=True, nogil=True)
def _range_has_non_finite(kmin: np.int32, kmax: np.int32) -> bool:
    """Keys of -inf/NaN sort below 0x0400 and of +inf/NaN above 0xFBFF: a range without either
    end there holds only finite values (the common case, so checking per value is skipped)."""
    return kmin < np.int32(0x0400) or kmax > np.int32(0xFBFF)


@njit(cache=True, nogil=True)
def _key_bits(k: np.int32) -> np.int32:
    """The inverse of ``_order_key``."""
    negative = np.int32(np.int32(k >> np.int32(15)) ^ np.int32(1))
    return np.int32(k ^ (np.int32(negative * np.int32(0x7FFF)) | np.int32(0x8000)))


@njit(cache=True, nogil=True)
def _quantize(bits: np.uint16, lo: np.float32, inv: np.float32, top: np.float32) -> np.uint8:
    q = (_f16_to_f32(bits) - lo) * inv + np.float32(0.5)
    q = q if q > 0 else np.float32(0.0)  # also sends NaN to code 0
    q = q if q < top else top
    return np.uint8(np.int32(q))


@njit(cache=True, nogil=True)
def _dequantize(code: np.uint8, lo: np.float32, scale: np.float32) -> np.uint16:
    v = lo + np.float32(code) * scale
    return _f32_to_f16_finite(v if v < _F16_MAX else _F16_MAX)


# Helpers that take arrays are inlined by numba itself ("always"): a call that passes arrays
# costs reference-count updates, which made the kernels 2.5x slower.


@njit(cache=True, nogil=True, inline="always")
def _params(kmin: np.ndarray, kmax: np.ndarray, levels: int, mins: np.ndarray,
            scales: np.ndarray, lo: np.ndarray, inv: np.ndarray) -> None:
    """Each group's stored (min, scale) bits from its finite range keys, and its (min, 1/scale)."""
    top = np.float32(levels)
    for g in range(mins.size):
        empty = kmin[g] > kmax[g]
        min_bits = np.int32(0) if empty else _key_bits(kmin[g])
        max_bits = np.int32(0) if empty else _key_bits(kmax[g])
        low = _f16_to_f32(min_bits)
        step = (_f16_to_f32(max_bits) - low) / top
        scale_bits = np.int32(_f32_to_f16_finite(step))
        scale_bits = np.int32(scale_bits + 1) if _f16_to_f32(scale_bits) < step else scale_bits
        scale = _f16_to_f32(scale_bits)
        mins[g] = min_bits
        scales[g] = scale_bits
        lo[g] = low
        inv[g] = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)


@njit(cache=True, nogil=True, inline="always")
def _pack_q4(pairs: np.ndarray, body: np.ndarray, t: int) -> None:
    """Row ``t`` of Q4 codes from ``pairs`` (2, ceil(width/2)): low nibbles, then high ones."""
    for j in range(pairs.shape[1]):
        body[t, j] = pairs[0, j] | (pairs[1, j] << 4)


@njit(cache=True, nogil=True, inline="always")
def _unpack_q4(body: np.ndarray, t: int, pairs: np.ndarray) -> None:
    for j in range(pairs.shape[1]):
        pairs[0, j] = body[t, j] & 0xF
        pairs[1, j] = body[t, j] >> 4


@njit(cache=True, nogil=True, inline="always")
def _pack_q6(quads: np.ndarray, body: np.ndarray, t: int) -> None:
    """Row ``t`` of Q6 codes from ``quads`` (4, q = ceil(width/4)), code ``c`` at
    ``(c // q, c % q)``: bytes ``[0, q)`` hold the low nibbles of quarters 0 (low) and 2 (high), ``[q, 2q)`` those of
    quarters 1 and 3, ``[2q, 3q)`` the top two bits of quarter ``k`` at bits ``2k``."""
    q = quads.shape[1]
    for j in range(q):
        body[t, j] = (quads[0, j] & 0xF) | ((quads[2, j] & 0xF) << 4)
    for j in range(q):
        body[t, q + j] = (quads[1, j] & 0xF) | ((quads[3, j] & 0xF) << 4)
    for j in range(q):
        body[t, 2 * q + j] = (quads[0, j] >> 4) | ((quads[1, j] >> 4) << 2) \
            | ((quads[2, j] >> 4) << 4) | ((quads[3, j] >> 4) << 6)


@njit(cache=True, nogil=True, inline="always")
def _unpack_q6(body: np.ndarray, t: int, quads: np.ndarray) -> None:
    q = quads.shape[1]
    for j in range(q):
        lo = body[t, j]
        mid = body[t, q + j]
        hi = body[t, 2 * q + j]
        quads[0, j] = (lo & 0xF) | ((hi & 0x3) << 4)
        quads[1, j] = (mid & 0xF) | (((hi >> 2) & 0x3) << 4)
        quads[2, j] = (lo >> 4) | (((hi >> 4) & 0x3) << 4)
        quads[3, j] = (mid >> 4) | ((hi >> 6) << 4)


@njit(cache=True, nogil=True)
def _scratch(levels: int, width: int) -> np.ndarray:
    """The zeroed row of codes Q4 (2, ceil(w/2)) and Q6 (4, ceil(w/4)) pack from and unpack to."""
    if levels == 63:
        return np.zeros((4, (width + 3) // 4), np.uint8)
    return np.zeros((2, (width + 1) // 2), np.uint8)


@njit(cache=True, nogil=True, inline="always")
def _pack(scratch: np.ndarray, body: np.ndarray, t: int, levels: int) -> None:
    if levels == 63:
        _pack_q6(scratch, body, t)
    else:
        _pack_q4(scratch, body, t)


@njit(cache=True, nogil=True, inline="always")
def _unpack(body: np.ndarray, t: int, scratch: np.ndarray, levels: int) -> None:
    if levels == 63:
        _unpack_q6(body, t, scratch)
    else:
        _unpack_q4(body, t, scratch)


# ---------------------------------------------------------------------------------------------
# Kernels. Each processes a range of "units" (rows for F16 and PER_TOKEN, blocks of group_size
# rows for PER_CHANNEL) so that the parallel entry points split the same code across threads.
#
# Loops index 2-D arrays with counters that start at 0, or with unsigned ones: numba's
# negative-index fix-up on any other computed index blocks vectorization (a row copy ran 17x,
# a per-group min/max 20x slower). Arrays must also be C-contiguous for stores to vectorize
# (decoding into a strided view ran 3x slower), so a view with a row stride arrives as two
# C-contiguous arrays over the same memory: ``main``, its first ``n_main`` rows at the full row
# stride (the gaps are never touched), and ``last``, its final row. Q8 codes go straight into the
# payload; Q4 codes go through a scratch row of (low, high) halves whose padding nibble stays 0.

_TILE_ROWS = 16
"""Rows whose per-token group ranges are gathered before their parameters are computed at once."""


@njit(cache=True, nogil=True)
def _copy_rows(src: np.ndarray, src_last: np.ndarray, n_src: int, dst: np.ndarray,
               dst_last: np.ndarray, n_dst: int, width: int, r0: int, r1: int) -> None:
    for t in range(r0, r1):
        s = src if t < n_src else src_last
        st = t if t < n_src else t - n_src
        d = dst if t < n_dst else dst_last
        dt = t if t < n_dst else t - n_dst
        for c in range(width):
            d[dt, c] = s[st, c]


@njit(cache=True, nogil=True)
def _encode_units(src: np.ndarray, src_last: np.ndarray, n_src: int, n_tokens: int, width: int,
                  levels: int, per_channel: bool, gs: int, n_groups: int, payload: np.ndarray,
                  u0: int, u1: int) -> None:
    mins = payload[:2 * n_groups].view(np.uint16)
    scales = payload[2 * n_groups:4 * n_groups].view(np.uint16)
    body = payload[4 * n_groups:].reshape(n_tokens, -1)
    top = np.float32(levels)
    pairs = _scratch(levels, width)
    codes = pairs.reshape(1, pairs.size)
    if per_channel:
        kmin = np.empty(width, np.int32)
        kmax = np.empty(width, np.int32)
        lo = np.empty(width, np.float32)
        inv = np.empty(width, np.float32)
        for blk in range(u0, u1):
            t0 = blk * gs
            t1 = min(t0 + gs, n_tokens)
            for c in range(width):
                kmin[c] = 0xFFFF
                kmax[c] = 0
            for t in range(t0, t1):
                s = src if t < n_src else src_last
                st = t if t < n_src else t - n_src
                for c in range(width):
                    k = _order_key(s[st, c])
                    kmin[c] = min(kmin[c], k)
                    kmax[c] = max(kmax[c], k)
            for c in range(width):
                if _range_has_non_finite(kmin[c], kmax[c]):
                    kmin[c] = 0xFFFF
                    kmax[c] = 0
                    for t in range(t0, t1):
                        bits = src[t, c] if t < n_src else src_last[t - n_src, c]
                        if _is_finite(bits):
                            kmin[c] = min(kmin[c], _order_key(bits))
                            kmax[c] = max(kmax[c], _order_key(bits))
            _params(kmin, kmax, levels, mins[blk * width:(blk + 1) * width],
                    scales[blk * width:(blk + 1) * width], lo, inv)
            for t in range(t0, t1):
                s = src if t < n_src else src_last
                st = t if t < n_src else t - n_src
                if levels == 255:
                    for c in range(width):
                        body[t, c] = _quantize(s[st, c], lo[c], inv[c], top)
                else:
                    for c in range(width):
                        codes[0, c] = _quantize(s[st, c], lo[c], inv[c], top)
                    _pack(pairs, body, t, levels)
    else:
        n_col = (width + gs - 1) // gs
        kmin = np.empty(_TILE_ROWS * n_col, np.int32)
        kmax = np.empty(_TILE_ROWS * n_col, np.int32)
        glo = np.empty(_TILE_ROWS * n_col, np.float32)
        ginv = np.empty(_TILE_ROWS * n_col, np.float32)
        for r0 in range(u0, u1, _TILE_ROWS):
            r1 = min(r0 + _TILE_ROWS, u1)
            for t in range(r0, r1):
                s = src if t < n_src else src_last
                st = t if t < n_src else t - n_src
                for j in range(n_col):
                    c0 = np.uint64(j * gs)
                    c1 = np.uint64(min(j * gs + gs, width))
                    gmin = np.int32(0xFFFF)
                    gmax = np.int32(0)
                    for c in range(c0, c1):
                        k = _order_key(s[st, c])
                        gmin = min(gmin, k)
                        gmax = max(gmax, k)
                    if _range_has_non_finite(gmin, gmax):
                        gmin = np.int32(0xFFFF)
                        gmax = np.int32(0)
                        for c in range(c0, c1):
                            if _is_finite(s[st, c]):
                                gmin = min(gmin, _order_key(s[st, c]))
                                gmax = max(gmax, _order_key(s[st, c]))
                    kmin[(t - r0) * n_col + j] = gmin
                    kmax[(t - r0) * n_col + j] = gmax
            _params(kmin, kmax, levels, mins[r0 * n_col:r1 * n_col],
                    scales[r0 * n_col:r1 * n_col], glo, ginv)
            for t in range(r0, r1):
                s = src if t < n_src else src_last
                st = t if t < n_src else t - n_src
                for j in range(n_col):
                    # Scalars, not glo[g] in the loop: LLVM cannot prove the stores leave
                    # glo alone, and reloading it each time kept the loop scalar.
                    low = glo[(t - r0) * n_col + j]
                    inv = ginv[(t - r0) * n_col + j]
                    c0 = np.uint64(j * gs)
                    c1 = np.uint64(min(j * gs + gs, width))
                    if levels == 255:
                        for c in range(c0, c1):
                            body[t, c] = _quantize(s[st, c], low, inv, top)
                    else:
                        for c in range(c0, c1):
                            codes[0, c] = _quantize(s[st, c], low, inv, top)
                if levels != 255:
                    _pack(pairs, body, t, levels)


@njit(cache=True, nogil=True)
def _decode_units(payload: np.ndarray, n_groups: int, levels: int, per_channel: bool, gs: int,
                  dst: np.ndarray, dst_last: np.ndarray, n_dst: int, n_tokens: int, width: int,
                  u0: int, u1: int) -> None:
    mins = payload[:2 * n_groups].view(np.uint16)
    scales = payload[2 * n_groups:4 * n_groups].view(np.uint16)
    body = payload[4 * n_groups:].reshape(n_tokens, -1)
    pairs = _scratch(levels, width)
    codes = pairs.reshape(1, pairs.size)
    if per_channel:
        lo = np.empty(width, np.float32)
        scale = np.empty(width, np.float32)
        for blk in range(u0, u1):
            block_mins = mins[blk * width:(blk + 1) * width]
            block_scales = scales[blk * width:(blk + 1) * width]
            for c in range(width):
                lo[c] = _f16_to_f32(block_mins[c])
                scale[c] = _f16_to_f32(block_scales[c])
            for t in range(blk * gs, min(blk * gs + gs, n_tokens)):
                d = dst if t < n_dst else dst_last
                dt = t if t < n_dst else t - n_dst
                if levels == 255:
                    for c in range(width):
                        d[dt, c] = _dequantize(body[t, c], lo[c], scale[c])
                else:
                    _unpack(body, t, pairs, levels)
                    for c in range(width):
                        d[dt, c] = _dequantize(codes[0, c], lo[c], scale[c])
    else:
        n_col = (width + gs - 1) // gs
        for t in range(u0, u1):
            d = dst if t < n_dst else dst_last
            dt = t if t < n_dst else t - n_dst
            if levels != 255:
                _unpack(body, t, pairs, levels)
            for j in range(n_col):
                g = t * n_col + j
                glo = _f16_to_f32(mins[g])
                gscale = _f16_to_f32(scales[g])
                c0 = np.uint64(j * gs)
                c1 = np.uint64(min(j * gs + gs, width))
                if levels == 255:
                    for c in range(c0, c1):
                        d[dt, c] = _dequantize(body[t, c], glo, gscale)
                else:
                    for c in range(c0, c1):
                        d[dt, c] = _dequantize(codes[0, c], glo, gscale)


@njit(cache=True, nogil=True, parallel=True)
def _copy_rows_parallel(src: np.ndarray, src_last: np.ndarray, n_src: int, dst: np.ndarray,
                        dst_last: np.ndarray, n_dst: int, width: int, n_units: int,
                        n_chunks: int) -> None:
    for k in prange(n_chunks):
        _copy_rows(src, src_last, n_src, dst, dst_last, n_dst, width,
                   k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=True, nogil=True, parallel=True)
def _encode_parallel(src: np.ndarray, src_last: np.ndarray, n_src: int, n_tokens: int,
                     width: int, levels: int, per_channel: bool, gs: int, n_groups: int,
                     payload: np.ndarray, n_units: int, n_chunks: int) -> None:
    for k in prange(n_chunks):
        _encode_units(src, src_last, n_src, n_tokens, width, levels, per_channel, gs, n_groups,
                      payload, k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=True, nogil=True, parallel=True)
def _decode_parallel(payload: np.ndarray, n_groups: int, levels: int, per_channel: bool,
                     gs: int, dst: np.ndarray, dst_last: np.ndarray, n_dst: int, n_tokens: int,
                     width: int, n_units: int, n_chunks: int) -> None:
    for k in prange(n_chunks):
        _decode_units(payload, n_groups, levels, per_channel, gs, dst, dst_last, n_dst, n_tokens,
                      width, k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=True, nogil=True)
def _f32_to_f16_array(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = _f32_to_f16(x[i])


@njit(cache=True, nogil=True)
def _f16_to_f32_array(bits: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.size):
        out[i] = _f16_to_f32(bits[i])


# ---------------------------------------------------------------------------------------------
# Python entry points

_threads = 1
# One thread by default: llama.cpp keeps every core busy while it decodes, and a parallel kernel
# waits for its slowest thread; on a loaded 2-core machine one 256-token call then took
# milliseconds instead of tens of microseconds. The server gets parallelism from its own worker
# threads instead (every kernel releases the GIL).
# One parallel kernel at a time: it already uses every allowed core, and numba's workqueue
# threading layer (its fallback without OpenMP or TBB) aborts the process when two threads
# launch parallel kernels at once.
_parallel_lock = threading.Lock()


def set_threads(n: int) -> None:
    """Threads one large encode or decode may use (default 1: the single-threaded kernels)."""
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n}")
    global _threads
    _threads = n


def float32_to_float16_bits(x: np.ndarray) -> np.ndarray:
    """f16 bits (uint16) of float32 values, rounded to nearest even, as the kernels compute them."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(src.shape, np.uint16)
    _f32_to_f16_array(src.reshape(-1), out.reshape(-1))
    return out


def float16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of f16 bit patterns (uint16), as the kernels compute them."""
    src = np.ascontiguousarray(bits, dtype=np.uint16)
    out = np.empty(src.shape, np.float32)
    _f16_to_f32_array(src.reshape(-1), out.reshape(-1))
    return out


def code_bytes(width: int, encoding: int) -> int:
    """Bytes of one row's codes in a quantized encoding."""
    return width if encoding == Encoding.Q8 else (width + 1) // 2 if encoding == Encoding.Q4 \
        else 3 * ((width + 3) // 4)


_ENCODINGS = {e: e for e in Encoding}  # IntEnum members hash like their ints: 1 finds Q8
_GROUPINGS = {g: g for g in Grouping}


def _enum(table: dict, value: int, name: str):
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {name} {value!r}") from None


def _layout(n_tokens: int, width: int, encoding: Encoding, grouping: Grouping,
            group_size: int) -> tuple[int, int]:
    """(groups, payload bytes) of a block."""
    if n_tokens < 1 or width < 1:
        raise ValueError(f"empty block ({n_tokens} x {width})")
    if encoding == Encoding.F16:
        return 0, 2 * n_tokens * width
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if grouping == Grouping.PER_CHANNEL:
        n_groups = -(-n_tokens // group_size) * width
    else:
        n_groups = n_tokens * -(-width // group_size)
    return n_groups, 4 * n_groups + n_tokens * code_bytes(width, int(encoding))


def encoded_nbytes(n_tokens: int, width: int, encoding: Encoding, grouping: Grouping,
                   group_size: int) -> int:
    """Bytes of the payload of a (n_tokens, width) block."""
    return _layout(n_tokens, width, _enum(_ENCODINGS, encoding, "encoding"),
                   _enum(_GROUPINGS, grouping, "grouping"), group_size)[1]


def _row_views(a: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``a`` as (main, last, n_main): C-contiguous arrays over its memory (see the kernels)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint16 or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D uint16 array of f16 bits")
    n_tokens, width = a.shape
    if a.flags.c_contiguous:
        return a, a, n_tokens
    if a.strides[1] != 2 or a.strides[0] < 2 * width or a.strides[0] % 2:
        raise ValueError(f"{name} needs contiguous, non-overlapping rows, strides {a.strides}")
    stride = a.strides[0] // 2
    # From the first element of row 0 to the last of the last row: never beyond `a`'s memory.
    flat = as_strided(a, shape=((n_tokens - 1) * stride + width,), strides=(2,))
    return (flat[:(n_tokens - 1) * stride].reshape(n_tokens - 1, stride),
            flat[(n_tokens - 1) * stride:].reshape(1, width), n_tokens - 1)


def _run(serial, parallel, args: tuple, n_values: int, n_units: int) -> None:
    """Run a kernel over all units, split across threads when the block is large enough."""
    if _threads < 2 or n_values < PARALLEL_MIN_VALUES or n_units < 2:
        serial(*args, 0, n_units)
        return
    with _parallel_lock:
        numba.set_num_threads(_threads)
        parallel(*args, n_units, min(_threads, n_units))


def encode(bits: np.ndarray, encoding: Encoding, grouping: Grouping,
           group_size: int) -> np.ndarray:
    """Encode a (n_tokens, width) uint16 array of f16 bits (rows contiguous; a view is fine).

    Returns a new 1-D uint8 payload of ``encoded_nbytes(...)`` bytes.
    """
    encoding = _enum(_ENCODINGS, encoding, "encoding")
    grouping = _enum(_GROUPINGS, grouping, "grouping")
    src, src_last, n_src = _row_views(bits, "bits")
    n_tokens, width = bits.shape
    n_groups, nbytes = _layout(n_tokens, width, encoding, grouping, group_size)
    out = np.empty(nbytes, np.uint8)
    if encoding == Encoding.F16:
        dst = out.view(np.uint16).reshape(n_tokens, width)
        _run(_copy_rows, _copy_rows_parallel, (src, src_last, n_src, dst, dst, n_tokens, width),
             n_tokens * width, n_tokens)
        return out
    per_channel = grouping == Grouping.PER_CHANNEL
    _run(_encode_units, _encode_parallel,
         (src, src_last, n_src, n_tokens, width, _LEVELS[encoding], per_channel, group_size,
          n_groups, out),
         n_tokens * width, -(-n_tokens // group_size) if per_channel else n_tokens)
    return out


def _payload_array(payload: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1 or not payload.flags.c_contiguous:
            raise ValueError("a payload array must be 1-D contiguous uint8")
        return payload
    return np.frombuffer(payload, dtype=np.uint8)


def decode_into(payload: bytes | bytearray | memoryview | np.ndarray, out: np.ndarray,
                encoding: Encoding, grouping: Grouping, group_size: int) -> None:
    """Decode into ``out``: a (n_tokens, width) uint16 array, or a view of one with contiguous rows.

    Only ``out``'s own elements are written. A payload of the wrong length for ``out``'s shape
    raises :class:`BlockCorrupt`.
    """
    encoding = _enum(_ENCODINGS, encoding, "encoding")
    grouping = _enum(_GROUPINGS, grouping, "grouping")
    data = _payload_array(payload)
    dst, dst_last, n_dst = _row_views(out, "out")
    n_tokens, width = out.shape
    n_groups, nbytes = _layout(n_tokens, width, encoding, grouping, group_size)
    if data.size != nbytes:
        raise BlockCorrupt(f"{encoding.name} payload of {data.size} bytes, a {n_tokens}x{width} "
                           f"block needs {nbytes}")
    if encoding == Encoding.F16:
        src = data.view(np.uint16).reshape(n_tokens, width)
        _run(_copy_rows, _copy_rows_parallel, (src, src, n_tokens, dst, dst_last, n_dst, width),
             n_tokens * width, n_tokens)
        return
    per_channel = grouping == Grouping.PER_CHANNEL
    _run(_decode_units, _decode_parallel,
         (data, n_groups, _LEVELS[encoding], per_channel, group_size, dst, dst_last, n_dst,
          n_tokens, width),
         n_tokens * width, -(-n_tokens // group_size) if per_channel else n_tokens)


def decode(payload: bytes | bytearray | memoryview | np.ndarray, n_tokens: int, width: int,
           encoding: Encoding, grouping: Grouping, group_size: int) -> np.ndarray:
    """Decode a payload to a new (n_tokens, width) uint16 array of f16 bits."""
    if n_tokens < 1 or width < 1:
        raise ValueError(f"empty block ({n_tokens} x {width})")
    out = np.empty((n_tokens, width), np.uint16)
    decode_into(payload, out, encoding, grouping, group_size)
    return out


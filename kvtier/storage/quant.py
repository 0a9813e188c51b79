"""Quantizers for KV blocks: f16 bit patterns in, a payload out, and back (numba, no GIL held).

A payload's layout is fully determined by ``(n_tokens, width, encoding, grouping, group_size)``;
it carries no header of its own. All multi-byte fields are little-endian.

- ``F16``: the f16 bits, row-major, 2 bytes per value (``grouping`` and ``group_size`` are ignored).
- ``Q8`` / ``Q4`` (asymmetric, ``levels`` = 255 / 15)::

      [min: f16 x n_groups][scale: f16 x n_groups][codes]

  ``PER_TOKEN``: group ``t * ceil(width / g) + j`` holds row ``t``, columns ``[j*g, (j+1)*g)``.
  ``PER_CHANNEL``: group ``i * width + c`` holds column ``c``, rows ``[i*g, (i+1)*g)``.
  The last group of a row (or column) is partial when ``g`` does not divide it.
  Codes are row-major: Q8 one byte per value; Q4 two per byte, low nibble first, each row padded
  to a whole byte (the pad nibble is 0).

  ``min`` is the group's smallest finite value (exact: it is an f16 already); ``scale`` is
  ``(max - min) / levels`` rounded *up* to the next f16, so every code fits and
  ``|x - x_hat| <= scale / 2`` (plus the final rounding to f16). Decoding computes
  ``x_hat = min + code * scale`` in f32, caps it at 65504 and rounds it to the nearest-even f16.

  Non-finite inputs never reach the arithmetic: they are left out of the group's range; ``+inf``
  encodes as the group's maximum code, ``-inf`` and NaN as code 0 (the group's minimum). A group
  with no finite value decodes to zeros. An all-equal group has scale 0 and decodes exactly.

numba has no float16, so f16 is read through a 65,536-entry float32 table and written with a
round-to-nearest-even bit conversion that matches numpy's ``astype(float16)`` for finite values.
"""

from __future__ import annotations

import threading
from enum import IntEnum

import numba
import numpy as np
from numba import njit, prange
from numpy.lib.stride_tricks import as_strided

from kvtier.errors import BlockCorrupt


class Encoding(IntEnum):
    F16 = 0
    """Raw f16 bits, a bit-exact copy."""
    Q8 = 1
    """8-bit codes, asymmetric (min + scale) per group."""
    Q4 = 2
    """4-bit codes, asymmetric (min + scale) per group, two per byte."""


class Grouping(IntEnum):
    PER_TOKEN = 0
    """A group is ``group_size`` consecutive values of one row (one token)."""
    PER_CHANNEL = 1
    """A group is ``group_size`` consecutive tokens of one channel (column)."""


KEY_GROUPING = Grouping.PER_CHANNEL
"""Keys have outlier channels: per-channel groups keep them from inflating every token's scale."""
VALUE_GROUPING = Grouping.PER_TOKEN
"""Values have no channel structure to exploit; per-token groups follow their per-token scale."""
DEFAULT_GROUP_SIZE = 32
"""Values per group; docs/quantization.md has the error and size measurements behind it."""
PARALLEL_MIN_VALUES = 1 << 15
"""Blocks smaller than this run on one thread even when more are allowed (measured crossover)."""

_LEVELS = (0, 255, 15)
_F16_MAX = np.float32(65504.0)

F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)
"""Float32 value of every f16 bit pattern: how numba code reads f16."""
F16_TO_F32.flags.writeable = False


# ---------------------------------------------------------------------------------------------
# Element helpers, inlined by LLVM. Explicit 32-bit types matter: numba widens integer arithmetic
# to 64 bits, which halves the vector width (a 64-bit min/max pass ran 5x slower than 32-bit).


@njit(cache=False, nogil=True)
def _f32_to_f16(x: np.float32) -> np.uint16:
    """Round-to-nearest-even f32 -> f16 bits, written without branches so that loops vectorize."""
    u = np.float32(x).view(np.uint32)
    a = np.uint32(u & np.uint32(0x7FFFFFFF))
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    # Normal results: rebias the exponent; adding 0xfff plus the kept lsb rounds to nearest even,
    # and a carry out of the mantissa correctly bumps the exponent (up to inf).
    normal = np.uint32(np.uint32(a - np.uint32(0x37FFF001) + ((a >> np.uint32(13)) & np.uint32(1)))
                       >> np.uint32(13))
    # Subnormal results: adding 0.5 aligns the 10 mantissa bits at the bottom (rounded by the FPU).
    aligned = np.uint32(a).view(np.float32) + np.float32(0.5)
    small = np.uint32(np.float32(aligned).view(np.uint32) - np.uint32(0x3F000000))
    h = normal if a >= np.uint32(0x38800000) else small
    h = np.uint32(0x7C00) if a >= np.uint32(0x47800000) else h
    nan = np.uint32(np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF)))
    h = nan if a > np.uint32(0x7F800000) else h
    return np.uint16(h | sign)


@njit(cache=False, nogil=True)
def _order_key(bits: np.uint16) -> np.int32:
    """f16 bits -> an integer with the same order as the values; non-finite -> ``missing``."""
    b = np.int32(bits)
    return np.int32(b ^ (np.int32(0xFFFF) if b >= np.int32(0x8000) else np.int32(0x8000)))


@njit(cache=False, nogil=True)
def _is_finite(bits: np.uint16) -> bool:
    return (np.int32(bits) & np.int32(0x7C00)) != np.int32(0x7C00)


@njit(cache=False, nogil=True)
def _key_bits(k: np.int32) -> np.int32:
    return np.int32(k ^ (np.int32(0x8000) if k >= np.int32(0x8000) else np.int32(0xFFFF)))


@njit(cache=False, nogil=True, inline="always")
def _params(lut: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, levels: int, mins: np.ndarray,
            scales: np.ndarray, lo: np.ndarray, inv: np.ndarray) -> None:
    """Each group's (min, scale) bits from its finite range keys, and its (min, 1 / scale)."""
    top = np.float32(levels)
    for g in range(kmin.size):
        empty = kmin[g] > kmax[g]
        min_bits = np.int32(0) if empty else _key_bits(kmin[g])
        max_bits = np.int32(0) if empty else _key_bits(kmax[g])
        low = lut[min_bits]
        step = (lut[max_bits] - low) / top
        scale_bits = np.int32(_f32_to_f16(step))
        scale_bits = np.int32(scale_bits + 1) if lut[scale_bits] < step else scale_bits
        scale = lut[scale_bits]
        mins[g] = min_bits
        scales[g] = scale_bits
        lo[g] = low
        inv[g] = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)


@njit(cache=False, nogil=True, inline="always")
def _quantize_row(x: np.ndarray, lo: np.ndarray, inv: np.ndarray, top: np.float32,
                  codes: np.ndarray) -> None:
    for c in range(codes.size):
        q = (x[c] - lo[c]) * inv[c] + np.float32(0.5)
        q = q if q > 0 else np.float32(0.0)  # also sends NaN to code 0
        q = q if q < top else top
        codes[c] = np.uint8(np.int32(q))


@njit(cache=False, nogil=True, inline="always")
def _dequantize_row(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray,
                    out: np.ndarray) -> None:
    for c in range(out.size):
        v = lo[c] + np.float32(codes[c]) * scale[c]
        out[c] = _f32_to_f16(v if v < _F16_MAX else _F16_MAX)


@njit(cache=False, nogil=True, inline="always")
def _store_codes(codes: np.ndarray, out: np.ndarray, levels: int) -> None:
    """One row of codes into its payload bytes ``out``."""
    if levels == 255:
        for c in range(codes.size):
            out[c] = codes[c]
    else:
        half = codes.size // 2
        for j in range(half):
            out[j] = codes[2 * j] | (codes[2 * j + 1] << 4)
        if codes.size & 1:
            out[half] = codes[codes.size - 1]


@njit(cache=False, nogil=True, inline="always")
def _load_codes(data: np.ndarray, levels: int, codes: np.ndarray) -> None:
    """One row of codes from its payload bytes ``data``."""
    if levels == 255:
        for c in range(codes.size):
            codes[c] = data[c]
    else:
        half = codes.size // 2
        for j in range(half):
            byte = data[j]
            codes[2 * j] = byte & 0xF
            codes[2 * j + 1] = byte >> 4
        if codes.size & 1:
            codes[codes.size - 1] = data[half] & 0xF


@njit(cache=False, nogil=True, inline="always")
def _expand(group_values: np.ndarray, gs: int, out: np.ndarray) -> None:
    """Per-group values of one row -> one value per column."""
    for j in range(group_values.size):
        out[j * gs:j * gs + gs] = group_values[j]


# ---------------------------------------------------------------------------------------------
# Kernels. Each processes a range of "units" (rows for F16 and PER_TOKEN, blocks of group_size
# rows for PER_CHANNEL) so that the parallel entry points split the same code across threads.
# Rows arrive as flat arrays plus a row stride (views into larger buffers work). Inner loops run
# over whole row slices: numba's negative-index check on computed flat indices blocks
# vectorization (a row copy ran 17x slower that way), and short per-group loops cost more in
# loop overhead than the work they do, so per-token parameters are expanded to one per column.

_TILE_ROWS = 16
"""Rows whose per-token group ranges are gathered before their parameters are computed at once."""


@njit(cache=False, nogil=True)
def _copy_rows(src: np.ndarray, src_stride: int, dst: np.ndarray, dst_stride: int, width: int,
               r0: int, r1: int) -> None:
    for t in range(r0, r1):
        s = src[t * src_stride:t * src_stride + width]
        d = dst[t * dst_stride:t * dst_stride + width]
        for c in range(width):
            d[c] = s[c]


@njit(cache=False, nogil=True)
def _encode_units(lut: np.ndarray, src: np.ndarray, src_stride: int, n_tokens: int, width: int,
                  levels: int, per_channel: bool, gs: int, mins: np.ndarray, scales: np.ndarray,
                  body: np.ndarray, u0: int, u1: int) -> None:
    row_bytes = width if levels == 255 else (width + 1) // 2
    top = np.float32(levels)
    x = np.empty(width, np.float32)
    codes = np.empty(width, np.uint8)
    if per_channel:
        kmin = np.empty(width, np.int32)
        kmax = np.empty(width, np.int32)
        lo = np.empty(width, np.float32)
        inv = np.empty(width, np.float32)
        for blk in range(u0, u1):
            t0 = blk * gs
            t1 = min(t0 + gs, n_tokens)
            kmin[:] = 0xFFFF
            kmax[:] = 0
            for t in range(t0, t1):
                row = src[t * src_stride:t * src_stride + width]
                for c in range(width):
                    finite = _is_finite(row[c])
                    k = _order_key(row[c])
                    kmin[c] = min(kmin[c], k if finite else np.int32(0xFFFF))
                    kmax[c] = max(kmax[c], k if finite else np.int32(0))
            _params(lut, kmin, kmax, levels, mins[blk * width:(blk + 1) * width],
                    scales[blk * width:(blk + 1) * width], lo, inv)
            for t in range(t0, t1):
                row = src[t * src_stride:t * src_stride + width]
                for c in range(width):
                    x[c] = lut[row[c]]
                _quantize_row(x, lo, inv, top, codes)
                _store_codes(codes, body[t * row_bytes:(t + 1) * row_bytes], levels)
    else:
        n_col = (width + gs - 1) // gs
        kmin = np.empty(_TILE_ROWS * n_col, np.int32)
        kmax = np.empty(_TILE_ROWS * n_col, np.int32)
        glo = np.empty(_TILE_ROWS * n_col, np.float32)
        ginv = np.empty(_TILE_ROWS * n_col, np.float32)
        lo = np.empty(n_col * gs, np.float32)
        inv = np.empty(n_col * gs, np.float32)
        for r0 in range(u0, u1, _TILE_ROWS):
            r1 = min(r0 + _TILE_ROWS, u1)
            for t in range(r0, r1):
                row = src[t * src_stride:t * src_stride + width]
                for j in range(n_col):
                    group = row[j * gs:j * gs + gs]
                    gmin = np.int32(0xFFFF)
                    gmax = np.int32(0)
                    for i in range(group.size):
                        finite = _is_finite(group[i])
                        k = _order_key(group[i])
                        gmin = min(gmin, k if finite else np.int32(0xFFFF))
                        gmax = max(gmax, k if finite else np.int32(0))
                    kmin[(t - r0) * n_col + j] = gmin
                    kmax[(t - r0) * n_col + j] = gmax
            n = (r1 - r0) * n_col
            _params(lut, kmin[:n], kmax[:n], levels, mins[r0 * n_col:r1 * n_col],
                    scales[r0 * n_col:r1 * n_col], glo[:n], ginv[:n])
            for t in range(r0, r1):
                row = src[t * src_stride:t * src_stride + width]
                for c in range(width):
                    x[c] = lut[row[c]]
                g0 = (t - r0) * n_col
                _expand(glo[g0:g0 + n_col], gs, lo)
                _expand(ginv[g0:g0 + n_col], gs, inv)
                _quantize_row(x, lo, inv, top, codes)
                _store_codes(codes, body[t * row_bytes:(t + 1) * row_bytes], levels)


@njit(cache=False, nogil=True)
def _decode_units(lut: np.ndarray, mins: np.ndarray, scales: np.ndarray, body: np.ndarray,
                  n_tokens: int, width: int, levels: int, per_channel: bool, gs: int,
                  dst: np.ndarray, dst_stride: int, u0: int, u1: int) -> None:
    row_bytes = width if levels == 255 else (width + 1) // 2
    codes = np.empty(width, np.uint8)
    if per_channel:
        lo = np.empty(width, np.float32)
        scale = np.empty(width, np.float32)
        for blk in range(u0, u1):
            block_mins = mins[blk * width:(blk + 1) * width]
            block_scales = scales[blk * width:(blk + 1) * width]
            for c in range(width):
                lo[c] = lut[block_mins[c]]
                scale[c] = lut[block_scales[c]]
            for t in range(blk * gs, min(blk * gs + gs, n_tokens)):
                _load_codes(body[t * row_bytes:(t + 1) * row_bytes], levels, codes)
                _dequantize_row(codes, lo, scale, dst[t * dst_stride:t * dst_stride + width])
    else:
        n_col = (width + gs - 1) // gs
        glo = np.empty(n_col, np.float32)
        gscale = np.empty(n_col, np.float32)
        lo = np.empty(n_col * gs, np.float32)
        scale = np.empty(n_col * gs, np.float32)
        for t in range(u0, u1):
            row_mins = mins[t * n_col:(t + 1) * n_col]
            row_scales = scales[t * n_col:(t + 1) * n_col]
            for j in range(n_col):
                glo[j] = lut[row_mins[j]]
                gscale[j] = lut[row_scales[j]]
            _expand(glo, gs, lo)
            _expand(gscale, gs, scale)
            _load_codes(body[t * row_bytes:(t + 1) * row_bytes], levels, codes)
            _dequantize_row(codes, lo, scale, dst[t * dst_stride:t * dst_stride + width])


@njit(cache=False, nogil=True, parallel=True)
def _copy_rows_parallel(src: np.ndarray, src_stride: int, dst: np.ndarray, dst_stride: int,
                        width: int, n_units: int, n_chunks: int) -> None:
    for k in prange(n_chunks):
        _copy_rows(src, src_stride, dst, dst_stride, width,
                   k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=False, nogil=True, parallel=True)
def _encode_parallel(lut: np.ndarray, src: np.ndarray, src_stride: int, n_tokens: int,
                     width: int, levels: int, per_channel: bool, gs: int, mins: np.ndarray,
                     scales: np.ndarray, body: np.ndarray, n_units: int, n_chunks: int) -> None:
    for k in prange(n_chunks):
        _encode_units(lut, src, src_stride, n_tokens, width, levels, per_channel, gs, mins,
                      scales, body, k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=False, nogil=True, parallel=True)
def _decode_parallel(lut: np.ndarray, mins: np.ndarray, scales: np.ndarray, body: np.ndarray,
                     n_tokens: int, width: int, levels: int, per_channel: bool, gs: int,
                     dst: np.ndarray, dst_stride: int, n_units: int, n_chunks: int) -> None:
    for k in prange(n_chunks):
        _decode_units(lut, mins, scales, body, n_tokens, width, levels, per_channel, gs, dst,
                      dst_stride, k * n_units // n_chunks, (k + 1) * n_units // n_chunks)


@njit(cache=False, nogil=True)
def _f32_to_f16_array(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = _f32_to_f16(x[i])


# ---------------------------------------------------------------------------------------------
# Python entry points

_threads = numba.config.NUMBA_NUM_THREADS
# One parallel kernel at a time: it already uses every allowed core, and numba's default
# (workqueue) threading layer aborts the process when two threads launch parallel kernels at once.
_parallel_lock = threading.Lock()


def set_threads(n: int) -> None:
    """Threads a large encode or decode may use (1: always the single-threaded kernels)."""
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n}")
    global _threads
    _threads = n


def get_threads() -> int:
    return _threads


def float32_to_float16_bits(x: np.ndarray) -> np.ndarray:
    """f16 bit patterns (uint16) of float32 values, rounded to nearest even, without numpy's cast."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(src.shape, np.uint16)
    _f32_to_f16_array(src.reshape(-1), out.reshape(-1))
    return out


def _check_shape(n_tokens: int, width: int, encoding: Encoding, group_size: int) -> None:
    if n_tokens < 1 or width < 1:
        raise ValueError(f"empty block ({n_tokens} x {width})")
    if encoding != Encoding.F16 and group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")


def _n_groups(n_tokens: int, width: int, grouping: Grouping, group_size: int) -> int:
    if grouping == Grouping.PER_CHANNEL:
        return -(-n_tokens // group_size) * width
    return n_tokens * -(-width // group_size)


def encoded_nbytes(n_tokens: int, width: int, encoding: Encoding, grouping: Grouping,
                   group_size: int) -> int:
    """Bytes of the payload of a (n_tokens, width) block."""
    encoding = Encoding(encoding)
    _check_shape(n_tokens, width, encoding, group_size)
    if encoding == Encoding.F16:
        return 2 * n_tokens * width
    code_bytes = width if encoding == Encoding.Q8 else (width + 1) // 2
    return 4 * _n_groups(n_tokens, width, Grouping(grouping), group_size) + n_tokens * code_bytes


def _flat_rows(a: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """A 1-D view of a 2-D uint16 array with contiguous rows, and its row stride in elements."""
    if a.dtype != np.uint16 or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D uint16 array of f16 bits, got {a.dtype} {a.shape}")
    n_tokens, width = a.shape
    if a.flags.c_contiguous:
        return a.reshape(-1), width
    row_stride = a.strides[0]
    if a.strides[1] != 2 or row_stride < 2 * width or row_stride % 2:
        raise ValueError(f"{name} needs contiguous, non-overlapping rows, strides {a.strides}")
    # Spans exactly the first element of row 0 to the last of the last row: never beyond `a`.
    return as_strided(a, shape=((n_tokens - 1) * (row_stride // 2) + width,), strides=(2,)), \
        row_stride // 2


def _n_units(n_tokens: int, encoding: Encoding, grouping: Grouping, group_size: int) -> int:
    if encoding != Encoding.F16 and grouping == Grouping.PER_CHANNEL:
        return -(-n_tokens // group_size)
    return n_tokens


def _parallel_chunks(n_values: int, n_units: int) -> int:
    """Threads to split a call over; 1 means the single-threaded kernel."""
    if _threads < 2 or n_values < PARALLEL_MIN_VALUES:
        return 1
    return min(_threads, n_units)


def encode(bits: np.ndarray, encoding: Encoding, grouping: Grouping,
           group_size: int) -> np.ndarray:
    """Encode a (n_tokens, width) uint16 array of f16 bits; returns a new 1-D uint8 payload."""
    encoding = Encoding(encoding)
    grouping = Grouping(grouping)
    src, src_stride = _flat_rows(bits, "bits")
    n_tokens, width = bits.shape
    out = np.empty(encoded_nbytes(n_tokens, width, encoding, grouping, group_size), np.uint8)
    n_units = _n_units(n_tokens, encoding, grouping, group_size)
    chunks = _parallel_chunks(n_tokens * width, n_units)
    if encoding == Encoding.F16:
        dst = out.view(np.uint16)
        if chunks == 1:
            _copy_rows(src, src_stride, dst, width, width, 0, n_tokens)
        else:
            with _parallel_lock:
                numba.set_num_threads(_threads)
                _copy_rows_parallel(src, src_stride, dst, width, width, n_tokens, chunks)
        return out
    n_groups = _n_groups(n_tokens, width, grouping, group_size)
    args = (F16_TO_F32, src, src_stride, n_tokens, width, _LEVELS[encoding],
            grouping == Grouping.PER_CHANNEL, group_size, out[:2 * n_groups].view(np.uint16),
            out[2 * n_groups:4 * n_groups].view(np.uint16), out[4 * n_groups:])
    if chunks == 1:
        _encode_units(*args, 0, n_units)
    else:
        with _parallel_lock:
            numba.set_num_threads(_threads)
            _encode_parallel(*args, n_units, chunks)
    return out


def _payload_array(payload: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1 or not payload.flags.c_contiguous:
            raise ValueError("a payload array must be 1-D contiguous uint8")
        return payload
    return np.frombuffer(payload, dtype=np.uint8)


def decode_into(payload: bytes | bytearray | memoryview | np.ndarray, out: np.ndarray,
                encoding: Encoding, grouping: Grouping, group_size: int) -> None:
    """Decode into ``out``, a (n_tokens, width) uint16 array or a view with contiguous rows.

    Only ``out``'s own elements are written. A payload of the wrong length raises
    :class:`BlockCorrupt`.
    """
    encoding = Encoding(encoding)
    grouping = Grouping(grouping)
    data = _payload_array(payload)
    dst, dst_stride = _flat_rows(out, "out")
    n_tokens, width = out.shape
    expected = encoded_nbytes(n_tokens, width, encoding, grouping, group_size)
    if data.size != expected:
        raise BlockCorrupt(f"{encoding.name} payload of {data.size} bytes, a {n_tokens}x{width} "
                           f"block needs {expected}")
    n_units = _n_units(n_tokens, encoding, grouping, group_size)
    chunks = _parallel_chunks(n_tokens * width, n_units)
    if encoding == Encoding.F16:
        src = data.view(np.uint16)
        if chunks == 1:
            _copy_rows(src, width, dst, dst_stride, width, 0, n_tokens)
        else:
            with _parallel_lock:
                numba.set_num_threads(_threads)
                _copy_rows_parallel(src, width, dst, dst_stride, width, n_tokens, chunks)
        return
    n_groups = _n_groups(n_tokens, width, grouping, group_size)
    args = (F16_TO_F32, data[:2 * n_groups].view(np.uint16),
            data[2 * n_groups:4 * n_groups].view(np.uint16), data[4 * n_groups:], n_tokens,
            width, _LEVELS[encoding], grouping == Grouping.PER_CHANNEL, group_size, dst,
            dst_stride)
    if chunks == 1:
        _decode_units(*args, 0, n_units)
    else:
        with _parallel_lock:
            numba.set_num_threads(_threads)
            _decode_parallel(*args, n_units, chunks)


def decode(payload: bytes | bytearray | memoryview | np.ndarray, n_tokens: int, width: int,
           encoding: Encoding, grouping: Grouping, group_size: int) -> np.ndarray:
    """Decode a payload to a new (n_tokens, width) uint16 array of f16 bits."""
    _check_shape(n_tokens, width, Encoding(encoding), group_size)
    out = np.empty((n_tokens, width), np.uint16)
    decode_into(payload, out, encoding, grouping, group_size)
    return out

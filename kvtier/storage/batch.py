"""Batched decoding: the tensors of many records decoded by address in one kernel call.

A restore decodes thousands of records; a Python call per tensor (argument checks, views, numba's
dispatch) cost more than the bytes did, and with a decoding thread per core the Python parts
queued on the GIL (130-185 µs per record on a 16-core H200 machine). A task table says where each
tensor's payload is and where its rows go, by address, so records stay where they were read (LMDB's
memory map) and rows go straight into a state blob. The payload layouts are :mod:`.quant`'s; f16
and raw rows are copied with LLVM's ``memcpy``.

A record can be verified and decompressed in the same call, just before its tensors are decoded
(while its bytes are in the core's cache): its checksum by xxHash's own ``XXH3_64bits`` from the
``xxhash`` package's extension, its zstd payload by the system's ``libzstd``, both called by
address. Done in Python first, each record was read from memory twice, and the Python parts
between the GIL-free calls queued on the GIL: 45% of a 16-thread warm restore's time on the H200
machine, and two thirds of a cool one's, was waiting there. Each calling thread keeps one zstd
decompression context for all its frames (``ZSTD_decompress`` made and freed one per frame:
1.41 against 1.61 GB/s of 100 KB Q8 payloads here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np
import xxhash
import zstandard
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kvtier.storage.quant import _LEVELS, _decode_units

RAW = -1
"""Encoding of rows kept as they are (llama.cpp's own quantized cache types): a copy."""
TASK_FIELDS = 9
"""Columns of a task table (int64), in order: payload address, payload bytes, destination
address, rows, width (values for f16 encodings, bytes for RAW), encoding, grouping, group size,
exact leading rows (f16 bits before the quantized rest)."""
RECORD_FIELDS = 8
"""Columns of a record table (int64, one row per task): the work on a record before this task.
In order: address and length of the bytes to hash (length 0: no check), their expected xxh3_64
(the u64's bits), how many tasks from this one on depend on the row (they are skipped when it
fails), then the zstd frame to decompress (address, length; length 0: none) and where to (address,
exact decompressed length)."""
TASK_OK, TASK_BAD_SIZE, TASK_BAD_PARAMS, TASK_BAD_CHECKSUM, TASK_BAD_FRAME = 0, 1, 2, 3, 4
"""Status of a decoded task: done; payload length not what its shape needs; impossible values;
skipped, its record's checksum did not match; skipped, its record's zstd frame did not
decompress to the length its header says."""


def _find_xxh3() -> int:
    """The address of ``XXH3_64bits`` in the xxhash package's extension, if it exports it and it
    agrees with ``xxhash.xxh3_64_intdigest``; else 0 (checks then stay in Python)."""
    from xxhash import _xxhash
    sample = bytes(range(256)) * 5
    for name in ("XXH3_64bits_dispatch", "XXH3_64bits"):
        try:
            fn = getattr(ctypes.CDLL(_xxhash.__file__), name)
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
        if fn(sample, len(sample)) == xxhash.xxh3_64_intdigest(sample):
            return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


def _libzstd(name: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(name)
        fns = lib.ZSTD_createDCtx, lib.ZSTD_freeDCtx, lib.ZSTD_decompressDCtx
    except (OSError, AttributeError):
        return None
    fns[0].restype = ctypes.c_void_p
    fns[1].argtypes = [ctypes.c_void_p]
    fns[2].restype = ctypes.c_size_t
    fns[2].argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                       ctypes.c_size_t]
    return lib


def _find_zstd() -> tuple[ctypes.CDLL | None, int]:
    """The system libzstd and the address of its ``ZSTD_decompressDCtx``, if there is one and it
    reads the ``zstandard`` package's frames; else (None, 0): frames are then decompressed in
    Python."""
    lib = _libzstd("libzstd.so.1")   # the usual soname: no ldconfig subprocess
    if lib is None and (name := ctypes.util.find_library("zstd")) is not None:
        lib = _libzstd(name)
    if lib is None:
        return None, 0
    sample = bytes(range(256)) * 5
    frame = zstandard.ZstdCompressor(level=3).compress(sample)
    out = ctypes.create_string_buffer(len(sample))
    dctx = lib.ZSTD_createDCtx()
    try:
        if not dctx or lib.ZSTD_decompressDCtx(dctx, out, len(sample), frame, len(frame)) \
                != len(sample) or out.raw != sample:
            return None, 0
    finally:
        lib.ZSTD_freeDCtx(dctx)
    return lib, ctypes.cast(lib.ZSTD_decompressDCtx, ctypes.c_void_p).value or 0


XXH3_ADDRESS = _find_xxh3()
"""Where :func:`decode_tasks` finds xxh3 (0: nowhere, so checks must be done before)."""
_LIBZSTD, ZSTD_ADDRESS = _find_zstd()
"""Where :func:`decode_tasks` finds ZSTD_decompressDCtx (0: nowhere, so frames must be
decompressed before)."""


class _DecompressionContext:
    """One thread's ``ZSTD_DCtx``, freed with the thread's locals."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.address: int = lib.ZSTD_createDCtx() or 0
        if not self.address:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if self.address:
            self._lib.ZSTD_freeDCtx(self.address)


_local = threading.local()


def _thread_dctx() -> int:
    """The calling thread's zstd decompression context (made on first use)."""
    ctx = getattr(_local, "dctx", None)
    if ctx is None:
        ctx = _local.dctx = _DecompressionContext(_LIBZSTD)
    return ctx.address


def _pointer_to(dtype):
    @intrinsic
    def at(typingctx, address):
        if not isinstance(address, types.Integer):
            return None
        pointer = types.CPointer(dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))
        return pointer(address), codegen
    return at


_u8_at = _pointer_to(types.uint8)
_u16_at = _pointer_to(types.uint16)


@intrinsic
def _copy_bytes(typingctx, src, dst, n):
    """memcpy (LLVM's intrinsic, i.e. libc's): 1.6-2.3x the speed of a copy loop here."""
    if not all(isinstance(a, types.Integer) for a in (src, dst, n)):
        return None

    def codegen(context, builder, signature, args):
        s, d, count = args
        cgutils.raw_memcpy(builder, builder.inttoptr(d, cgutils.voidptr_t),
                           builder.inttoptr(s, cgutils.voidptr_t), count, 1)
        return context.get_dummy_value()
    return types.void(src, dst, n), codegen


@intrinsic
def _xxh3(typingctx, fn, src, n):
    """``XXH3_64bits(src, n)`` through the function at address ``fn``."""
    if not all(isinstance(a, types.Integer) for a in (fn, src, n)):
        return None

    def codegen(context, builder, signature, args):
        f, s, count = args
        fnty = ir.FunctionType(ir.IntType(64), [cgutils.voidptr_t, ir.IntType(64)])
        return builder.call(builder.inttoptr(f, fnty.as_pointer()),
                            [builder.inttoptr(s, cgutils.voidptr_t), count])
    return types.uint64(fn, src, n), codegen


@intrinsic
def _zstd(typingctx, fn, dctx, dst, capacity, src, n):
    """``ZSTD_decompressDCtx(dctx, dst, capacity, src, n)`` through the function at address
    ``fn``."""
    if not all(isinstance(a, types.Integer) for a in (fn, dctx, dst, capacity, src, n)):
        return None

    def codegen(context, builder, signature, args):
        f, ctx, d, cap, s, count = args
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [cgutils.voidptr_t, cgutils.voidptr_t, i64,
                                     cgutils.voidptr_t, i64])
        return builder.call(builder.inttoptr(f, fnty.as_pointer()),
                            [builder.inttoptr(ctx, cgutils.voidptr_t),
                             builder.inttoptr(d, cgutils.voidptr_t), cap,
                             builder.inttoptr(s, cgutils.voidptr_t), count])
    return types.uint64(fn, dctx, dst, capacity, src, n), codegen


@njit(cache=True, nogil=True)
def _decode_task(src: int, nbytes: int, dst: int, n: int, width: int, encoding: int,
                 grouping: int, gs: int, exact: int) -> int:
    if n < 1 or width < 1 or exact < 0 or exact > n or nbytes < 0:
        return TASK_BAD_PARAMS
    if encoding == RAW:
        if nbytes != n * width:
            return TASK_BAD_SIZE
        _copy_bytes(src, dst, nbytes)
        return TASK_OK
    if encoding < 0 or encoding > 3 or grouping < 0 or grouping > 1:
        return TASK_BAD_PARAMS
    exact_bytes = 2 * exact * width
    if nbytes < exact_bytes:
        return TASK_BAD_SIZE
    _copy_bytes(src, dst, exact_bytes)
    m = n - exact
    rest = nbytes - exact_bytes
    if m == 0 or encoding == 0:
        if rest != 2 * m * width:
            return TASK_BAD_SIZE
        _copy_bytes(src + exact_bytes, dst + exact_bytes, rest)
        return TASK_OK
    if gs < 1:
        return TASK_BAD_PARAMS
    per_channel = grouping == 1
    units = (m + gs - 1) // gs if per_channel else m
    n_groups = units * width if per_channel else m * ((width + gs - 1) // gs)
    row_bytes = width if encoding == 1 else (width + 1) // 2 if encoding == 2 \
        else 3 * ((width + 3) // 4)
    if rest != 4 * n_groups + m * row_bytes:
        return TASK_BAD_SIZE
    payload = carray(_u8_at(src + exact_bytes), rest)
    out = carray(_u16_at(dst + exact_bytes), (m, width))
    _decode_units(payload, n_groups, _LEVELS[encoding], per_channel, gs, out, out, m,
                  m, width, 0, units)
    return TASK_OK


@njit(cache=True, nogil=True)
def _decode_tasks(tasks: np.ndarray, records: np.ndarray, xxh3: int, zstd: int, dctx: int,
                  status: np.ndarray) -> None:
    i, n = 0, tasks.shape[0]
    while i < n:
        if records.shape[0]:
            failed = TASK_OK
            if records[i, 1] > 0 and np.int64(_xxh3(xxh3, records[i, 0], records[i, 1])) \
                    != records[i, 2]:
                failed = TASK_BAD_CHECKSUM
            elif records[i, 5] > 0 and _zstd(zstd, dctx, records[i, 6], records[i, 7],
                                             records[i, 4], records[i, 5]) \
                    != np.uint64(records[i, 7]):
                failed = TASK_BAD_FRAME
            if failed != TASK_OK:
                end = min(n, i + max(1, records[i, 3]))
                status[i:end] = failed
                i = end
                continue
        status[i] = _decode_task(tasks[i, 0], tasks[i, 1], tasks[i, 2], tasks[i, 3], tasks[i, 4],
                                 tasks[i, 5], tasks[i, 6], tasks[i, 7], tasks[i, 8])
        i += 1


def _table(rows: np.ndarray, fields: int, name: str) -> None:
    if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != fields \
            or not rows.flags.c_contiguous:
        raise ValueError(f"a {name} table is C-contiguous int64 (n, {fields})")


def decode_tasks(tasks: np.ndarray, records: np.ndarray | None = None) -> np.ndarray:
    """Decode every tensor of a task table (``(n, TASK_FIELDS)`` int64, see ``TASK_FIELDS``) in one
    call without the GIL, verifying and decompressing the records of a record table (``(n,
    RECORD_FIELDS)``, see ``RECORD_FIELDS``; checks need ``XXH3_ADDRESS``, frames
    ``ZSTD_ADDRESS``) on the way; returns each task's status (``TASK_*``), int8. Every address
    must be valid for the bytes its task or record row reads or writes while the call runs: the
    caller keeps the records, the payloads and the destinations alive."""
    _table(tasks, TASK_FIELDS, "task")
    if records is None:
        records = np.zeros((0, RECORD_FIELDS), np.int64)
    else:
        _table(records, RECORD_FIELDS, "record")
        if len(records) != len(tasks):
            raise ValueError(f"{len(records)} record rows for {len(tasks)} tasks")
        if not XXH3_ADDRESS and (records[:, 1] > 0).any():
            raise ValueError("checks need xxh3 by address, which this xxhash does not export")
    frames = bool(len(records)) and bool((records[:, 5] > 0).any())
    if frames and not ZSTD_ADDRESS:
        raise ValueError("frames need ZSTD_decompressDCtx by address: no system libzstd")
    status = np.empty(tasks.shape[0], np.int8)
    _decode_tasks(tasks, records, XXH3_ADDRESS, ZSTD_ADDRESS, _thread_dctx() if frames else 0,
                  status)
    return status

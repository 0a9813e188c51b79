"""Queries observed while llama.cpp decodes: the input of query-aware block selection.

llama.cpp calls a context's eval callback (``llama_context_params.cb_eval``) for every node of every
graph it computes: once to ask whether the caller wants the node's data, once more after computing
it. The callback here is a numba ``cfunc`` (C code, no Python per node: a Python callback cost more
than a millisecond a token), steered by a small control block in memory:

- off (the usual case): it answers "no" to every node, and llama.cpp computes the graph as usual;
- on: it asks for the RoPE outputs named ``Qcur-<layer>`` (shape head_dim x n_head x n_tokens,
  float32, after RoPE: what attention multiplies the cached keys with) of the sampled layers, and
  copies the rows of the wanted batch positions out with ``ggml_backend_tensor_get``, from host or
  device memory alike. Each node it asks for splits the graph there (on a GPU, a synchronization),
  so capture is switched on only for the decodes whose queries a selection needs.

A batch must fit one micro-batch (``n_ubatch``) while capturing: the callback sees each layer once,
and the batch's rows in the order they were given (llama.cpp keeps that order for a unified cache).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

# struct ggml_tensor (ggml.h, llama-cpp-python 0.3.36): the offsets of the fields read here.
_NE = 16            # int64 ne[4]
_NB = 48            # size_t nb[4]
_OP = 80            # enum ggml_op
_NAME = 256         # char name[64]
_NAME_BYTES = 64
_QCUR = np.frombuffer(b"Qcur-", dtype=np.uint8)

# The control block the callback reads (int64 each).
_ON, _ROPE_OP, _N_LAYER, _ROW_BYTES, _STRIDE, _DEST, _DEST_ROWS, _N_RANGES, _CAPTURED = range(9)
_RANGES = 9
"""Then ``_N_RANGES`` triples (first batch row, rows, first destination row)."""
MAX_RANGES = 64


@intrinsic
def _address(typingctx, pointer):
    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))
    return types.int64(pointer), codegen


@intrinsic
def _void_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@intrinsic
def _int64_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
    return types.CPointer(types.int64)(address), codegen


@intrinsic
def _uint8_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
    return types.CPointer(types.uint8)(address), codegen


def _ggml_library() -> ctypes.CDLL:
    from llama_cpp._ggml import libggml
    return libggml


@cache
def rope_op() -> int:
    """ggml's op code of ROPE in the loaded library (the enum's numbers move between versions)."""
    lib = _ggml_library()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    for op in range(512):  # ggml_op_name indexes a table: stop at its first empty name
        name = lib.ggml_op_name(op)
        if name == b"ROPE":
            return op
        if not name:
            break
    raise RuntimeError("this ggml has no ROPE op")


@cache
def _callback() -> ctypes._CFuncPtr:
    tensor_get = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_size_t)(
        ctypes.cast(_ggml_library().ggml_backend_tensor_get, ctypes.c_void_p).value)
    qcur = _QCUR

    @cfunc(types.boolean(types.voidptr, types.boolean, types.voidptr), nopython=True)
    def capture(tensor, ask, user_data):
        ctl = carray(_int64_pointer(_address(user_data)), _RANGES + 3 * MAX_RANGES)
        if ctl[_ON] == 0:
            return False
        base = _address(tensor)
        name = carray(_uint8_pointer(base + _NAME), _NAME_BYTES)
        for i in range(5):
            if name[i] != qcur[i]:
                return False
        layer = 0
        i = 5
        while i < _NAME_BYTES and name[i] != 0:
            digit = np.int64(name[i]) - 48
            if digit < 0 or digit > 9:
                return False  # "Qcur-3 (view)" and the like
            layer = layer * 10 + digit
            i += 1
        if i == 5 or layer >= ctl[_N_LAYER] or layer % ctl[_STRIDE] != 0:
            return False
        if (carray(_int64_pointer(base + _OP), 1)[0] & 0xFFFFFFFF) != ctl[_ROPE_OP]:
            return False  # the matmul and reshape before RoPE carry the same name
        if ask:
            return True
        ne = carray(_int64_pointer(base + _NE), 4)
        nb = carray(_int64_pointer(base + _NB), 4)
        row_bytes = ctl[_ROW_BYTES]
        if ne[0] * ne[1] * 4 != row_bytes or nb[1] * ne[1] != nb[2]:
            return True  # not the float32 contiguous layout this copies from
        slot = layer // ctl[_STRIDE]
        n_dest = ctl[_DEST_ROWS]
        for r in range(ctl[_N_RANGES]):
            first, rows, dest_row = (ctl[_RANGES + 3 * r], ctl[_RANGES + 3 * r + 1],
                                     ctl[_RANGES + 3 * r + 2])
            if first + rows > ne[2]:
                continue
            dest = ctl[_DEST] + (slot * n_dest + dest_row) * row_bytes
            tensor_get(tensor, _void_pointer(dest), nb[2] * first, nb[2] * rows)
        ctl[_CAPTURED] += 1
        return True

    return ctypes.cast(capture.address, _eval_callback_type())


def _eval_callback_type() -> type:
    import llama_cpp
    return llama_cpp.ggml_backend_sched_eval_callback


@dataclass(frozen=True, slots=True)
class RowRange:
    """Rows ``[first, first + count)`` of the next decode's batch, for one consumer."""

    first: int
    count: int


class QueryCapture:
    """The eval callback of one llama.cpp context and the queries it captured.

    Give :attr:`callback` and :attr:`user_data` to ``llama_context_params`` before the context is
    created; then, around a ``llama_decode``, :meth:`arm` with the batch rows wanted and
    :meth:`collect` the queries, shaped ``(range, layer sample, row, head, head_dim)``.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, layer_stride: int = 1) -> None:
        if layer_stride < 1:
            raise ValueError("layer_stride must be at least 1")
        self.n_head = n_head
        self.head_dim = head_dim
        self.layers = list(range(0, n_layer, layer_stride))
        self._control = np.zeros(_RANGES + 3 * MAX_RANGES, dtype=np.int64)
        self._control[_ROPE_OP] = rope_op()
        self._control[_N_LAYER] = n_layer
        self._control[_ROW_BYTES] = n_head * head_dim * 4
        self._control[_STRIDE] = layer_stride
        self._ranges: list[RowRange] = []
        self._out = np.zeros(0, dtype=np.float32)
        self.callback = _callback()

    @property
    def user_data(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(self._control.ctypes.data)

    def arm(self, ranges: list[RowRange]) -> None:
        """Capture these rows of the next decode (at most :data:`MAX_RANGES` ranges)."""
        if not ranges or len(ranges) > MAX_RANGES:
            raise ValueError(f"between 1 and {MAX_RANGES} row ranges, got {len(ranges)}")
        n_rows = max(r.count for r in ranges)
        self._ranges = list(ranges)
        self._out = np.zeros((len(self.layers), len(ranges) * n_rows, self.n_head,
                              self.head_dim), dtype=np.float32)
        c = self._control
        c[_DEST] = self._out.ctypes.data
        c[_DEST_ROWS] = len(ranges) * n_rows
        c[_N_RANGES] = len(ranges)
        for i, r in enumerate(ranges):
            c[_RANGES + 3 * i: _RANGES + 3 * i + 3] = (r.first, r.count, i * n_rows)
        c[_CAPTURED] = 0
        c[_ON] = 1

    def collect(self) -> list[np.ndarray]:
        """Switch capture off; per armed range, its queries ``(layer sample, row, head, dim)``.

        Raises RuntimeError when llama.cpp computed fewer sampled layers than expected (a model
        whose graph names its queries otherwise: selection must then fall back to recency)."""
        c = self._control
        c[_ON] = 0
        if c[_CAPTURED] != len(self.layers):
            raise RuntimeError(f"captured the queries of {c[_CAPTURED]} layers, expected "
                               f"{len(self.layers)}")
        n_rows = self._out.shape[1] // max(len(self._ranges), 1)
        return [self._out[:, i * n_rows:i * n_rows + r.count]
                for i, r in enumerate(self._ranges)]

"""Reusable host buffers for state blobs, pinned for the GPU where llama.cpp runs on CUDA.

A restore composes a state blob in host memory and ``llama_state_seq_set_data`` copies it into
the KV cache; a store reads a sequence's state out with ``llama_state_seq_get_data``. On an H200
those copies ran at 5-8 GB/s from pageable memory and 32-50 GB/s from memory registered with
``cudaHostRegister``; registering costs ~0.04-0.2 s per GB, and fresh pages cost a page fault
each on first touch (1.77 s for a 4.3 GB ``get_data`` into an untouched buffer against 0.08 s
into a pinned one; DESIGN.md, "GPU facts"). So buffers are allocated once, grown when a blob
does not fit, reused, and registered once when allocated: never per request.

Registration happens only when llama.cpp's CUDA backend is in the process (its ``libcudart`` is
mapped); otherwise, and if registering fails, buffers are plain page-aligned memory. The
registrar is injected, so the pinning code path is tested without CUDA.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvtier.errors import KvtierError

log = logging.getLogger(__name__)

GROWTH = 1.25
"""A buffer that must grow takes this much more than asked, so a conversation that grows a
little each turn does not re-register every turn."""
_ROUND = 2 << 20
"""Sizes are multiples of 2 MiB (a huge page, where the kernel gives them)."""


class PinningError(KvtierError):
    """The CUDA runtime refused to register (pin) or unregister host memory."""


class Registrar(Protocol):
    """Registers host memory with the GPU runtime so device copies run at the link's speed."""

    name: str

    def register(self, address: int, nbytes: int) -> None: ...

    def unregister(self, address: int) -> None: ...


def _mapped_library(fragment: str) -> str | None:
    """The path of a shared library mapped into this process whose file name contains
    ``fragment`` (Linux; None elsewhere or when none is)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and fragment in os.path.basename(parts[5]):
                    return parts[5]
    except OSError:
        pass
    return None


class CudaRegistrar:
    """``cudaHostRegister`` (flags 0: the GPU may read and write the memory, so ``get_data`` can
    write into it too) through the ``libcudart`` that llama.cpp's CUDA backend loaded."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._lib = library
        library.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        library.cudaHostRegister.restype = ctypes.c_int
        library.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        library.cudaHostUnregister.restype = ctypes.c_int
        library.cudaGetErrorString.argtypes = [ctypes.c_int]
        library.cudaGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def find(cls) -> CudaRegistrar | None:
        """The registrar of the CUDA runtime in this process, or None if llama.cpp did not load
        one (a CPU build): never loads a CUDA runtime itself."""
        path = _mapped_library("libcudart.so")
        if path is None:
            return None
        return cls(ctypes.CDLL(path), os.path.basename(path))

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            # The runtime keeps the error as its "last error"; reading it clears it, so that a
            # failed registration does not surface later in an unrelated llama.cpp call.
            self._lib.cudaGetLastError()
            message = self._lib.cudaGetErrorString(err).decode(errors="replace")
            raise PinningError(f"{what}: CUDA error {err} ({message})")

    def register(self, address: int, nbytes: int) -> None:
        self._check(self._lib.cudaHostRegister(address, nbytes, 0), "cudaHostRegister")

    def unregister(self, address: int) -> None:
        self._check(self._lib.cudaHostUnregister(address), "cudaHostUnregister")


def _round_up(n: int) -> int:
    return max(_ROUND, -(-n // _ROUND) * _ROUND)


class HostBuffer:
    """One page-aligned host buffer, touched once and registered once (when a registrar is
    given and accepts it). :attr:`array` is its memory; :meth:`view` the first bytes of it."""

    def __init__(self, nbytes: int, registrar: Registrar | None = None) -> None:
        self.capacity = _round_up(nbytes)
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        # Touch every page now: a page fault per 4 KiB inside a restore or a store would cost
        # more than the copy (and cudaHostRegister would fault them in anyway).
        self.array.fill(0)
        self.address = self.array.__array_interface__["data"][0]
        self._registrar: Registrar | None = None
        if registrar is not None:
            try:
                registrar.register(self.address, self.capacity)
                self._registrar = registrar
            except PinningError as exc:
                log.warning("host buffer of %d bytes stays pageable: %s", self.capacity, exc)

    @property
    def pinned(self) -> bool:
        return self._registrar is not None

    def view(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` bytes (uint8)."""
        if nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes do not fit a buffer of {self.capacity}")
        return self.array[:nbytes]

    def close(self) -> None:
        """Unregister the memory; it is freed once no array refers to it."""
        if self._registrar is not None:
            registrar, self._registrar = self._registrar, None
            try:
                registrar.unregister(self.address)
            except PinningError as exc:
                log.warning("could not unregister a host buffer: %s", exc)


@dataclass(frozen=True, slots=True)
class BufferStats:
    """What a :class:`BufferPool` holds and how often it made its users wait."""

    pinned: bool
    """Whether its buffers are registered with the GPU runtime."""
    buffers: int
    capacity_bytes: int
    """Bytes allocated, in use or free."""
    in_use_bytes: int
    """Capacity of the buffers handed out."""
    allocations: int
    """Buffers allocated (or grown) since start: each one a registration."""
    waits: int
    """Acquisitions that waited for the budget."""
    wait_s: float


class BufferPool:
    """Reusable :class:`HostBuffer`s handed out by :meth:`acquire` and given back by
    :meth:`release`, within a byte budget.

    ``acquire`` waits while the buffers in use and the one asked for would exceed the budget
    (back-pressure on whoever fills them); one buffer larger than the whole budget is still
    handed out when no other is in use, so a large sequence can always be stored. Free buffers
    are kept for reuse; a request that fits none grows the largest free one (it is replaced) or
    allocates a new one, and free buffers beyond the budget are let go.
    """

    def __init__(self, budget: int, registrar: Registrar | None = None,
                 name: str = "host buffers",
                 allocate: Callable[[int, Registrar | None], HostBuffer] = HostBuffer) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        self.name = name
        self._registrar = registrar
        self._allocate = allocate
        self._free: list[HostBuffer] = []
        self._in_use: set[HostBuffer] = set()
        self._cv = threading.Condition()
        self._allocations = 0
        self._waits = 0
        self._wait_s = 0.0
        self._closed = False

    @property
    def pinned(self) -> bool:
        """Whether buffers get registered (a registrar is present and accepted them so far)."""
        with self._cv:
            buffers = self._free + list(self._in_use)
        return self._registrar is not None and all(b.pinned for b in buffers)

    def _in_use_bytes(self) -> int:
        return sum(b.capacity for b in self._in_use)

    def acquire(self, nbytes: int, timeout: float | None = None) -> HostBuffer:
        """A buffer of at least ``nbytes``, waiting while the budget is spent; TimeoutError if
        ``timeout`` seconds pass first."""
        wanted = _round_up(nbytes)
        with self._cv:
            if self._closed:
                raise KvtierError(f"{self.name} are closed")
            if self._in_use and self._in_use_bytes() + wanted > self.budget:
                self._waits += 1
                start = time.perf_counter()
                try:
                    if not self._cv.wait_for(lambda: self._closed or not self._in_use or
                                             self._in_use_bytes() + wanted <= self.budget,
                                             timeout):
                        raise TimeoutError(f"{self.name}: no room for {nbytes} bytes")
                finally:
                    self._wait_s += time.perf_counter() - start
                if self._closed:
                    raise KvtierError(f"{self.name} are closed")
            buffer = self._take(wanted)
            self._in_use.add(buffer)
            return buffer

    def _take(self, wanted: int) -> HostBuffer:
        fits = [b for b in self._free if b.capacity >= wanted]
        if fits:
            buffer = min(fits, key=lambda b: b.capacity)
            self._free.remove(buffer)
            return buffer
        if self._free:
            largest = max(self._free, key=lambda b: b.capacity)
            self._free.remove(largest)
            largest.close()
            wanted = max(wanted, _round_up(int(largest.capacity * GROWTH)))
        self._allocations += 1
        buffer = self._allocate(wanted, self._registrar)
        self._trim()
        return buffer

    def _trim(self) -> None:
        """Let free buffers go, largest first, while everything held exceeds the budget."""
        while self._free and self._in_use_bytes() + sum(b.capacity for b in self._free) \
                > self.budget:
            largest = max(self._free, key=lambda b: b.capacity)
            self._free.remove(largest)
            largest.close()

    def release(self, buffer: HostBuffer) -> None:
        """Give a buffer back for reuse."""
        with self._cv:
            self._in_use.discard(buffer)
            if self._closed:
                buffer.close()
            else:
                self._free.append(buffer)
                self._trim()
            self._cv.notify_all()

    def stats(self) -> BufferStats:
        with self._cv:
            held = self._free + list(self._in_use)
            return BufferStats(self._registrar is not None and all(b.pinned for b in held),
                               len(held), sum(b.capacity for b in held), self._in_use_bytes(),
                               self._allocations, self._waits, self._wait_s)

    def close(self) -> None:
        """Unregister and drop the free buffers; buffers in use go when released."""
        with self._cv:
            self._closed = True
            for buffer in self._free:
                buffer.close()
            self._free.clear()
            self._cv.notify_all()

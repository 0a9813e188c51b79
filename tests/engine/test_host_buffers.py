"""Host buffers: page-aligned, touched and registered once, reused, grown, bounded by a budget.
The registration path runs with an injected registrar (no CUDA here) and a fake libcudart."""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.engine.host_buffers import (BufferPool, CudaRegistrar, HostBuffer, PinningError,
                                        Registrar)

MiB = 1 << 20


class Recorder:
    """A registrar that remembers what is registered, optionally refusing."""

    name = "recorder"

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.registered: dict[int, int] = {}
        self.calls = 0

    def register(self, address: int, nbytes: int) -> None:
        self.calls += 1
        if self.refuse:
            raise PinningError("cudaHostRegister: CUDA error 2 (out of memory)")
        self.registered[address] = nbytes

    def unregister(self, address: int) -> None:
        del self.registered[address]


def test_a_buffer_is_page_aligned_touched_and_registered_once():
    recorder = Recorder()
    buffer = HostBuffer(3 * MiB + 5, recorder)
    assert buffer.address % 4096 == 0 and buffer.capacity >= 3 * MiB + 5
    assert buffer.pinned and recorder.registered == {buffer.address: buffer.capacity}
    view = buffer.view(1000)
    view[:] = 7
    assert view.size == 1000 and (buffer.array[:1000] == 7).all()
    with pytest.raises(ValueError):
        buffer.view(buffer.capacity + 1)
    buffer.close()
    buffer.close()
    assert recorder.registered == {} and not buffer.pinned


def test_a_refused_registration_leaves_a_pageable_buffer():
    buffer = HostBuffer(MiB, Recorder(refuse=True))
    assert not buffer.pinned
    buffer.view(10)[:] = 1
    buffer.close()


def test_the_pool_reuses_buffers_and_registers_only_new_ones():
    recorder = Recorder()
    pool = BufferPool(64 * MiB, recorder)
    first = pool.acquire(5 * MiB)
    pool.release(first)
    again = pool.acquire(4 * MiB)
    assert again is first and recorder.calls == 1
    pool.release(again)
    bigger = pool.acquire(9 * MiB)              # no free buffer fits: the free one is replaced
    assert bigger is not first and bigger.capacity >= 9 * MiB
    assert recorder.registered == {bigger.address: bigger.capacity}
    pool.release(bigger)
    stats = pool.stats()
    assert (stats.pinned, stats.buffers, stats.in_use_bytes, stats.allocations) == \
        (True, 1, 0, 2)
    pool.close()
    assert recorder.registered == {}


def test_the_budget_makes_acquire_wait_and_counts_it():
    pool = BufferPool(8 * MiB, Recorder())
    held = pool.acquire(6 * MiB)
    with pytest.raises(TimeoutError):
        pool.acquire(4 * MiB, timeout=0.05)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(4 * MiB)))
    waiter.start()
    time.sleep(0.1)
    assert not got                             # still waiting for room
    pool.release(held)
    waiter.join(5)
    assert got and got[0].capacity >= 4 * MiB
    stats = pool.stats()
    assert stats.waits == 2 and stats.wait_s >= 0.1
    pool.release(got[0])
    pool.close()


def test_one_buffer_larger_than_the_budget_is_still_handed_out_alone():
    recorder = Recorder()
    pool = BufferPool(4 * MiB, recorder)
    large = pool.acquire(10 * MiB)
    assert large.capacity >= 10 * MiB
    pool.release(large)
    # Free buffers beyond the budget are let go (and unregistered).
    assert pool.stats().buffers == 0 and recorder.registered == {}
    pool.close()


def test_without_a_registrar_buffers_are_plain_memory():
    pool = BufferPool(4 * MiB)
    buffer = pool.acquire(MiB)
    assert not buffer.pinned and not pool.stats().pinned
    pool.release(buffer)
    pool.close()
    with pytest.raises(Exception):
        pool.acquire(MiB)


class FakeCudart:
    """The four libcudart entry points CudaRegistrar uses, as ctypes would expose them."""

    def __init__(self, register_error: int = 0) -> None:
        self.calls: list[tuple] = []
        self.last_error_reads = 0

        def register(address, nbytes, flags):
            self.calls.append(("register", address, nbytes, flags))
            return register_error

        def unregister(address):
            self.calls.append(("unregister", address))
            return 0

        def error_string(err):
            return b"out of memory"

        def last_error():
            self.last_error_reads += 1
            return 0

        self.cudaHostRegister, self.cudaHostUnregister = register, unregister
        self.cudaGetErrorString, self.cudaGetLastError = error_string, last_error


def test_the_cuda_registrar_registers_read_write_and_reports_errors():
    lib = FakeCudart()
    registrar: Registrar = CudaRegistrar(lib, "libcudart.so.12")
    buffer = HostBuffer(MiB, registrar)
    assert lib.calls == [("register", buffer.address, buffer.capacity, 0)]   # flags 0: read-write
    buffer.close()
    assert lib.calls[-1] == ("unregister", buffer.address)
    failing = FakeCudart(register_error=2)
    with pytest.raises(PinningError, match="out of memory"):
        CudaRegistrar(failing, "libcudart.so.12").register(4096, 4096)
    assert failing.last_error_reads == 1       # the sticky error is cleared


def test_no_cuda_runtime_in_a_cpu_build():
    assert CudaRegistrar.find() is None

"""The background store writer on synthetic state blobs and a real store: what a job stores and
in which order, what is pending meanwhile, back-pressure, failures, and blocks taken from any
position range of a state read."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvtier.engine import state_codec as sc
from kvtier.engine.host_buffers import BufferPool
from kvtier.engine.store_writer import (BlockWrite, SequenceWrite, StoreJob, StoreWriter,
                                        rows_at)
from kvtier.errors import UnsupportedLayout
from kvtier.ggml import F16
from kvtier.storage.manager import TierManager
from kvtier.storage.records import chain_hash
from tests.factories import NS, block_id, make_config, make_layers

N_LAYERS, WIDTH, BLOCK = 3, 32, 16
LAYOUT = sc.StateLayout((sc.CacheLayout(1, False, N_LAYERS, (F16.id,) * N_LAYERS,
                                        (2 * WIDTH,) * N_LAYERS, (F16.id,) * N_LAYERS,
                                        (2 * WIDTH,) * N_LAYERS),))
MiB = 1 << 20


def state_blob(blocks: dict[int, int], seed: int = 0) -> tuple[bytes, dict[int, list]]:
    """A state blob holding ``blocks`` (block index -> rows) at their positions (block *
    BLOCK...), and the layers of each block."""
    layers = {b: make_layers(seed + b, N_LAYERS, n, WIDTH) for b, n in blocks.items()}
    blob = sc.compose(LAYOUT, 0, 0, sorted(layers.items()), BLOCK)
    return bytes(blob), layers


def job_for(pool: BufferPool, blob: bytes, writes: list[BlockWrite], **kwargs) -> StoreJob:
    buffer = pool.acquire(len(blob))
    buffer.view(len(blob))[:] = np.frombuffer(blob, np.uint8)
    return StoreJob(buffer, len(blob), writes, **kwargs)


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def store(tmp_path, request):
    with TierManager(make_config(tmp_path, **{"tiers.warm_format": "f16",
                                              "tiers.host_ram_budget": "64MiB"}),
                     background=False) as manager:
        writer = StoreWriter(manager, BufferPool(16 * MiB), threads=request.param)
        yield manager, writer
        writer.close()


def test_a_job_stores_its_blocks_then_the_sequence_then_its_follow_up(store):
    manager, writer = store
    blob, layers = state_blob({0: BLOCK, 1: BLOCK, 2: 5})
    tokens = np.arange(2 * BLOCK + 5, dtype=np.int32)
    c0 = chain_hash(None, tokens[:BLOCK])
    c1 = chain_hash(c0, tokens[BLOCK:2 * BLOCK])
    ids = [block_id(7, b) for b in range(3)]
    order: list[str] = []
    done: list = []
    job = job_for(writer.pool, blob, [BlockWrite(ids[0], c0, 0, BLOCK),
                                      BlockWrite(ids[1], c1, BLOCK, BLOCK),
                                      BlockWrite(ids[2], None, 2 * BLOCK, 5)],
                  sequence=SequenceWrite(NS, 7, tokens, tuple(ids)),
                  after=lambda: order.append(f"after: {manager.get_sequence(NS, 7) is not None}"),
                  done=done.append)
    writer.submit(job)
    assert writer.drain(10)
    assert order == ["after: True"] and done == [None]
    for b in range(3):
        stored = manager.get_block(ids[b])
        assert all(np.array_equal(s.k.rows, e.k.rows) and np.array_equal(s.v.rows, e.v.rows)
                   for s, e in zip(stored, layers[b]))
    assert manager.find_hash(NS, c1) == ids[1]
    stats = writer.stats()
    assert (stats.jobs, stats.blocks_written, stats.failures, stats.queued_jobs,
            stats.queued_bytes) == (1, 3, 0, 0, 0)
    assert stats.bytes_read == len(blob)
    assert writer.pool.stats().in_use_bytes == 0          # the buffer came back


def test_while_a_job_waits_its_ids_chains_and_session_are_pending(store):
    manager, writer = store
    gate = threading.Event()
    blob, _ = state_blob({0: BLOCK})
    chain = chain_hash(None, np.arange(BLOCK))
    hold = StoreJob(None, 0, after=gate.wait)       # keeps the writer busy
    writer.submit(hold)
    job = job_for(writer.pool, blob, [BlockWrite(block_id(3, 0), chain, 0, BLOCK)],
                  sequence=SequenceWrite(NS, 3, np.arange(BLOCK), (block_id(3, 0),)),
                  session_id="s")
    writer.submit(job)
    assert writer.is_pending(block_id(3, 0)) and writer.pending_chain(NS, chain) == block_id(3, 0)
    assert not writer.wait_session("s", timeout=0.05) and not writer.wait_session(timeout=0.05)
    assert writer.wait_session("other", timeout=0.05)
    assert writer.stats().queued_jobs == 2 and writer.stats().queued_bytes == len(blob)
    gate.set()
    assert writer.wait_session("s", timeout=10)
    assert not writer.is_pending(block_id(3, 0)) and writer.pending_chain(NS, chain) is None
    assert manager.find_hash(NS, chain) == block_id(3, 0)


def test_a_queued_block_is_read_from_its_buffer_then_from_the_store(store):
    # A working set that drops a block before its write is done and wants it back reads it from
    # the writer; once written, from the store, at the (packed) position its keys were computed.
    manager, writer = store
    gate = threading.Event()
    blob, layers = state_blob({2: BLOCK})
    writer.submit(StoreJob(None, 0, after=gate.wait))
    writer.submit(job_for(writer.pool, blob, [BlockWrite(block_id(4, 9), None, 2 * BLOCK,
                                                         BLOCK, position=2 * BLOCK)]))
    copied: list = []
    assert writer.read_pending(block_id(4, 9), lambda rows: copied.append(
        [(r.k.rows.copy(), r.v.rows.copy()) for r in rows]))
    assert all(np.array_equal(k, e.k.rows) and np.array_equal(v, e.v.rows)
               for (k, v), e in zip(copied[0], layers[2]))
    assert not writer.read_pending(block_id(4, 1), copied.append)     # not queued
    gate.set()
    assert writer.drain(10)
    assert not writer.read_pending(block_id(4, 9), copied.append) and len(copied) == 1
    stored = manager.get_block(block_id(4, 9))
    assert all(np.array_equal(s.k.rows, e.k.rows) for s, e in zip(stored, layers[2]))
    assert manager.block_entry(block_id(4, 9)).position == 2 * BLOCK


def test_jobs_run_in_order(store):
    manager, writer = store
    seen: list[int] = []
    for i in range(5):
        writer.submit(StoreJob(None, 0, after=lambda i=i: seen.append(i)))
    writer.drain(10)
    assert seen == list(range(5))


def test_a_full_queue_makes_the_engine_wait(store):
    manager, _ = store
    writer = StoreWriter(manager, BufferPool(4 * MiB))
    gate = threading.Event()
    try:
        first = writer.pool.acquire(3 * MiB)
        writer.submit(StoreJob(first, 0, after=gate.wait))
        threading.Timer(0.2, gate.set).start()
        start = time.perf_counter()
        second = writer.pool.acquire(3 * MiB)                   # waits for the first job's buffer
        assert time.perf_counter() - start >= 0.15
        writer.pool.release(second)
        stats = writer.stats()
        assert stats.waits == 1 and stats.wait_s >= 0.15
    finally:
        gate.set()
        writer.close()


def test_a_failed_job_is_counted_and_its_sequence_reported_broken_once(store):
    manager, writer = store
    blob, layers = state_blob({0: BLOCK})
    manager.put_block(block_id(4, 0), layers[0])          # the id is taken: put_block refuses
    errors: list = []
    writer.submit(job_for(writer.pool, blob, [BlockWrite(block_id(4, 0), None, 0, BLOCK)],
                          sequence=SequenceWrite(NS, 4, np.arange(BLOCK), (block_id(4, 0),)),
                          done=errors.append))
    later: list = []
    writer.submit(StoreJob(None, 0, done=later.append))
    writer.drain(10)
    assert isinstance(errors[0], ValueError) and later == [None]
    assert writer.stats().failures == 1 and writer.pool.stats().in_use_bytes == 0
    assert writer.take_broken(4) and not writer.take_broken(4)


def test_close_drains_the_queue(store):
    manager, _ = store
    writer = StoreWriter(manager, BufferPool(16 * MiB))
    blob, _ = state_blob({0: BLOCK})
    writer.submit(job_for(writer.pool, blob, [BlockWrite(block_id(5, 0), None, 0, BLOCK)]))
    writer.close()
    assert manager.has_block(block_id(5, 0))


def test_blocks_come_from_any_position_range_of_a_state():
    # A state whose cells sit at positions 40..71 (packed, as a working set may hold them),
    # listed out of order: the block at 40 is the first 16 of them.
    blob, layers = state_blob({2: BLOCK, 3: BLOCK, 4: 8})
    state = sc.parse(blob)
    positions = state.caches[0].positions
    assert positions[0] == 2 * BLOCK
    middle = rows_at(state, 3 * BLOCK, BLOCK)
    assert all(np.array_equal(m.k.rows, e.k.rows) for m, e in zip(middle, layers[3]))
    shuffled = sc.SequenceState(state.seq_id, 0, state.layout, (sc.CacheCells(
        positions[::-1].copy(), tuple(k[::-1] for k in state.caches[0].k),
        tuple(v[::-1] for v in state.caches[0].v)),))
    again = rows_at(shuffled, 3 * BLOCK, BLOCK)
    assert all(np.array_equal(a.v.rows, e.v.rows) for a, e in zip(again, layers[3]))
    with pytest.raises(UnsupportedLayout):
        rows_at(state, 4 * BLOCK, BLOCK)                  # only 8 of the 16 positions are held
    with pytest.raises(UnsupportedLayout):
        rows_at(state, BLOCK, BLOCK)                      # none are

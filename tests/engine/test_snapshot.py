"""Snapshot a live sequence into the store, restore it, compare logits.

The hot tier's cache is unified (every slot's cells in one pool), and llama.cpp's attention kernels
sum in an order that depends on where in the pool a sequence's cells are: the same KV in other cells
gives logits that differ at the kernels' own rounding. So a restore is compared with the live
sequence on the same cells: the slot is cleared and restored, and its cells are reused."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.config import load_config
from kvtier.engine import state_codec
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine import snapshot
from kvtier.engine.snapshot import Snapshotter, StoredSequence
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier

N_PROMPT = 700  # two full blocks of 256 and a tail of 188


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q), from logits of shape (positions, n_vocab)."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def prefill(hot: HotContext, slot_index: int, tokens: np.ndarray) -> None:
    slot = hot.slots[slot_index]
    for start in range(0, len(tokens), hot.n_batch):
        chunk = tokens[start:start + hot.n_batch]
        hot.decode([BatchItem(slot_index, chunk, len(slot.tokens), False)])


def next_logits(hot: HotContext, slot_index: int, token: int) -> np.ndarray:
    slot = hot.slots[slot_index]
    index = hot.decode([BatchItem(slot_index, np.array([token], np.int32), len(slot.tokens),
                                  True)])[0]
    return hot.logits(index)


@pytest.fixture
def setup(tmp_path, model, request):
    config = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 2,
                                "tiers.warm_format": request.param})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint("f16", "f16", 256).namespace
    snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
    yield hot, manager, snaps
    snaps.close()
    manager.close()
    hot.close()


N_CONTINUE = 16


def store_and_restore(hot, manager, snaps, tokens, move_to=None, before_restore=None):
    """Store ``tokens[:N_PROMPT]`` from slot 0, decode the next N_CONTINUE tokens of the text (the
    live logits), clear the slot, restore it and decode them again. Returns the two
    (N_CONTINUE, n_vocab) logits arrays. ``before_restore()`` is called once the blocks are
    stored (and moved): a restore from below warm promotes what it read."""
    prompt = tokens[:N_PROMPT]
    following = tokens[N_PROMPT:N_PROMPT + N_CONTINUE]
    slot = hot.slots[0]
    prefill(hot, 0, prompt)
    seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
    assert len(seq.full) == 2 and seq.tail_tokens == N_PROMPT - 512
    live = np.stack([next_logits(hot, 0, int(t)) for t in following])
    if move_to is not None:
        assert all(manager.move(block, move_to) for block in seq.blocks)
    if before_restore is not None:
        before_restore()
    entry = manager.get_sequence(snaps.namespace, seq.seq_id)
    plan = snaps.plan(prompt, entry)
    assert plan.n_tokens == N_PROMPT and plan.blocks == seq.blocks
    hot.clear(slot)
    restored = snaps.restore(slot, plan, prompt)
    assert restored.n_tokens == N_PROMPT
    assert hot.pos_range(0) == (0, N_PROMPT - 1)
    return live, np.stack([next_logits(hot, 0, int(t)) for t in following])


@pytest.mark.parametrize("setup", ["f16"], indirect=True)
def test_f16_restore_gives_bit_identical_logits(setup, document_tokens):
    live, restored = store_and_restore(*setup, document_tokens)
    assert np.array_equal(live, restored)


# Bounds from measurement (docs/benchmarks.md, fidelity): on this model any perturbation of the KV,
# even flipping the last bit of 1% of the keys, gives a mean next-token KL of about 0.003 (the
# model's own noise floor); Q8 measured at that floor and Q4 at about 0.006. The bounds leave about
# 3x margin and still catch a broken codec (a garbled block gives a KL above 1).
@pytest.mark.parametrize("setup, move_to, bound, agree", [("q8", None, 0.01, 14),
                                                          ("q8", Tier.COOL, 0.02, 13)],
                         indirect=["setup"])
def test_quantized_restore_stays_close(setup, move_to, bound, agree, document_tokens):
    live, restored = store_and_restore(*setup, document_tokens, move_to)
    assert mean_kl(live, restored) < bound
    assert np.sum(live.argmax(axis=1) == restored.argmax(axis=1)) >= agree


@pytest.mark.parametrize("setup", ["q8"], indirect=True)
def test_snapshots_are_incremental(setup, document_tokens):
    hot, manager, snaps = setup
    prefill(hot, 0, document_tokens[:300])
    seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
    first_full = list(seq.full)
    assert len(first_full) == 1 and seq.tail_tokens == 44
    prefill(hot, 0, document_tokens[300:600])
    seq2 = snaps.save(hot.slots[0], seq)
    assert seq2.full[:1] == first_full            # block 0 was not written again
    assert len(seq2.full) == 2 and seq2.tail_tokens == 88
    assert manager.block_entry(seq.tail) is None   # the old tail was released
    assert sum(s.blocks for s in manager.stats()) == 3


# --- one unified KV cache with a scratch sequence (the hot tier's layout from issue 9 on) ------


@pytest.fixture
def unified(tmp_path, model, monkeypatch):
    """Two slots and the scratch sequence (id 2) in the hot tier's unified KV cache, f16 warm
    tier."""
    config = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 2,
                                "model.context_size": 1024, "tiers.warm_format": "f16"})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint("f16", "f16", 256).namespace
    # Chunks of one block (5.9 MB of KV each): the 700-token restores below go in three.
    monkeypatch.setattr(snapshot, "BLOCKS_PER_THREAD", 0)
    snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel(), restore_chunk_bytes=6 << 20)
    assert snaps.scratch_seq == 2
    yield hot, manager, snaps
    snaps.close()
    manager.close()
    hot.close()


def kv_of(hot: HotContext, seq_id: int) -> state_codec.SequenceState:
    return state_codec.parse(state_codec.read_state(hot.ptr, seq_id))


def test_chunked_restore_through_the_scratch_sequence_is_bit_exact(unified, document_tokens):
    # In a unified cache the logits of a sequence depend on where its cells sit among the other
    # sequences' (two slots prefilled with the same tokens differ by up to 0.87 here, with no
    # restore at all), so bit-exactness is checked on the KV itself.
    hot, manager, snaps = unified
    prompt = document_tokens[:N_PROMPT]
    prefill(hot, 0, prompt)
    seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
    plan = snaps.plan(prompt, manager.get_sequence(snaps.namespace, seq.seq_id))
    assert snaps.restore(hot.slots[1], plan, prompt).n_tokens == N_PROMPT
    live, restored = kv_of(hot, 0).caches[0], kv_of(hot, 1).caches[0]
    order = np.argsort(restored.positions)
    assert np.array_equal(restored.positions[order], live.positions)
    for layer in range(len(live.k)):
        assert np.array_equal(restored.k[layer][order], live.k[layer])
        assert np.array_equal(restored.v[layer][order], live.v[layer])
    assert hot.pos_range(hot.scratch) == (-1, -1)        # the scratch sequence is empty again


def test_chunked_restore_stops_at_a_damaged_block(unified, document_tokens):
    hot, manager, snaps = unified
    prompt = document_tokens[:N_PROMPT]
    prefill(hot, 0, prompt)
    seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
    key = seq.blocks[1].key(3).to_bytes()
    value = bytearray(manager.tiers[Tier.WARM].get(key))
    value[-7] ^= 0x20
    manager.tiers[Tier.WARM].put_many([(key, bytes(value))])
    plan = snaps.plan(prompt, manager.get_sequence(snaps.namespace, seq.seq_id))
    restored = snaps.restore(hot.slots[1], plan, prompt)
    assert restored.n_tokens == 256 and hot.pos_range(1) == (0, 255)
    assert hot.pos_range(hot.scratch) == (-1, -1)


def test_a_store_reads_only_the_cells_the_store_lacks(unified, document_tokens):
    hot, manager, snaps = unified
    prefill(hot, 0, document_tokens[:300])
    seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
    prefill(hot, 0, document_tokens[300:600])
    saved, job = snaps.prepare(hot.slots[0], seq)
    try:
        positions = state_codec.parse(job.buffer.view(job.nbytes)).caches[0].positions
        # Block 0 is stored: only the new full block and the tail were read (256..599).
        assert positions.min() == 256 and positions.max() == 599 and positions.size == 344
        assert [w.first_pos for w in job.blocks] == [256, 512]
        assert saved.full[0] == seq.full[0] and len(saved.full) == 2
    finally:
        snaps._inline_buffers.release(job.buffer)
    assert hot.pos_range(hot.scratch) == (-1, -1)
    assert hot.pos_range(0) == (0, 599)


def test_a_restore_chunk_gives_every_decoding_thread_two_blocks(unified, document_tokens,
                                                                  monkeypatch):
    hot, manager, snaps = unified
    monkeypatch.setattr(snapshot, "BLOCKS_PER_THREAD", 2)
    monkeypatch.setattr(snapshot, "n_cores", lambda: 3)
    prefill(hot, 0, document_tokens[:256 * 9])
    seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
    entries = [manager.block_entry(b) for b in seq.blocks]
    assert [len(c) for c in snaps._chunks(entries)] == [6, 3]

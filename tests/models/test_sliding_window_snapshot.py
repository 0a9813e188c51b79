"""Snapshot and restore on Gemma 3's two caches, compared with the live sequence's logits (the
method of ``tests/engine/test_snapshot.py``): the whole sequence, and a prefix of it whose window
rows were stored by parts of the read (llama.cpp's full-size window cache still held them); and a
prefix whose window rows were not stored is left to be recomputed."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.config import load_config
from kvtier.engine.hot import HotContext
from kvtier.engine.model import Model
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import Snapshotter, StoredSequence
from kvtier.storage.manager import TierManager
from tests.engine.conftest import document_text
from tests.engine.test_snapshot import next_logits, prefill

N_PROMPT = 800   # blocks 0..2 full, a tail of 32; the 512-position window starts at 288
N_CONTINUE = 4


@pytest.fixture
def gemma(tmp_path, gemma3):
    model = Model(gemma3)
    config = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 2,
                                "model.model_path": str(gemma3), "tiers.warm_format": "f16"})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    snaps = Snapshotter(hot, manager, model.fingerprint("f16", "f16", 256).namespace, 256,
                        ThroughputModel())
    yield model, hot, manager, snaps
    snaps.close()
    manager.close()
    hot.close()
    model.close()


@pytest.mark.parametrize("keep", [N_PROMPT, 512])
def test_a_restore_continues_as_the_live_sequence(gemma, keep):
    model, hot, manager, snaps = gemma
    tokens = model.tokenize(document_text()[10_000:20_000])
    slot = hot.slots[0]
    prefill(hot, 0, tokens[:N_PROMPT])
    seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
    assert seq.n_tokens(256) == N_PROMPT
    window_rows = [manager.get_block(b)[-1].n_tokens for b in seq.blocks]
    assert window_rows == [256, 256, 256, 32]   # every block's window rows, read in parts
    # Sizing's KV per token is llama.cpp's (Gemma's heads are 256 wide, not n_embd / n_head).
    assert model.kv_bytes_per_token("f16", "f16") == sum(c.row_bytes for c in snaps.layout.caches)

    hot.truncate(slot, keep)
    following = tokens[keep:keep + N_CONTINUE]
    live = np.stack([next_logits(hot, 0, int(t)) for t in following])
    plan = snaps.plan(tokens[:keep], manager.get_sequence(snaps.namespace, seq.seq_id))
    assert plan.n_tokens == keep
    hot.clear(slot)
    assert snaps.restore(slot, plan, tokens[:keep]).n_tokens == keep
    restored = np.stack([next_logits(hot, 0, int(t)) for t in following])
    assert np.array_equal(live, restored)


def test_a_prefix_whose_window_rows_were_not_stored_is_recomputed(gemma):
    """Blocks stored with only the last window's rows (as when llama.cpp had reused the cells the
    window passed): a prefix that needs older ones is not restored, rather than restored wrong."""
    model, hot, manager, snaps = gemma
    tokens = model.tokenize(document_text()[10_000:20_000])
    slot = hot.slots[0]
    prefill(hot, 0, tokens[:N_PROMPT])
    snaps._read_parts = lambda slot, writes: [(writes[0].first_pos, len(slot.tokens))]
    seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
    assert [manager.get_block(b)[-1].n_tokens for b in seq.blocks] == [0, 224, 256, 32]
    plan = snaps.plan(tokens[:600], None)
    assert plan.n_tokens == 512   # two full blocks by chain hash, which need rows from 0
    assert snaps.restore(slot, plan, tokens[:600]).n_tokens == 0
    assert hot.pos_range(0) == (-1, -1)


def test_a_slot_whose_window_cells_were_reused_keeps_no_prefix(tmp_path, gemma3):
    """With the window-sized cache (``model.swa_full`` off) llama.cpp reuses the cells its window
    passed: a branch from an early point of the slot's conversation cannot keep that prefix."""
    model = Model(gemma3)
    config = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 1,
                                "model.context_size": 2048, "model.swa_full": False,
                                "model.model_path": str(gemma3)})
    hot = HotContext.for_config(model, config)
    try:
        tokens = model.tokenize(document_text()[10_000:30_000])[:2000]
        prefill(hot, 0, tokens)
        oldest, _ = hot.pos_range(0)
        assert oldest > 600 - model.n_swa   # a 1,536-cell window cache has wrapped
        slot = hot.slots[0]
        assert hot.reusable(slot, 1990) == 1990
        assert hot.reusable(slot, 600) == 0
        assert hot.reusable(slot, oldest + model.n_swa - 1) == oldest + model.n_swa - 1
    finally:
        hot.close()
        model.close()

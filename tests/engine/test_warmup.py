"""The startup warm-up on the real default model: it runs llama.cpp's first decode and state
round trip before any request, and leaves nothing behind (the time it saves a first request is
measured by bench/bench_llama_server.py, not asserted here)."""

from __future__ import annotations

import numpy as np

from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest
from kvtier.engine.hot import HotContext
from kvtier.engine.warmup import warm_up
from tests.engine.engines import GREEDY, make_engine, settings


def test_warm_up_decodes_then_empties_its_slot(tmp_path, model):
    hot = HotContext.for_config(model, load_config(None, settings(tmp_path)))
    try:
        assert warm_up(hot, model) > 0
        logits = hot.logits(0)  # the warm-up's last decode left its logits
        assert np.isfinite(logits).all() and logits.any()
        slot = hot.slots[0]
        assert len(slot.tokens) == 0 and slot.owner is None and slot.last_used == 0.0
        assert hot.pos_range(slot.index) == (-1, -1)  # no cells left in its sequence
    finally:
        hot.close()


def test_a_started_engine_holds_and_stores_nothing_until_its_first_request(tmp_path):
    engine = make_engine(tmp_path)
    try:
        assert all(len(s.tokens) == 0 and s.last_used == 0.0
                   for s in engine._scheduler.hot.slots)
        assert engine.manager.sequences() == []
        assert sum(t.blocks for t in engine.manager.stats()) == 0
        assert engine.cache_stats().tokens.prefilled == 0
        result = engine.generate(GenerationRequest(prompt="1, 2, 3, 4,", sampling=GREEDY))
        assert result.usage.cached_tokens == 0
        assert engine.cache_stats().tokens.prefilled == result.usage.prompt_tokens
    finally:
        engine.close()

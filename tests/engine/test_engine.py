"""The engine facade on the real default model: context sizing, refusals, streaming, stats."""

from __future__ import annotations

import pytest

from kvtier.engine.api import GenerationRequest, SamplingParams, TokenEvent
from kvtier.errors import ContextOverflow, InvalidRequest, SessionNotFound
from kvtier.storage.tiers import Tier
from tests.engine.engines import GREEDY, chat, make_engine


def test_requests_that_cannot_run_are_refused(tmp_path):
    engine = make_engine(tmp_path, **{"model.context_size": 256})
    try:
        with pytest.raises(ContextOverflow):
            engine.submit(GenerationRequest(prompt="word " * 400, sampling=GREEDY))
        with pytest.raises(ContextOverflow):
            engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=999)))
        with pytest.raises(InvalidRequest):
            engine.submit(chat("hi", session="../../etc"))
        with pytest.raises(InvalidRequest):
            engine.submit(GenerationRequest(sampling=GREEDY))
        with pytest.raises(SessionNotFound):
            engine.get_session("nope")
    finally:
        engine.close()


def test_a_slots_hot_share_is_whole_blocks(tmp_path):
    # Regression: the context was rounded down to a multiple of 256 whatever the block size.
    engine = make_engine(tmp_path, **{"model.context_size": 1000, "model.block_size": 96})
    try:
        assert engine.sizing.slot_tokens == 960
        assert engine.context_size == 1000
    finally:
        engine.close()


def test_stop_strings_and_streaming_text_add_up(tmp_path):
    engine = make_engine(tmp_path)
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=40, stop=("\n",))
        handle = engine.submit(GenerationRequest(prompt="1, 2, 3, 4,", sampling=sampling))
        pieces = []
        for event in handle:
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
            else:
                final = event
        assert "".join(pieces) == final.text
        assert "\n" not in final.text
    finally:
        engine.close()


def test_cache_stats_count_what_a_request_did(tmp_path):
    engine = make_engine(tmp_path)
    try:
        result = engine.generate(GenerationRequest(prompt="1, 2, 3, 4,", sampling=GREEDY))
        engine.wait_stored()   # the reply comes first, the store after it
        stats = engine.cache_stats()
        assert [t.name for t in stats.tiers] == [t.label for t in Tier]
        assert stats.tiers[Tier.WARM].blocks == sum(t.blocks for t in stats.tiers) > 0
        assert stats.tokens.prefilled == result.usage.prefill_tokens
        assert stats.tokens.generated == result.usage.completion_tokens
        assert (stats.slots.total, stats.slots.busy, stats.slots.queued) == (2, 0, 0)
        assert len(stats.throughput.restore_tokens_per_s) == len(Tier)
        assert (stats.store.jobs, stats.store.failures, stats.store.queued_jobs) == (1, 0, 0)
        assert stats.store.blocks_written == stats.tiers[Tier.WARM].blocks
        assert stats.store.read_s > 0 and not stats.store.pinned   # a CPU build
    finally:
        engine.close()


def test_close_twice_is_harmless(tmp_path):
    engine = make_engine(tmp_path)
    engine.close()
    engine.close()

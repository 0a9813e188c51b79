"""Requests are answered before their KV is stored (but after their session's messages are): on
the real default model, a session's next turn waits for the previous one to be stored, and a store
that fails costs nothing but itself."""

from __future__ import annotations

import threading
import time

from kvtier.engine.api import ChatMessage, GenerationRequest
from kvtier.errors import TierFull
from tests.engine.engines import GREEDY, TURN_1, TURN_2, chat, make_engine


def test_a_session_turn_being_stored_is_waited_for(tmp_path):
    engine = make_engine(tmp_path)
    gate = threading.Event()
    save_sequence = engine.manager.save_sequence

    def slow_save_sequence(*args, **kwargs):
        gate.wait(30)
        return save_sequence(*args, **kwargs)

    engine.manager.save_sequence = slow_save_sequence
    try:
        first = engine.generate(chat(TURN_1, "s"))          # answered; its store is held
        assert engine.cache_stats().store.queued_jobs == 1
        # The answered turn is in the catalog already, its KV not yet: the session names an
        # empty sequence until the writer stores it, so a crash now loses no message.
        entry = engine.manager.get_session("s")
        assert [m["role"] for m in entry.data["messages"]] == ["user", "assistant"]
        assert entry.data["messages"][1]["content"] == first.text
        assert engine.manager.get_sequence(entry.namespace, entry.sequence).n_tokens == 0
        results: list = []
        second = threading.Thread(target=lambda: results.append(
            engine.generate(chat(TURN_2, "s"))))
        second.start()
        time.sleep(0.5)
        assert not results                                    # waiting for turn 1's store
        gate.set()
        second.join(120)
        turn_2 = results[0]
        # Turn 2 saw turn 1: its prompt holds it, and its KV was still in the slot.
        turn_1_tokens = first.usage.prompt_tokens + first.usage.completion_tokens
        assert turn_2.usage.prompt_tokens > turn_1_tokens
        assert turn_2.usage.cached_tokens >= first.usage.prompt_tokens
        info = engine.get_session("s")
        assert [m["role"] for m in info.messages] == ["user", "assistant"] * 2
        engine.wait_stored()
        assert engine.manager.check(fix=False).problems == []
    finally:
        gate.set()
        engine.close()


def test_a_failed_store_is_counted_and_the_next_one_stores_afresh(tmp_path):
    engine = make_engine(tmp_path, **{"model.n_slots": 1})
    put_block = engine.manager.put_block
    failures = iter([True])

    def failing_put_block(*args, **kwargs):
        if next(failures, False):
            raise TierFull("the warm tier is full (a test)")
        return put_block(*args, **kwargs)

    engine.manager.put_block = failing_put_block
    try:
        first = engine.generate(chat(TURN_1))
        assert first.finish_reason in ("stop", "length")      # answered all the same
        engine.wait_stored()
        stats = engine.cache_stats().store
        assert (stats.jobs, stats.failures) == (1, 1)
        follow_up = GenerationRequest(messages=(ChatMessage("user", TURN_1),
                                                ChatMessage("assistant", first.text),
                                                ChatMessage("user", TURN_2)), sampling=GREEDY)
        engine.generate(follow_up)
        engine.wait_stored()
        assert engine.cache_stats().store.failures == 1
        # The second store wrote the whole conversation, not just what the first was to add.
        (sequence,) = engine.manager.sequences()
        assert sequence.blocks and all(engine.manager.block_entry(b) is not None
                                       for b in sequence.block_ids())
    finally:
        engine.close()

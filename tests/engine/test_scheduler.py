"""The engine thread on the real default model: sharing, restoring, batching, cancelling, and
which stored sequence a request's KV goes to."""

from __future__ import annotations

import pytest

from kvtier.engine.api import ChatMessage, GenerationRequest, SamplingParams, TokenEvent
from kvtier.ggml import Q8_0
from kvtier.storage import codec
from kvtier.storage.tiers import Tier
from tests.engine.conftest import document_text
from tests.engine.engines import GREEDY, TURN_1, TURN_2, chat, make_engine


def test_shared_system_prompt_is_stored_once(tmp_path):
    system = document_text()[:3000]
    engine = make_engine(tmp_path)
    try:
        engine.generate(chat("Summarise that.", "a", system=system))
        engine.generate(chat("What is it about?", "b", system=system))
        engine.wait_stored()
        ns = engine.namespace
        seqs = [engine.manager.get_sequence(ns, engine.manager.get_session(s).sequence)
                for s in "ab"]
        blocks_a, blocks_b = (s.block_ids() for s in seqs)
        shared = [x for x, y in zip(blocks_a, blocks_b) if x == y]
        n_shared_tokens = len(engine.model.tokenize(engine.model.render_chat(
            [{"role": "system", "content": system}], add_generation_prompt=False)))
        assert len(shared) == n_shared_tokens // engine.block_size >= 2
        assert all(engine.manager.block_entry(b).refs == 2 for b in shared)
        stored = sum(s.blocks for s in engine.manager.stats())
        assert stored == len(set(blocks_a) | set(blocks_b))
    finally:
        engine.close()


@pytest.mark.slow
def test_corrupt_block_falls_back_to_recomputation(tmp_path):
    prompt = document_text()[:4000]
    request = GenerationRequest(prompt=prompt, sampling=GREEDY)
    engine = make_engine(tmp_path, **{"tiers.warm_format": "f16"})
    first = engine.generate(request)
    n_blocks = first.usage.prompt_tokens // engine.block_size
    assert n_blocks >= 3
    engine.close()

    engine = make_engine(tmp_path, **{"tiers.warm_format": "f16"})
    try:
        tokens = engine.model.tokenize(prompt)
        blocks = engine.manager.match_prefix(engine.namespace, tokens, engine.block_size)
        key = blocks[1].key(5).to_bytes()
        value = bytearray(engine.manager.tiers[Tier.WARM].get(key))
        value[1000] ^= 0xFF
        engine.manager.tiers[Tier.WARM].put_many([(key, bytes(value))])
        again = engine.generate(request)
        assert again.text == first.text
        assert again.usage.restored_tokens == engine.block_size  # block 0 only
        assert engine.manager.stats()[Tier.WARM].corrupt == 1
    finally:
        engine.close()


def test_concurrent_requests_share_batches_and_cancel_frees_the_slot(tmp_path):
    engine = make_engine(tmp_path)
    try:
        long = SamplingParams(temperature=0.7, max_tokens=200, seed=1)
        handles = [engine.submit(chat(f"Tell me a story about {w}.", sampling=long))
                   for w in ("a cat", "a dog", "a bird")]  # three requests, two slots
        events = iter(handles[0])
        assert isinstance(next(events), TokenEvent)
        handles[0].cancel()
        results = [h.result() for h in handles]
        assert results[0].finish_reason == "cancelled"
        assert results[0].usage.completion_tokens < 200
        assert all(r.finish_reason in ("length", "stop") for r in results[1:])
        assert engine.cache_stats().slots.busy == 0
    finally:
        engine.close()


@pytest.mark.slow
def test_quantized_cache_blocks_are_stored_as_they_are_and_restore_exactly(tmp_path):
    q8 = {"model.cache_type_k": "q8_0", "model.cache_type_v": "q8_0"}
    request = GenerationRequest(prompt=document_text()[:2000], sampling=GREEDY)
    engine = make_engine(tmp_path, **q8)
    first = engine.generate(request)
    engine.close()
    engine = make_engine(tmp_path, **q8)
    try:
        block = engine.manager.match_prefix(engine.namespace, engine.model.tokenize(
            request.prompt), engine.block_size)[0]
        _, records = engine.manager.read_records(block)
        header = codec.read_header(records[0])
        assert (header.k.ggml_type, header.k.encoding) == (Q8_0.id, codec.RAW)  # kept as is
        again = engine.generate(request)
        assert again.usage.restored_tokens >= engine.block_size
        assert again.text == first.text
    finally:
        engine.close()


def test_stateless_request_never_rewrites_a_resident_session(tmp_path):
    # Regression: a stateless request that extended the session held by its slot used to
    # continue the session's stored sequence and overwrite it.
    engine = make_engine(tmp_path, **{"model.n_slots": 1})
    try:
        first = engine.generate(chat(TURN_1, "s"))
        engine.wait_stored()
        entry = engine.manager.get_session("s")
        before = engine.manager.get_sequence(engine.namespace, entry.sequence)
        follow_up = GenerationRequest(messages=(ChatMessage("user", TURN_1),
                                                ChatMessage("assistant", first.text),
                                                ChatMessage("user", TURN_2)), sampling=GREEDY)
        result = engine.generate(follow_up)
        assert result.usage.cached_tokens > 0
        engine.wait_stored()
        after = engine.manager.get_sequence(engine.namespace, entry.sequence)
        assert after.tokens == before.tokens and after.blocks == before.blocks
    finally:
        engine.close()


def test_stateless_follow_up_extends_the_resident_anonymous_conversation(tmp_path):
    # The other side of the slot-owner rule: a stateless conversation continues its own stored
    # sequence, so its second turn adds blocks instead of starting a sequence of its own.
    engine = make_engine(tmp_path, **{"model.n_slots": 1})
    try:
        first = engine.generate(chat(TURN_1))
        engine.wait_stored()
        sequences = {s.sequence for s in engine.manager.sequences()}
        follow_up = GenerationRequest(messages=(ChatMessage("user", TURN_1),
                                                ChatMessage("assistant", first.text),
                                                ChatMessage("user", TURN_2)), sampling=GREEDY)
        result = engine.generate(follow_up)
        assert result.usage.cached_tokens > 0
        engine.wait_stored()
        assert {s.sequence for s in engine.manager.sequences()} == sequences
    finally:
        engine.close()

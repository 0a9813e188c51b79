"""Clients that resend their whole history (no session id), on the real engine: interleaved
conversations keep their own hot slots, and a conversation whose slot was reused, or whose server
restarted, gets its whole previous turn back from the store and computes only the new tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.engine.api import ChatMessage, Finished, GenerationRequest
from kvtier.engine.engine import Engine
from tests.engine.conftest import document_text
from tests.engine.engines import GREEDY, make_engine

QUESTIONS = ("Summarise the text.", "What is the main keyword?", "Give one example.")


@dataclass
class Client:
    """An OpenAI-style client: every request carries the whole conversation so far."""

    document: str
    messages: list[ChatMessage] = field(default_factory=list)
    turns: list[Finished] = field(default_factory=list)

    def ask(self, engine: Engine) -> Finished:
        if not self.messages:
            self.messages.append(ChatMessage("system", "Answer questions about this text.\n\n"
                                             + self.document))
        self.messages.append(ChatMessage("user", QUESTIONS[len(self.turns) % len(QUESTIONS)]))
        result = engine.generate(GenerationRequest(messages=tuple(self.messages),
                                                   sampling=GREEDY))
        self.messages.append(ChatMessage("assistant", result.text))
        self.turns.append(result)
        return result

    def previous_turn_tokens(self) -> int:
        """Tokens the KV of the previous turn holds: its prompt, its reply, and the end-of-turn
        token that ended the reply (the next prompt renders it too)."""
        last = self.turns[-2]
        return last.usage.prompt_tokens + last.usage.completion_tokens \
            + (last.finish_reason == "stop")


def clients(n: int) -> list[Client]:
    """Conversations over different ~350-token documents: a full block and a partial tail."""
    text = document_text()
    return [Client(text[20_000 * (i + 1):20_000 * (i + 1) + 1400]) for i in range(n)]


def assert_continued_hot(client: Client) -> None:
    usage = client.turns[-1].usage
    assert usage.cached_tokens == client.previous_turn_tokens()
    assert usage.restored_tokens == 0
    assert usage.prefill_tokens == usage.prompt_tokens - usage.cached_tokens


def assert_restored_whole_turn(client: Client) -> None:
    usage = client.turns[-1].usage
    assert usage.restored_tokens == usage.cached_tokens == client.previous_turn_tokens()
    assert usage.prefill_tokens == usage.prompt_tokens - usage.cached_tokens


def test_interleaved_full_history_clients_each_continue_their_own_hot_slot(tmp_path):
    # Regression (issue 9, item 7): the second conversation shares the chat template's first
    # tokens with the first, took its slot, and from then on both restored every turn from the
    # store and recomputed the tokens past the last full block.
    engine = make_engine(tmp_path)
    try:
        a, b = clients(2)
        for _ in range(2):
            a.ask(engine)
            b.ask(engine)
        for client in (a, b):
            assert client.turns[0].usage.prompt_tokens > engine.block_size
            assert_continued_hot(client)
        owners = [slot.owner for slot in engine._scheduler.hot.slots]
        assert None not in owners and len(set(owners)) == 2  # one conversation in each slot
    finally:
        engine.close()


def test_a_follow_up_whose_slot_was_reused_restores_its_whole_turn(tmp_path):
    engine = make_engine(tmp_path, **{"model.n_slots": 1})
    try:
        a, b = clients(2)
        a.ask(engine)
        b.ask(engine)  # takes the only slot
        a.ask(engine)
        assert a.previous_turn_tokens() % engine.block_size  # the turn ends in a partial block
        assert_restored_whole_turn(a)
        b.ask(engine)
        assert_restored_whole_turn(b)
    finally:
        engine.close()


def test_a_follow_up_after_a_restart_restores_its_whole_turn(tmp_path):
    a, = clients(1)
    engine = make_engine(tmp_path)
    try:
        a.ask(engine)
    finally:
        engine.close()
    engine = make_engine(tmp_path)
    try:
        a.ask(engine)
        assert_restored_whole_turn(a)
        a.ask(engine)
        assert_continued_hot(a)
    finally:
        engine.close()

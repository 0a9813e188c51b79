"""Full-history clients (the official ``openai`` client, no session id) against a real server:
interleaved conversations each continue their own slot, and after a restart a follow-up gets its
whole previous turn back from the store."""

from __future__ import annotations

from dataclasses import dataclass, field

import openai

from tests.engine.conftest import document_text
from tests.http.conftest import free_port, running_server, server_config


@dataclass
class Client:
    """Sends the whole conversation every time, as most OpenAI clients do."""

    document: str
    messages: list[dict[str, str]] = field(default_factory=list)
    turn_tokens: int = 0
    """Tokens of the previous turn: its prompt, its reply and the end-of-turn token, if any."""

    def ask(self, client: openai.OpenAI, question: str) -> int:
        """Asks the next question; returns the cached prompt tokens the server reported."""
        if not self.messages:
            self.messages.append({"role": "system", "content": self.document})
        self.messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model=client.models.list().data[0].id,
                                               messages=self.messages,
                                               max_tokens=8, temperature=0)
        choice = reply.choices[0]
        self.messages.append({"role": "assistant", "content": choice.message.content})
        usage = reply.usage
        self.turn_tokens = usage.prompt_tokens + usage.completion_tokens \
            + (choice.finish_reason == "stop")
        return usage.prompt_tokens_details.cached_tokens


def test_full_history_clients_continue_their_slots_and_survive_a_restart(tmp_path):
    text = document_text()
    a, b = (Client(text[40_000 * i:40_000 * i + 1400]) for i in (1, 2))
    config = server_config(tmp_path / "data")
    with running_server(config) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="-", max_retries=0, timeout=120)
        a.ask(client, "What is this about?")
        b.ask(client, "What is this about?")
        for question in ("Give an example.", "Anything else?"):
            for c in (a, b):
                previous = c.turn_tokens
                assert c.ask(client, question) == previous
    config.server.listen = f"127.0.0.1:{free_port()}"
    with running_server(config) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="-", max_retries=0, timeout=120)
        previous = a.turn_tokens
        assert previous % 256  # the turn ends inside a partial block: its tail was stored
        assert a.ask(client, "One more thing?") == previous
        _, stats = server.json("GET", "/v1/cache/stats")
        assert stats["tokens"]["restored"] == previous

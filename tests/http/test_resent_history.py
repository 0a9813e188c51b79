"""A client that resends the whole conversation and also names a session_id (what an OpenAI
client configured with a session does): the session stores each message once."""

from __future__ import annotations

import openai

from tests.http.conftest import Server
from tests.http.test_sessions import new_id


def test_resent_history_is_stored_once_and_comes_from_the_cache(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="-", max_retries=0, timeout=120)
    sid = new_id("resent")
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "My name is Ada. Remember it."}]
    first = client.chat.completions.create(model="local", messages=messages, max_tokens=4,
                                           temperature=0, extra_body={"session_id": sid})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "What is my name?"}]
    second = client.chat.completions.create(model="local", messages=messages, max_tokens=4,
                                            temperature=0, extra_body={"session_id": sid})
    messages.append({"role": "assistant", "content": second.choices[0].message.content})

    _, info = server.json("GET", f"/v1/sessions/{sid}")
    assert info["messages"] == messages
    history = first.usage.prompt_tokens + first.usage.completion_tokens
    # The second prompt is the history and the new message, not the history twice over.
    assert history < second.usage.prompt_tokens < 2 * history
    assert second.usage.prompt_tokens_details.cached_tokens >= history - 1


def test_history_that_differs_is_all_new(server: Server) -> None:
    sid = new_id("differs")
    hi = {"role": "user", "content": "Hi"}
    for _ in range(2):
        status, body = server.json("POST", "/v1/chat/completions", {
            "messages": [hi], "max_tokens": 1, "temperature": 0, "session_id": sid})
        assert status == 200, body
    _, info = server.json("GET", f"/v1/sessions/{sid}")
    # The second request did not begin with the stored [hi, reply]: its message is a new turn.
    assert [m["role"] for m in info["messages"]] == ["user", "assistant"] * 2


def test_only_the_stored_history_again_is_refused(server: Server) -> None:
    sid = new_id("repeat")
    messages = [{"role": "user", "content": "Hi"}]
    status, first = server.json("POST", "/v1/chat/completions", {
        "messages": messages, "max_tokens": 2, "temperature": 0, "session_id": sid})
    assert status == 200, first
    messages.append(first["choices"][0]["message"])
    status, body = server.json("POST", "/v1/chat/completions", {
        "messages": messages, "max_tokens": 2, "session_id": sid})
    assert status == 400 and body["error"]["param"] == "messages"
    _, info = server.json("GET", f"/v1/sessions/{sid}")
    assert len(info["messages"]) == 2

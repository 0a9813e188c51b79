"""Many clients at once: more streams than slots all finish, disconnects free slots, a full queue
answers 429 with Retry-After."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.http.conftest import Server, running_server, server_config

CHAT = "/v1/chat/completions"


def _stream(server: Server, i: int) -> tuple[str, int, str | None]:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": f"Client {i} says hello."}],
        max_tokens=4, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, chunks[-1].usage.completion_tokens, finish


def test_more_streams_than_slots_all_finish(server: Server) -> None:
    n_clients = server.config.model.n_slots * 2 + 1
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(lambda i: _stream(server, i), range(n_clients)))
    for text, completion_tokens, finish in results:
        assert text
        assert (finish, completion_tokens) in {("length", 4)} or \
            (finish == "stop" and completion_tokens < 4)
    _wait_idle(server)


def _slots(server: Server) -> dict[str, int]:
    return server.json("GET", "/v1/cache/stats")[1]["slots"]


def _wait_idle(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slots = _slots(server)
        if slots["busy"] == 0 and slots["queued"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"slots still busy: {_slots(server)}")


def _open_stream(server: Server, body: dict[str, Any]) -> tuple[http.client.HTTPConnection,
                                                                 http.client.HTTPResponse]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", CHAT, json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def _metric(server: Server, name: str) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_disconnect_stops_generation_and_frees_the_slot(server: Server) -> None:
    _wait_idle(server)
    before = _metric(server, "kvtier_client_disconnects_total")
    sid = f"dropped-{time.monotonic_ns()}"
    conn, response = _open_stream(server, {
        "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
        "max_tokens": 500, "session_id": sid})
    assert response.readline().startswith(b"data: ")  # the role chunk
    response.readline()
    assert response.readline().startswith(b"data: ")  # a first token
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    started = time.monotonic()
    _wait_idle(server, timeout=10)
    assert time.monotonic() - started < 10
    # The slot serves the next request, and the session kept what was generated.
    status, body = server.json("POST", CHAT, {"messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 1})
    assert status == 200
    _, info = server.json("GET", f"/v1/sessions/{sid}")
    assert info["messages"][-1]["role"] == "assistant"
    assert 0 < len(info["messages"][-1]["content"])
    assert _metric(server, "kvtier_client_disconnects_total") == before + 1


def test_disconnect_while_queued_never_runs(tmp_path: Path) -> None:
    config = server_config(tmp_path, **{"model.n_slots": 1, "server.max_queue": 4})
    with running_server(config) as srv:
        busy_conn, busy = _open_stream(srv, {
            "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 40})
        busy.readline()
        # This one waits for the only slot, then its client gives up before it gets one.
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        waiting = http.client.HTTPConnection(host, int(port), timeout=60)
        waiting.request("POST", CHAT, json.dumps({
            "messages": [{"role": "user", "content": "Queued"}], "max_tokens": 200,
            "stream": True}), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while _slots(srv)["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _slots(srv)["queued"] == 1
        waiting.sock.close()
        waiting.close()
        busy_conn.close()
        _wait_idle(srv, timeout=10)
        # Only the first request generated anything (and at most its 40 tokens).
        generated = srv.json("GET", "/v1/cache/stats")[1]["tokens"]["generated"]
        assert 0 < generated <= 40


def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    config = server_config(tmp_path, **{"model.n_slots": 1, "server.max_queue": 0})
    with running_server(config) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0)
        conn, response = _open_stream(srv, {
            "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 300})
        response.readline()
        status, headers, raw = srv.request("POST", CHAT, {
            "messages": [{"role": "user", "content": "Me too"}], "max_tokens": 1})
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        error = json.loads(raw)["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "x"}],
                                           max_tokens=1)
        conn.close()
        _wait_idle(srv)
        assert srv.request("POST", CHAT, {"messages": [{"role": "user", "content": "Now"}],
                                          "max_tokens": 1})[0] == 200

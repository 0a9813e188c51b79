"""Two real kvtier servers (in-process, on loopback ports, the real default model) over one real
Redis Cluster: sessions and prefixes move between them, a lease keeps one writer per session, and
a Redis master killed mid-run fails no request that recomputation can serve."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.http.conftest import Server, running_server, server_config
from tests.remote.cluster import Cluster

CHAT = "/v1/chat/completions"
BS = 64
SYSTEM = " ".join(f"Rule {i}: answer politely and briefly, citing rule {i}." for i in range(20))


@pytest.fixture(scope="module")
def servers(redis_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Server, Server]]:
    """Servers A and B, f16 warm and remote blocks (exact restores), 64-token blocks."""
    redis_cluster.flush()
    overrides = {"tiers.remote_url": redis_cluster.url, "tiers.warm_format": "f16",
                 "tiers.remote_format": "f16", "model.block_size": BS}
    with running_server(server_config(tmp_path_factory.mktemp("a"), **overrides)) as a, \
            running_server(server_config(tmp_path_factory.mktemp("b"), **overrides)) as b:
        for srv in (a, b):
            srv.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
        yield a, b


def chat(server: Server, text: str, max_tokens: int = 6, system: str | None = None,
         **fields: Any) -> tuple[int, dict[str, Any]]:
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": text}]
    return server.json("POST", CHAT, {"messages": messages, "max_tokens": max_tokens,
                                      "temperature": 0, **fields})


def stats(server: Server) -> dict[str, Any]:
    status, body = server.json("GET", "/v1/cache/stats")
    assert status == 200
    return body


def wait_sent(server: Server, sessions: int = 0, timeout: float = 60) -> dict[str, Any]:
    """Until the server stored its requests and sent them (and ``sessions`` session writes)."""
    deadline = time.monotonic() + timeout
    while True:
        remote = stats(server)["remote"]
        if remote["queued"] == 0 and remote["sessions_written"] >= sessions and \
                stats(server)["store"]["queued_jobs"] == 0:
            return remote
        assert time.monotonic() < deadline, remote
        time.sleep(0.2)


def chat_retrying(server: Server, text: str, timeout: float = 60, **fields: Any
                  ) -> tuple[int, dict[str, Any]]:
    """:func:`chat`, again while the session is leased (409): the server that wrote it keeps
    the lease until its turn is published, as a client that retries would see."""
    deadline = time.monotonic() + timeout
    while (reply := chat(server, text, **fields))[0] == 409:
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)
    return reply


def sid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_session_started_on_a_resumes_on_b(servers: tuple[Server, Server]) -> None:
    a, b = servers
    shared, alone = sid("moved"), sid("stays")
    first = {}
    for session in (shared, alone):
        status, first[session] = chat(a, "My name is Ada. Remember it.", system=SYSTEM,
                                      session_id=session)
        assert status == 200, first[session]
    assert first[shared]["choices"][0]["message"] == first[alone]["choices"][0]["message"]
    written = stats(a)["remote"]["sessions_written"]
    wait_sent(a, sessions=written)
    status, on_b = chat_retrying(b, "What is my name?", session_id=shared)
    assert status == 200, on_b
    status, on_a = chat_retrying(a, "What is my name?", session_id=alone)
    assert status == 200, on_a
    history = first[shared]["usage"]["prompt_tokens"]
    assert on_b["usage"]["prompt_tokens_details"]["cached_tokens"] >= history
    assert on_b["usage"]["prompt_tokens"] == on_a["usage"]["prompt_tokens"]
    assert on_b["choices"][0]["message"]["content"] == on_a["choices"][0]["message"]["content"]
    status, info = b.json("GET", f"/v1/sessions/{shared}")
    assert status == 200 and len(info["messages"]) == 5    # system, 2 turns
    assert stats(b)["remote"]["blocks_fetched"] > 0


def test_a_system_prompt_computed_on_a_is_restored_on_b(servers: tuple[Server, Server]) -> None:
    a, b = servers
    system = SYSTEM + " Today is a shared day."
    status, _ = chat(a, "Hello there.", system=system)
    assert status == 200
    wait_sent(a)
    status, body = chat(b, "Good morning.", system=system)
    assert status == 200, body
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * BS


def test_a_second_server_gets_409_while_the_first_writes_the_session(
        servers: tuple[Server, Server]) -> None:
    a, b = servers
    session = sid("leased")
    status, _ = chat(a, "Count to three.", max_tokens=2, session_id=session)
    assert status == 200
    wait_sent(a, sessions=stats(a)["remote"]["sessions_written"])
    started = threading.Event()
    done: dict[str, Any] = {}

    def long_reply() -> None:
        req = urllib.request.Request(a.url + CHAT, method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({
                "messages": [{"role": "user", "content": "Now count to one hundred."}],
                "max_tokens": 120, "temperature": 0, "stream": True,
                "session_id": session}).encode())
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.readline()
            started.set()
            done["body"] = resp.read()
    thread = threading.Thread(target=long_reply)
    thread.start()
    assert started.wait(120)
    status, body = chat(b, "Stop.", session_id=session)
    assert status == 409, body
    assert body["error"]["code"] == "session_busy"
    thread.join(300)
    assert b"[DONE]" in done["body"]
    status, _ = chat_retrying(b, "Stop.", max_tokens=2, session_id=session)
    assert status == 200
    status, info = b.json("GET", f"/v1/sessions/{session}")
    assert status == 200 and len(info["messages"]) == 6    # A's two turns, then B's


def test_a_master_killed_mid_run_fails_no_request(servers: tuple[Server, Server],
                                                  redis_cluster: Cluster) -> None:
    a, b = servers
    session = sid("fault")
    assert chat(a, "Remember the number 7.", session_id=session)[0] == 200
    wait_sent(a)
    victim = redis_cluster.master_nodes()[0]
    victim.kill()
    try:
        # Every request is answered: a session continued on B (A's copy is unreachable or
        # partial: recomputed), new prompts on both, the session again on A.
        for server, text, fields in ((b, "What number?", {"session_id": session}),
                                     (a, "Hello.", {"system": SYSTEM + " Faults."}),
                                     (b, "Hello.", {"system": SYSTEM + " Faults."}),
                                     (a, "And now?", {"session_id": session})):
            status, body = chat_retrying(server, text, max_tokens=3, **fields)
            assert status == 200, body
        errors = [stats(s)["remote_errors"] for s in (a, b)]
        assert all(e > 0 for e in errors), errors
        assert all(not stats(s)["remote"]["available"] or stats(s)["remote"]["queued"] >= 0
                   for s in (a, b))
        _, _, metrics = a.request("GET", "/metrics")
        assert b"kvtier_remote_errors_total" in metrics
    finally:
        victim.start()
        redis_cluster.wait_ok()
    # Redis is back: what A queued meanwhile is sent, and A's session is shared again.
    assert chat_retrying(a, "Once more.", max_tokens=2, session_id=session)[0] == 200
    remote = wait_sent(a, timeout=90)
    assert remote["available"]

"""Hostile input (issue 12): oversized prompts are refused without stalling the server, /health
never waits on a thread, and connections that never finish a request are closed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvtier.engine.api import GenerationRequest
from kvtier.errors import Overloaded
from kvtier.http.auth import ApiKeys
from kvtier.http.common import ServerState
from kvtier.http.generation import _submit
from tests.http.conftest import Server, running_server, server_config

SEVEN_MIB = 7 * 1024**2


def _block_default_executor(server: Server, gate: threading.Event) -> None:
    """Fill the server loop's default executor (sessions, stats, metrics) until ``gate``."""
    loop = server.loop
    assert loop is not None
    loop.call_soon_threadsafe(lambda: [loop.run_in_executor(None, gate.wait)
                                       for _ in range(64)])


def test_big_prompts_and_health_need_no_shared_thread(server: Server) -> None:
    """8 concurrent 7 MiB prompts are refused by their length, and /health and a small chat
    answer, all while every thread of the default executor is taken: tokenizing has its own
    executor and /health reads statistics kept by a background task."""
    gate = threading.Event()
    _block_default_executor(server, gate)
    try:
        big = {"messages": [{"role": "user", "content": "word " * (SEVEN_MIB // 5)}],
               "max_tokens": 1}
        with ThreadPoolExecutor(9) as pool:
            bigs = [pool.submit(server.json, "POST", "/v1/chat/completions", big)
                    for _ in range(8)]
            health = pool.submit(server.json, "GET", "/health")
            assert health.result(timeout=60)[0] == 200
            for future in bigs:
                status, body = future.result(timeout=120)
                assert status == 400 and body["error"]["code"] == "context_length_exceeded"
                assert "at least" in body["error"]["message"]
        status, body = server.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        assert status == 200, body
        assert server.json("GET", "/health")[0] == 200
    finally:
        gate.set()


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_connections_that_never_finish_a_request_are_closed(tmp_path: Path) -> None:
    config = server_config(tmp_path, **{"server.read_timeout_s": 0.5})
    with running_server(config) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        # Half-open: headers that never end. The server closes the connection, saying nothing.
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert _recv_all(sock) == b""
        # Idle: connected, nothing sent.
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            assert _recv_all(sock) == b""
        # A body that stops arriving: 408.
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
            head, _, body = _recv_all(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert srv.request("GET", "/health")[0] == 200


def test_too_many_requests_waiting_to_be_tokenized_get_429() -> None:
    """The prepare executor's queue is bounded: beyond it a request is refused before it is
    queued (the engine is never reached)."""
    state = ServerState(engine=None, metrics=None, keys=ApiKeys({}),  # type: ignore[arg-type]
                        public_paths=frozenset(), preparing=10, max_preparing=10)
    with pytest.raises(Overloaded, match="10 requests are waiting"):
        asyncio.run(_submit(state, GenerationRequest(prompt="Hi")))
    assert state.preparing == 10

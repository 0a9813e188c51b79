"""Shutdown: generations still running when the grace period ends are cut cleanly, and what they
generated is kept."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any


from tests.http.conftest import Server, running_server, server_config

CHAT = "/v1/chat/completions"


def _connect(server: Server) -> http.client.HTTPConnection:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def test_shutdown_cuts_long_generations_cleanly(tmp_path: Path) -> None:
    config = server_config(tmp_path)
    config.server.shutdown_grace_s = 0.3
    long = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 600}
    results: dict[str, Any] = {}
    context = running_server(config)
    srv = context.__enter__()
    try:
        stream_conn = _connect(srv)
        stream_conn.request("POST", CHAT, json.dumps({**long, "stream": True,
                                                      "session_id": "cut-stream"}),
                            {"Content-Type": "application/json"})
        stream = stream_conn.getresponse()
        stream.readline()

        def plain() -> None:
            results["plain"] = srv.json("POST", CHAT, {**long, "session_id": "cut-plain"})

        thread = threading.Thread(target=plain)
        thread.start()
        deadline = time.monotonic() + 10
        while srv.json("GET", "/v1/cache/stats")[1]["slots"]["busy"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        context.__exit__(None, None, None)  # stop: drain for 0.3 s, cut, close the engine
    thread.join(30)
    rest = stream.read().decode()
    stream_conn.close()
    events = [e[len("data: "):] for e in rest.split("\n\n") if e]
    error = json.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    status, body = results["plain"]
    assert status == 503 and body["error"]["code"] == "shutting_down"

    # Nothing was lost: both sessions hold their partial replies after a restart.
    with running_server(server_config(tmp_path)) as again:
        for sid in ("cut-stream", "cut-plain"):
            status, info = again.json("GET", f"/v1/sessions/{sid}")
            assert status == 200
            assert info["messages"][-1]["role"] == "assistant"
            assert info["messages"][-1]["content"]

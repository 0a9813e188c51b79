"""Two ``kvtier serve`` processes over one real Redis Cluster (the issue's setting: separate
processes, separate local stores): a session started on A is resumed on B from A's blocks."""

from __future__ import annotations

from tests.http.conftest import free_port
from tests.http.test_sessions import Process
from tests.remote.cluster import Cluster

CHAT = "/v1/chat/completions"


def test_a_session_started_in_one_process_resumes_in_another(tmp_path, cluster: Cluster
                                                              ) -> None:
    sets = (f"tiers.remote_url={cluster.url}", "model.block_size=64")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = Process(tmp_path / "a" / "data", free_port(), sets)
    b = Process(tmp_path / "b" / "data", free_port(), sets)
    try:
        status, first = a.server.json("POST", CHAT, {
            "session_id": "moved", "max_tokens": 4,
            "messages": [{"role": "user", "content": "My name is Ada. " * 20}]})
        assert status == 200, first
        assert a.stop() == 0        # a clean stop sends what is queued to the remote tier
        status, second = b.server.json("POST", CHAT, {
            "session_id": "moved", "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is my name?"}]})
        assert status == 200, second
        history = first["usage"]["prompt_tokens"]
        assert second["usage"]["prompt_tokens"] > history
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= history - 64
        status, info = b.server.json("GET", "/v1/sessions/moved")
        assert status == 200 and [m["role"] for m in info["messages"]] == \
            ["user", "assistant", "user", "assistant"]
    finally:
        for process in (a, b):
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()

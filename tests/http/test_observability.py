"""/health, /v1/cache/stats, /metrics and the access log."""

from __future__ import annotations

import http.client
import json
import logging
import time

import pytest

from tests.http.conftest import Server

CHAT = "/v1/chat/completions"


def test_health(server: Server) -> None:
    status, body = server.json("GET", "/health")
    assert status == 200
    assert body["status"] == "ok"
    assert body["model"].startswith("SmolLM2-135M")
    assert body["slots"]["total"] == server.config.model.n_slots
    assert [t["name"] for t in body["cache"]] == ["hot", "warm", "cool", "cold"]
    assert body["hot"]["slots"] == server.config.model.n_slots


def test_hot_tier_is_tier_0(server: Server) -> None:
    status, body = server.json("POST", "/v1/completions", {
        "prompt": "The hot tier holds this prompt", "max_tokens": 3, "temperature": 0})
    assert status == 200
    held = body["usage"]["total_tokens"]
    _, stats = server.json("GET", "/v1/cache/stats")
    hot = stats["hot"]
    kv = 30 * 192 * 2 * 2                   # SmolLM2: 30 layers, 192 K and 192 V values, f16
    slots = server.config.model.n_slots
    assert hot["slots"] == slots
    assert held <= hot["tokens"] <= slots * 1024
    assert hot["bytes"] == hot["tokens"] * kv
    assert hot["budget"] == slots * 1024 * kv
    assert hot["blocks"] >= -(-held // 256)
    assert stats["tiers"][0] == {
        "name": "hot", "blocks": hot["blocks"], "bytes": hot["bytes"], "budget": hot["budget"],
        "compression_ratio": 1.0, "hits": 0, "misses": 0, "promotions": 0, "demotions": 0,
        "drops": 0, "corrupt": 0, "write_errors": 0}
    assert [t["name"] for t in stats["tiers"]] == ["hot", "warm", "cool", "cold"]
    wanted = {"name": "hot", "blocks": hot["blocks"], "bytes": hot["bytes"]}
    for _ in range(50):   # /health reads statistics refreshed every STATS_REFRESH_S
        _, health = server.json("GET", "/health")
        if health["cache"][0] == wanted:
            break
        time.sleep(0.1)
    assert health["cache"][0] == wanted
    text = server.request("GET", "/metrics")[2].decode()
    assert f'kvtier_tier_bytes{{tier="hot"}} {float(hot["bytes"])}' in text
    assert f"kvtier_hot_tokens {float(hot['tokens'])}" in text


def test_cache_stats(server: Server) -> None:
    server.json("POST", "/v1/completions", {"prompt": "Stats", "max_tokens": 2})
    status, stats = server.json("GET", "/v1/cache/stats")
    assert status == 200 and stats["object"] == "cache.stats"
    for tier in stats["tiers"]:
        assert {"name", "blocks", "bytes", "budget", "compression_ratio", "hits", "misses",
                "promotions", "demotions", "drops"} <= set(tier)
    assert all(tier["budget"] > 0 for tier in stats["tiers"])
    assert stats["tokens"]["generated"] >= 2
    assert set(stats["slots"]) == {"total", "busy", "queued"}


def test_metrics(server: Server) -> None:
    status, body = server.json("POST", "/v1/completions", {"prompt": "Metrics", "max_tokens": 2})
    assert status == 200
    status, headers, raw = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    assert 'kvtier_http_requests_total{method="POST",route="/v1/completions",status="200"}' \
        in text
    assert 'kvtier_tier_blocks{tier="warm"}' in text
    assert 'kvtier_engine_tokens_total{kind="generated"}' in text
    assert 'kvtier_slots{state="total"}' in text
    assert "kvtier_time_to_first_token_seconds_bucket" in text
    assert 'kvtier_request_tokens_total{kind="cached"}' in text
    # Routes with ids are counted under their template, not one series per id.
    server.request("GET", "/v1/sessions/some-id-123")
    text = server.request("GET", "/metrics")[2].decode()
    assert 'route="/v1/sessions/{session_id}"' in text and "some-id-123" not in text


def test_one_access_log_line_per_request(server: Server, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    with caplog.at_level(logging.INFO, logger="kvtier.http.access"):
        status, body = server.json("POST", CHAT, {
            "messages": [{"role": "user", "content": "Log me"}], "max_tokens": 2})
        server.request("GET", "/v1/sessions/nope-nope")
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "kvtier.http.access"]
    usage = body["usage"]
    assert any(line.startswith(
        f"POST /v1/chat/completions 200 prompt={usage['prompt_tokens']} "
        f"cached={usage['prompt_tokens_details']['cached_tokens']} completion=2 ")
        and line.endswith("s") for line in lines), lines
    assert any(line.startswith("GET /v1/sessions/nope-nope 404 - ") for line in lines), lines


def test_event_loop_answers_while_generating(server: Server) -> None:
    """llama.cpp runs on the engine thread: the loop answers /health during a generation."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", CHAT, json.dumps({
        "messages": [{"role": "user", "content": "Write a long poem."}], "max_tokens": 60,
        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    try:
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            assert server.request("GET", "/health")[0] == 200
            latencies.append(time.monotonic() - started)
        assert max(latencies) < 0.5, latencies
    finally:
        conn.close()

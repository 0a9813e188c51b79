"""Bad input: every malformed request gets OpenAI error JSON with the right status and type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.http.conftest import Server, running_server, server_config

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
INVALID = "invalid_request_error"


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": HI, "max_tokens": 1, **fields}


# (id, method, path, JSON body or raw bytes, extra headers, status, type, code, param)
CASES: list[tuple[str, str, str, Any, dict[str, str], int, str, str | None, str | None]] = [
    ("malformed-json", "POST", CHAT, b'{"messages": [', {}, 400, INVALID, None, None),
    ("not-utf8", "POST", CHAT, b'\xff\xfe\x00{', {}, 400, INVALID, None, None),
    ("nan-literal", "POST", CHAT, b'{"messages": [], "temperature": NaN}', {}, 400, INVALID,
     None, None),
    ("deeply-nested", "POST", CHAT, b"[" * 100_000 + b"]" * 100_000, {}, 400, INVALID, None,
     None),
    ("empty-body", "POST", CHAT, b"", {}, 400, INVALID, None, None),
    ("body-is-a-list", "POST", CHAT, [1, 2], {}, 400, INVALID, None, None),
    ("missing-messages", "POST", CHAT, {"model": "x"}, {}, 400, INVALID, None, "messages"),
    ("empty-messages", "POST", CHAT, {"messages": []}, {}, 400, INVALID, None, "messages"),
    ("messages-not-array", "POST", CHAT, {"messages": "Hi"}, {}, 400, INVALID, None,
     "messages"),
    ("bad-role", "POST", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, {}, 400,
     INVALID, None, "messages[0].role"),
    ("missing-role", "POST", CHAT, {"messages": [{"content": "x"}]}, {}, 400, INVALID, None,
     "messages[0].role"),
    ("content-number", "POST", CHAT, {"messages": [{"role": "user", "content": 3}]}, {}, 400,
     INVALID, None, "messages[0].content"),
    ("image-part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, {}, 400, INVALID, None,
     "messages[0].content"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), {}, 400, INVALID, None,
     "temperature"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=2.5), {}, 400, INVALID, None,
     "temperature"),
    ("top-p-negative", "POST", CHAT, chat(top_p=-0.1), {}, 400, INVALID, None, "top_p"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), {}, 400, INVALID, None,
     "max_tokens"),
    ("max-tokens-float", "POST", CHAT, chat(max_tokens=1.5), {}, 400, INVALID, None,
     "max_tokens"),
    ("max-tokens-bool", "POST", CHAT, chat(max_tokens=True), {}, 400, INVALID, None,
     "max_tokens"),
    ("stream-string", "POST", CHAT, chat(stream="yes"), {}, 400, INVALID, None, "stream"),
    ("stop-too-many", "POST", CHAT, chat(stop=["a"] * 17), {}, 400, INVALID, None, "stop"),
    ("stop-empty-string", "POST", CHAT, chat(stop=""), {}, 400, INVALID, None, "stop"),
    ("n-two", "POST", CHAT, chat(n=2), {}, 400, INVALID, None, "n"),
    ("logprobs", "POST", CHAT, chat(logprobs=True), {}, 400, INVALID, None, "logprobs"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function"}]), {}, 400, INVALID, None,
     "tools"),
    ("json-mode", "POST", CHAT, chat(response_format={"type": "json_object"}), {}, 400,
     INVALID, None, "response_format.type"),
    ("seed-huge", "POST", CHAT, chat(seed=2**70), {}, 400, INVALID, None, "seed"),
    ("session-path-injection", "POST", CHAT, chat(session_id="../../etc"), {}, 400, INVALID,
     None, "session_id"),
    ("session-too-long", "POST", CHAT, chat(session_id="a" * 129), {}, 400, INVALID, None,
     "session_id"),
    ("session-header-bad", "POST", CHAT, chat(), {"X-Session-Id": "a b"}, 400, INVALID, None,
     "session_id"),
    ("session-non-ascii", "POST", CHAT, chat(session_id="séance"), {}, 400, INVALID, None,
     "session_id"),
    ("context-overflow", "POST", CHAT, chat(messages=[
        {"role": "user", "content": "word " * 1500}]), {}, 400, INVALID,
     "context_length_exceeded", None),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=100_000), {}, 400, INVALID,
     "context_length_exceeded", None),
    ("prompt-missing", "POST", COMPLETIONS, {"max_tokens": 1}, {}, 400, INVALID, None,
     "prompt"),
    ("prompt-token-ids", "POST", COMPLETIONS, {"prompt": [1, 2, 3]}, {}, 400, INVALID, None,
     "prompt"),
    ("prompt-two-strings", "POST", COMPLETIONS, {"prompt": ["a", "b"]}, {}, 400, INVALID,
     None, "prompt"),
    ("echo", "POST", COMPLETIONS, {"prompt": "a", "echo": True}, {}, 400, INVALID, None,
     "echo"),
    ("prompt-overflow", "POST", COMPLETIONS, {"prompt": "word " * 1500, "max_tokens": 1}, {},
     400, INVALID, "context_length_exceeded", None),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, INVALID, "not_found", None),
    ("wrong-method", "GET", CHAT, None, {}, 405, INVALID, "method_not_allowed", None),
    ("session-missing", "GET", "/v1/sessions/never-made", None, {}, 404, INVALID,
     "session_not_found", None),
    ("session-id-dots", "GET", "/v1/sessions/a..b", None, {}, 400, INVALID, None,
     "session_id"),
    ("session-id-encoded-slash", "GET", "/v1/sessions/a%2Fb", None, {}, 400, INVALID, None,
     "session_id"),
    ("delete-missing", "DELETE", "/v1/sessions/never-made", None, {}, 404, INVALID,
     "session_not_found", None),
    ("fork-missing", "POST", "/v1/sessions/never-made/fork", {}, {}, 404, INVALID,
     "session_not_found", None),
    ("fork-bad-new-id", "POST", "/v1/sessions/never-made/fork", {"new_id": "x/y"}, {}, 400,
     INVALID, None, "new_id"),
    ("list-limit-zero", "GET", "/v1/sessions?limit=0", None, {}, 400, INVALID, None, "limit"),
    ("list-limit-text", "GET", "/v1/sessions?limit=ten", None, {}, 400, INVALID, None,
     "limit"),
    ("list-after-bad", "GET", "/v1/sessions?after=%00", None, {}, 400, INVALID, None, "after"),
    # A lone surrogate is valid JSON but has no UTF-8 form (issue 12: it was a 500).
    ("surrogate-content", "POST", CHAT, (b'{"messages": [{"role": "user", "content": '
                                         b'"a\\ud800"}]}'), {}, 400, INVALID, None,
     "messages[0].content"),
    ("surrogate-content-part", "POST", CHAT, (b'{"messages": [{"role": "user", "content": '
                                              b'[{"type": "text", "text": "\\udfff"}]}]}'),
     {}, 400, INVALID, None, "messages[0].content"),
    ("surrogate-second-message", "POST", CHAT, (b'{"messages": [{"role": "system", "content": '
                                                b'"ok"}, {"role": "user", "content": '
                                                b'"\\ud83d"}]}'), {}, 400, INVALID, None,
     "messages[1].content"),
    ("surrogate-prompt", "POST", COMPLETIONS, b'{"prompt": "\\ud800x"}', {}, 400, INVALID,
     None, "prompt"),
    ("surrogate-prompt-array", "POST", COMPLETIONS, b'{"prompt": ["\\ud800"]}', {}, 400,
     INVALID, None, "prompt"),
    ("surrogate-stop", "POST", COMPLETIONS, b'{"prompt": "a", "stop": "\\ud800"}', {}, 400,
     INVALID, None, "stop"),
]


def _check_error(status: int, headers: dict[str, str], raw: bytes, expected_status: int,
                 type_: str, code: str | None, param: str | None) -> dict[str, Any]:
    assert status == expected_status, raw[:300]
    assert headers["Content-Type"].startswith("application/json")
    body = json.loads(raw)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["code"] == code and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "type_", "code",
                          "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request(server: Server, method: str, path: str, body: Any,
                           headers: dict[str, str], status: int, type_: str, code: str | None,
                           param: str | None) -> None:
    raw = body if isinstance(body, bytes) else None
    got_status, got_headers, data = server.request(
        method, path, None if raw is not None else body, headers=headers, raw=raw)
    _check_error(got_status, got_headers, data, status, type_, code, param)


def test_wrong_method_names_the_allowed_ones(server: Server) -> None:
    _, headers, _ = server.request("DELETE", "/v1/models")
    assert headers["Allow"] == "GET"


def test_nulls_mean_defaults(server: Server) -> None:
    status, body = server.json("POST", CHAT, chat(temperature=None, stop=None, seed=None,
                                                  stream=None, user=None, extra_field=1))
    assert status == 200, body


def test_body_size_limit(tmp_path: Path) -> None:
    config = server_config(tmp_path, **{"server.max_body_bytes": 4096})
    with running_server(config) as srv:
        status, headers, data = srv.request("POST", CHAT, chat(messages=[
            {"role": "user", "content": "x" * 5000}]))
        _check_error(status, headers, data, 413, INVALID, "request_too_large", None)
        status, _, _ = srv.request("POST", CHAT, chat())
        assert status == 200


def test_api_key(tmp_path: Path) -> None:
    with running_server(server_config(tmp_path), api_key="s3cret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            status, got, data = srv.request("GET", "/v1/models", headers=headers, auth=False)
            _check_error(status, got, data, 401, "authentication_error", "invalid_api_key",
                         None)
            assert got["WWW-Authenticate"] == "Bearer"
        # Even a bad request is refused before its body is read.
        status, got, data = srv.request("POST", CHAT, raw=b"{", auth=False)
        assert status == 401
        assert srv.request("GET", "/v1/models")[0] == 200
        assert srv.request("GET", "/health", auth=False)[0] == 200
        assert srv.request("GET", "/metrics", auth=False)[0] == 401


def test_api_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_API_KEY", "from-env")
    with running_server(server_config(tmp_path)) as srv:
        assert srv.request("GET", "/v1/models")[0] == 401
        status, _, _ = srv.request("GET", "/v1/models",
                                   headers={"Authorization": "Bearer from-env"})
        assert status == 200

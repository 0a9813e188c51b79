"""Tenants: one key each, sessions owned per tenant, no token-granular reuse across tenants,
and CORS (issue 12)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.errors import ConfigError
from kvtier.http.auth import api_keys_of
from tests.http.conftest import Server, running_server, server_config

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
KEYS = {"alice": "key-alice", "bob": "key-bob"}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Alice and Bob in api_keys, Carol in a keys file, the default tenant's key; one origin."""
    data = tmp_path_factory.mktemp("kvtier-tenants")
    keys_file = data / "keys.txt"
    keys_file.write_text("# tenant key\ncarol  key-carol  # from the file\n\n")
    config = server_config(data / "store", **{
        **{f"server.api_keys.{tenant}": key for tenant, key in KEYS.items()},
        "server.api_keys_file": str(keys_file), "server.cors_origins": [ORIGIN]})
    with running_server(config, api_key="key-default") as srv:
        yield srv


def as_(tenant: str) -> dict[str, str]:
    key = {"default": "key-default", "carol": "key-carol"}.get(tenant) or KEYS[tenant]
    return {"Authorization": f"Bearer {key}"}


def call(srv: Server, tenant: str, method: str, path: str, body: Any = None
         ) -> tuple[int, Any]:
    return srv.json(method, path, body, headers=as_(tenant), auth=False)


def chat(srv: Server, tenant: str, text: str, session_id: str) -> dict[str, Any]:
    status, body = call(srv, tenant, "POST", CHAT, {
        "messages": [{"role": "user", "content": text}], "max_tokens": 2, "temperature": 0,
        "session_id": session_id})
    assert status == 200, body
    return body


def test_sessions_belong_to_their_tenant(tenants: Server) -> None:
    chat(tenants, "alice", "Alice's secret plan", "plan")
    status, info = call(tenants, "alice", "GET", "/v1/sessions/plan")
    assert status == 200 and info["id"] == "plan"
    for method, path, body in (("GET", "/v1/sessions/plan", None),
                               ("DELETE", "/v1/sessions/plan", None),
                               ("POST", "/v1/sessions/plan/fork", {"new_id": "stolen"})):
        status, error = call(tenants, "bob", method, path, body)
        assert status == 404 and error["error"]["code"] == "session_not_found", (method, error)
    assert call(tenants, "bob", "GET", "/v1/sessions")[1]["data"] == []
    assert call(tenants, "default", "GET", "/v1/sessions")[1]["data"] == []

    # Bob's "plan" is another session with the same id: continuing it never reads Alice's.
    bob = chat(tenants, "bob", "Bob's own plan", "plan")
    assert bob["session_id"] == "plan"
    assert bob["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, bobs = call(tenants, "bob", "GET", "/v1/sessions/plan")
    assert [m["content"] for m in bobs["messages"] if m["role"] == "user"] == ["Bob's own plan"]
    _, alices = call(tenants, "alice", "GET", "/v1/sessions/plan")
    assert [m["content"] for m in alices["messages"] if m["role"] == "user"] == \
        ["Alice's secret plan"]

    # Forks stay in their tenant; each list shows its own.
    status, fork = call(tenants, "alice", "POST", "/v1/sessions/plan/fork", {"new_id": "plan-b"})
    assert status == 200 and fork["id"] == "plan-b" and fork["parent"] == "plan"
    assert [s["id"] for s in call(tenants, "alice", "GET", "/v1/sessions")[1]["data"]] == \
        ["plan", "plan-b"]
    assert [s["id"] for s in call(tenants, "bob", "GET", "/v1/sessions")[1]["data"]] == ["plan"]
    assert call(tenants, "carol", "GET", "/v1/sessions/plan-b")[0] == 404
    # Paging within a tenant.
    _, page = call(tenants, "alice", "GET", "/v1/sessions?limit=1")
    assert [s["id"] for s in page["data"]] == ["plan"] and page["has_more"]
    _, page = call(tenants, "alice", "GET", "/v1/sessions?after=plan")
    assert [s["id"] for s in page["data"]] == ["plan-b"] and not page["has_more"]

    assert call(tenants, "bob", "DELETE", "/v1/sessions/plan")[0] == 200
    assert call(tenants, "alice", "GET", "/v1/sessions/plan")[0] == 200


def _guess(srv: Server, tenant: str, prompt: str) -> int:
    status, body = call(srv, tenant, "POST", COMPLETIONS,
                        {"prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert status == 200, body
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cached_tokens_do_not_reveal_another_tenants_prompt(tenants: Server) -> None:
    """Issue 12's attack: guesses scored by cached_tokens recovered a prompt token by token.
    Across tenants, reuse is whole stored blocks only, so a right and a wrong guess of what
    follows them score the same."""
    block = tenants.config.model.block_size
    filler = " ".join(f"item{i}" for i in range(120))
    secret = f"{filler}. The vault code is 4817, keep it."
    first = _guess(tenants, "alice", secret)
    assert _guess(tenants, "alice", secret) > first   # a tenant reuses its own KV
    right = _guess(tenants, "bob", secret)
    wrong = _guess(tenants, "carol", f"{filler}. The vault code is 9817, keep it.")
    assert right == wrong
    assert right % block == 0


def test_key_names_the_tenant(tenants: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer key-mallory"},
                    {"Authorization": "Bearer key-alice-and-more"}):
        assert tenants.request("GET", "/v1/models", headers=headers, auth=False)[0] == 401
    for tenant in ("alice", "bob", "carol", "default"):
        assert tenants.request("GET", "/v1/models", headers=as_(tenant), auth=False)[0] == 200


def test_cors_preflight_needs_no_key(tenants: Server) -> None:
    status, headers, _ = tenants.request(
        "OPTIONS", CHAT, auth=False, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    # Answers (errors too, and streams) carry the origin, so a page can read them.
    status, headers, _ = tenants.request("GET", "/v1/models", auth=False,
                                         headers={"Origin": ORIGIN, **as_("alice")})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Session-Id" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = tenants.request("GET", "/v1/models", auth=False,
                                         headers={"Origin": ORIGIN})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, data = tenants.request(
        "POST", COMPLETIONS, {"prompt": "Hi", "max_tokens": 1, "stream": True}, auth=False,
        headers={"Origin": ORIGIN, **as_("alice")})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert data.endswith(b"data: [DONE]\n\n")
    # Another origin gets nothing: its preflight is a plain 401/405 and no header is added.
    status, headers, _ = tenants.request(
        "OPTIONS", CHAT, auth=False, headers={"Origin": "https://evil.example",
                                              "Access-Control-Request-Method": "POST"})
    assert status in (401, 405) and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = tenants.request("GET", "/v1/models", auth=False, headers={
        "Origin": "https://evil.example", **as_("alice")})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_keys_are_checked_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    for text, message in (("alice\n", "expected 'TENANT KEY'"),
                          ("a/b key\n", "a tenant name"),
                          ("alice k1\nbob k1\n", "one key is given to the tenants")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            api_keys_of(server_config(tmp_path, **{"server.api_keys_file": str(bad)}))
    with pytest.raises(ConfigError, match="cannot read"):
        api_keys_of(server_config(tmp_path, **{"server.api_keys_file": str(tmp_path / "no")}))
    with pytest.raises(ConfigError, match="server.api_keys"):
        server_config(tmp_path, **{"server.api_keys.a b": "k"})
    keys = api_keys_of(server_config(tmp_path, **{"server.api_keys.x": "kx"}))
    assert keys.tenant_of("kx") == "x" and keys.tenant_of("ky") is None
    assert json.loads(json.dumps(sorted(keys.tenants.values()))) == ["x"]

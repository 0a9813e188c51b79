"""/openapi.json is valid OpenAPI 3.1, true to the routes, and fuzzing it finds no 5xx."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance,
                                               status_code_conformance)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from kvtier.http.app import ROUTES, openapi_document
from tests.http.conftest import Server

DOC = openapi_document(auth=False)  # the shared server has no API key
GENERATION = {"/v1/chat/completions", "/v1/completions"}


def _validator(doc: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    """A validator for one component schema, with the document's other components in reach."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema_rs.Draft202012Validator(schema)


def test_document_validates_against_the_openapi_31_schema(server: Server) -> None:
    status, served = server.json("GET", "/openapi.json")
    assert status == 200
    OPENAPI_31_VALIDATOR.validate(served)
    assert served == json.loads(json.dumps(DOC))
    schemathesis.openapi.from_dict(served).validate()


def test_every_route_is_documented_and_every_documented_route_exists(server: Server) -> None:
    documented = {(method.upper(), path) for path, ops in DOC["paths"].items() for method in ops}
    served = {(r.method, r.path) for r in ROUTES}
    assert documented == served
    for method, path in documented:
        concrete = path.replace("{session_id}", "no-such-session").replace("{model}", "nope")
        status, _, _ = server.request(method, concrete, {} if method == "POST" else None)
        assert status != 405 and status < 500, (method, path)


def test_every_component_schema_compiles() -> None:
    for name in DOC["components"]["schemas"]:
        _validator(DOC, name)


def test_with_an_api_key_the_document_declares_bearer_security() -> None:
    doc = openapi_document(auth=True)
    OPENAPI_31_VALIDATOR.validate(doc)
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "401" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert "401" not in DOC["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_responses_match_their_documented_schemas(server: Server) -> None:
    sid = "openapi-doc-check"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "session_id": sid}
    cases = [
        ("POST", "/v1/chat/completions", chat, "ChatCompletion"),
        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, "Completion"),
        ("GET", "/v1/models", None, "ModelList"),
        ("GET", "/v1/sessions?limit=5", None, "SessionList"),
        ("GET", f"/v1/sessions/{sid}", None, "Session"),
        ("POST", f"/v1/sessions/{sid}/fork", {}, "Session"),
        ("GET", "/v1/cache/stats", None, "CacheStats"),
        ("GET", "/health", None, "Health"),
        ("GET", "/v1/sessions/missing-one", None, "Error"),
        ("DELETE", f"/v1/sessions/{sid}", None, "SessionDeleted"),
    ]
    for method, path, body, name in cases:
        status, data = server.json(method, path, body)
        errors = list(_validator(DOC, name).iter_errors(data))
        assert not errors, (path, status, [str(e) for e in errors])


def test_stream_chunks_match_their_documented_schemas(server: Server) -> None:
    for path, body, name in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
         "ChatCompletionChunk"),
        ("/v1/completions", {"prompt": "Hi"}, "CompletionChunk"),
    ]:
        body.update(max_tokens=3, stream=True, stream_options={"include_usage": True})
        status, headers, raw = server.request("POST", path, body)
        assert status == 200 and headers["Content-Type"] == "text/event-stream"
        events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]"
        validator = _validator(DOC, name)
        for event in events[:-1]:
            chunk = json.loads(event)
            assert not list(validator.iter_errors(chunk)), chunk
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 3


# -- a bounded schemathesis run against the live server ---------------------------------------

SCHEMA = schemathesis.openapi.from_dict(DOC)


def _bounded(case: schemathesis.Case) -> None:
    """Generation with at most two tokens: fuzzing is about the edge, not the model. Only valid
    values are lowered, so that a request generated to be invalid stays invalid."""
    if case.operation.path not in GENERATION or not isinstance(case.body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 2 < value <= 2**31 - 1:
            case.body[key] = 2
    if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
        case.body["max_tokens"] = 2


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzing_finds_no_server_errors(case: schemathesis.Case, server: Server) -> None:
    _bounded(case)
    case.call_and_validate(base_url=server.url, timeout=120, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, negative_data_rejection])

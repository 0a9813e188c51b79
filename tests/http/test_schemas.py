"""The request validator and the JSON Schema it publishes accept exactly the same bodies."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import InvalidRequest
from kvtier.http import schemas as s
from kvtier.http.schemas import JsonSchema, Object

VALUES = st.sampled_from([
    None, True, False, 0, 1, -1, 2, 1.5, 2.0, 3.0, -2.5, 2**31, 2**63, 2**70, "", "x", "text",
    "user", "a b", "../x", "é", [], ["a"], [""], ["a"] * 17, [1], [{"type": "text", "text": "t"}],
    [{"type": "image_url"}], {}, {"type": "text"}, {"type": "json_object"},
    {"include_usage": True}, {"include_usage": "yes"}, {"role": "user", "content": "c"},
    [{"role": "user", "content": "c"}], [{"role": "robot"}], [{"content": "c"}],
])
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}


def _validator(schema: Object) -> jsonschema_rs.Validator:
    components: dict[str, JsonSchema] = {}
    ref = schema.json_schema(components)
    return jsonschema_rs.Draft202012Validator({**ref, "components": {"schemas": components}})


def _accepts(schema: Object, body: Any) -> bool:
    try:
        schema.check(body, "")
    except InvalidRequest:
        return False
    return True


def _mutations(base: dict[str, Any], schema: Object) -> st.SearchStrategy[dict[str, Any]]:
    names = [f.name for f in schema.fields] + ["unknown_field"]
    nested = ["messages.0.role", "messages.0.content", "stream_options.include_usage",
              "response_format.type"]
    return st.dictionaries(st.sampled_from(names + nested), VALUES, max_size=3).map(
        lambda changes: _apply(base, changes))


def _apply(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(base))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target: Any = body
        for part in parents:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and isinstance(target.get(part), (dict, list)):
                target = target[part]
            else:
                target = None
                break
        if isinstance(target, dict):
            target[leaf] = value
    return body


@pytest.mark.parametrize(("schema", "base"), [(s.CHAT_REQUEST, CHAT),
                                              (s.COMPLETION_REQUEST, COMPLETION)],
                         ids=["chat", "completion"])
def test_validator_agrees_with_published_schema(schema: Object, base: dict[str, Any]) -> None:
    validator = _validator(schema)

    @settings(max_examples=400, deadline=None, database=None)
    @given(_mutations(base, schema))
    def check(body: dict[str, Any]) -> None:
        assert _accepts(schema, body) == validator.is_valid(body), body

    check()


def test_errors_name_the_parameter() -> None:
    with pytest.raises(InvalidRequest) as exc:
        s.CHAT_REQUEST.check({"messages": [{"role": "user", "content": [
            {"type": "text", "text": 1}]}]}, "")
    assert exc.value.param == "messages[0].content"
    with pytest.raises(InvalidRequest) as exc:
        s.CHAT_REQUEST.check({**CHAT, "stream_options": {"include_usage": 1}}, "")
    assert exc.value.param == "stream_options.include_usage"


def test_parse_chat_maps_onto_the_engine_types() -> None:
    parsed = s.parse_chat({
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "temperature": 0,
        "seed": 3, "stream": True, "stream_options": {"include_usage": True},
        "session_id": "body"}, "header", "req-1")
    request = parsed.request
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."),
                                                                ("user", "ab")]
    assert request.sampling.max_tokens == 7 and request.sampling.stop == ("x",)
    assert request.sampling.temperature == 0 and request.sampling.seed == 3
    assert request.session_id == "body" and request.request_id == "req-1"
    assert parsed.stream and parsed.include_usage
    assert s.parse_chat(CHAT, "from-header", "r").request.session_id == "from-header"
    assert s.parse_completion(COMPLETION, None, "r").request.sampling.max_tokens == 2
    assert s.parse_completion({"prompt": ["p"]}, None, "r").request.sampling.max_tokens == 16

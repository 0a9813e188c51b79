"""The request models and the JSON Schema /openapi.json publishes accept the same bodies."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kvtier.errors import InvalidRequest
from kvtier.http import schemas as s
from kvtier.http.app import openapi_document

DOC = openapi_document(auth=False)
VALUES = st.sampled_from([
    None, True, False, 0, 1, -1, 2, 1.5, 2.0, 3.0, -2.5, 2**31, 2**63, 2**70, "", "x", "text",
    "user", "a b", "../x", "é", [], ["a"], [""], ["a"] * 17, [1], [{"type": "text", "text": "t"}],
    [{"type": "image_url"}], {}, {"type": "text"}, {"type": "json_object"},
    {"include_usage": True}, {"include_usage": "yes"}, {"role": "user", "content": "c"},
    [{"role": "user", "content": "c"}], [{"role": "robot"}], [{"content": "c"}],
])
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}


def _validator(model: type[BaseModel]) -> jsonschema_rs.Validator:
    """The published schema of ``model``, with the document's components in reach."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}", "components": DOC["components"]}
    return jsonschema_rs.Draft202012Validator(schema)


def _accepts(model: type[BaseModel], body: Any) -> bool:
    try:
        s.parse(model, body)
    except InvalidRequest:
        return False
    return True


def _mutations(base: dict[str, Any], model: type[BaseModel]
               ) -> st.SearchStrategy[dict[str, Any]]:
    names = [*model.model_fields, "unknown_field"]
    nested = ["messages.0.role", "messages.0.content", "messages.0.content.0.extra",
              "stream_options.include_usage", "response_format.type"]
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
            # A copy: hypothesis may hand the same object to two paths, one inside the other.
            target[leaf] = copy.deepcopy(value)
    return body


@pytest.mark.parametrize(("model", "base"), [(s.ChatCompletionRequest, CHAT),
                                             (s.CompletionRequest, COMPLETION)],
                         ids=["chat", "completion"])
def test_validator_agrees_with_published_schema(model: type[BaseModel], base: dict[str, Any]
                                                ) -> None:
    validator = _validator(model)

    @settings(max_examples=400, deadline=None, database=None)
    @given(_mutations(base, model))
    def check(body: dict[str, Any]) -> None:
        assert _accepts(model, body) == validator.is_valid(body), body

    check()


def test_errors_name_the_parameter() -> None:
    with pytest.raises(InvalidRequest) as exc:
        s.parse(s.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": 1}]}]})
    assert exc.value.param == "messages[0].content"
    with pytest.raises(InvalidRequest) as exc:
        s.parse(s.ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": 1}})
    assert exc.value.param == "stream_options.include_usage"
    assert str(exc.value) == "stream_options.include_usage: expected true or false, got 1"
    with pytest.raises(InvalidRequest) as exc:
        s.parse(s.ChatCompletionRequest, [CHAT])
    assert exc.value.param is None and str(exc.value).startswith("body: expected an object")


@pytest.mark.parametrize(("body", "param", "message"), [
    ({**CHAT, "temperature": 2.5}, "temperature", "must be at most 2"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens", "expected an integer, got 1.5"),
    ({**CHAT, "logprobs": 0}, "logprobs", "log probabilities are not supported"),
    ({"messages": [{"role": "robot"}]}, "messages[0].role",
     "must be one of 'system', 'developer', 'user' or 'assistant', got \"robot\""),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
     "messages[0].content", "must be a string or an array of text parts"),
    ({"model": "x"}, "messages", "is required"),
])
def test_messages_say_what_is_wrong(body: Any, param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        s.parse(s.ChatCompletionRequest, body)
    assert exc.value.param == param
    assert str(exc.value) == f"{param}: {message}"


def test_nulls_and_integral_floats() -> None:
    chat = s.parse(s.ChatCompletionRequest, {**CHAT, "temperature": None, "stop": None,
                                             "stream_options": None, "max_tokens": 3.0,
                                             "unknown": None})
    assert chat.temperature == 0.8 and chat.stop is None and chat.max_tokens == 3
    assert not chat.stream_options.include_usage


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
    with pytest.raises(InvalidRequest) as exc:
        s.parse_chat(CHAT, "a b", "r")
    assert exc.value.param == "session_id"


def test_importing_the_schemas_loads_no_llama_cpp() -> None:
    code = ("import sys, kvtier.http.schemas, kvtier.http.responses; "
            "print(sorted(m for m in ('llama_cpp', 'numpy', 'numba', 'lmdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

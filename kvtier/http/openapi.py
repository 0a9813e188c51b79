"""The OpenAPI 3.1 document, generated from the route table the application registers.

Every operation and parameter comes from :class:`Route` entries, and every body schema from the
pydantic models the handlers validate requests with and build responses from
(``model_json_schema``, shared schemas as ``components/schemas`` with ``$ref``s), so the document
cannot drift from the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from kvtier.http.responses import Error
from kvtier.http.schemas import SessionId

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JsonSchema = dict[str, Any]

_REF = "#/components/schemas/{model}"
_PATH_TYPES: dict[str, Any] = {"session_id": SessionId}
"""Path parameters that are not plain strings."""
_UNAUTHORIZED = "Missing or wrong API key."
_INTERNAL = "Internal error (JSON, never a traceback)."
_INVALID = "Malformed JSON or an invalid parameter."
_TOO_LARGE = "The body exceeds server.max_body_bytes."


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    responses: dict[int, tuple[str, type[BaseModel] | None]]
    """Status → (description, JSON body model); None for a non-JSON body."""
    request: type[BaseModel] | None = None
    request_required: bool = True
    query: type[BaseModel] | None = None
    """A model whose fields are the query parameters."""
    headers: dict[str, Any] = field(default_factory=dict)
    """Request header → its type."""
    stream: type[BaseModel] | None = None
    """The chunk model of the ``text/event-stream`` answer to ``"stream": true``."""
    text: str = ""
    """Media type of a non-JSON 200 body (e.g. Prometheus text)."""
    public: bool = False
    """Answered without the API key."""
    tags: tuple[str, ...] = ()
    errors: dict[int, str] = field(default_factory=dict)
    """Operation-specific error statuses (the body is the Error schema)."""


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema, without a title on every property (its name says it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _type_schema(type_: Any) -> JsonSchema:
    return TypeAdapter(type_).json_schema(ref_template=_REF, schema_generator=_Schema)


def _not_null(schema: JsonSchema) -> JsonSchema:
    """A query parameter is absent or a string, never null."""
    options = [o for o in schema.get("anyOf", ()) if o != {"type": "null"}]
    if len(options) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf" and (k, v) != ("default", None)}
    return {**options[0], **rest}


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = [{"name": name, "in": "path", "required": True,
               "schema": _type_schema(_PATH_TYPES.get(name, str))}
              for name in _path_names(route.path)]
    if route.query is not None:
        schema = route.query.model_json_schema(ref_template=_REF, schema_generator=_Schema)
        required = set(schema.get("required", ()))
        params += [{"name": name, "in": "query", "required": name in required,
                    "schema": _not_null(prop)} for name, prop in schema["properties"].items()]
    params += [{"name": name, "in": "header", "required": False, "schema": _type_schema(type_)}
               for name, type_ in route.headers.items()]
    return params


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _models(routes: list[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every body model once: requests as validated, responses as serialized."""
    found: dict[type[BaseModel], JsonSchemaMode] = {Error: "serialization"}
    for route in routes:
        if route.request is not None:
            found[route.request] = "validation"
        for _, model in route.responses.values():
            if model is not None:
                found[model] = "serialization"
        if route.stream is not None:
            found[route.stream] = "serialization"
    return list(found.items())


def _operation(route: Route, refs: dict[type[BaseModel], JsonSchema], auth: bool
               ) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "responses": {}}
    if route.tags:
        op["tags"] = list(route.tags)
    params = _parameters(route)
    if params:
        op["parameters"] = params
    if route.request is not None:
        op["requestBody"] = {"required": route.request_required, "content": {
            "application/json": {"schema": refs[route.request]}}}
    if route.public and auth:
        op["security"] = []
    for status, (description, model) in route.responses.items():
        content: dict[str, Any] = {}
        if model is not None:
            content["application/json"] = {"schema": refs[model]}
        if status == 200 and route.text:
            content[route.text] = {"schema": {"type": "string"}}
        if status == 200 and route.stream is not None:
            content["text/event-stream"] = {"schema": _event(refs[route.stream], refs[Error])}
        op["responses"][str(status)] = {"description": description, "content": content}
    errors = dict(route.errors)
    if params or route.request is not None:
        errors.setdefault(400, _INVALID)
    if route.request is not None:
        errors.setdefault(413, _TOO_LARGE)
    errors.setdefault(500, _INTERNAL)
    if auth and not route.public:
        errors.setdefault(401, _UNAUTHORIZED)
    for status, description in sorted(errors.items()):
        response: dict[str, Any] = {"description": description,
                                    "content": {"application/json": {"schema": refs[Error]}}}
        if status == 429:
            response["headers"] = {"Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"}}}
        op["responses"][str(status)] = response
    return op


def _event(chunk: JsonSchema, error: JsonSchema) -> JsonSchema:
    """One server-sent event of a stream (OpenAPI 3.1 reads a stream's schema per event)."""
    return {
        "type": "object", "required": ["data"],
        "description": "A `data:` line per chunk, then `data: [DONE]`; an error after the stream "
                       "has started arrives as an event with an Error.",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [chunk, error]}}]}}}


def build_openapi(routes: list[Route], version: str, auth: bool) -> dict[str, Any]:
    """The document; with ``auth`` (an API key is configured) it declares bearer security."""
    by_mode, top = models_json_schema(_models(routes), ref_template=_REF,
                                      schema_generator=_Schema)
    refs = {model: ref for (model, _), ref in by_mode.items()}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs, auth)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "kvtier", "version": version, "description": (
            "OpenAI-compatible completions with a tiered, persistent KV cache, "
            "server-side sessions and cache statistics.")},
        "paths": paths,
        "components": {"schemas": dict(sorted(top.get("$defs", {}).items()))},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "The server's API key (server.api_key), on every route but /health."}}
        doc["security"] = [{"bearer": []}]
    return doc

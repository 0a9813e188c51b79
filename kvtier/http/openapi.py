"""The OpenAPI 3.1 document, generated from the route table the application registers.

Every operation, parameter and body schema comes from :class:`Route` entries and the schema
objects in :mod:`kvtier.http.schemas` that the handlers validate with, so the document cannot
drift from the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvtier.http.schemas import ERROR, SESSION_ID, Field, JsonSchema, Object, Schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

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
    responses: dict[int, tuple[str, Schema | None]]
    """Status → (description, JSON body schema); None for a non-JSON body."""
    request: Object | None = None
    request_required: bool = True
    query: tuple[Field, ...] = ()
    headers: tuple[Field, ...] = ()
    stream: Schema | None = None
    """The chunk schema of the ``text/event-stream`` answer to ``"stream": true``."""
    text: str = ""
    """Media type of a non-JSON 200 body (e.g. Prometheus text)."""
    public: bool = False
    """Answered without the API key."""
    tags: tuple[str, ...] = ()
    errors: dict[int, str] = field(default_factory=dict)
    """Operation-specific error statuses (the body is the Error schema)."""


def _parameters(route: Route, components: dict[str, JsonSchema]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in _path_names(route.path):
        schema = SESSION_ID if name == "session_id" else None
        params.append({"name": name, "in": "path", "required": True,
                       "schema": schema.json_schema(components) if schema else {"type": "string"}})
    for where, fields in (("query", route.query), ("header", route.headers)):
        for f in fields:
            params.append({"name": f.name, "in": where, "required": f.required,
                           "schema": f.schema.json_schema(components)})
    return params


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _operation(route: Route, components: dict[str, JsonSchema], auth: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "responses": {}}
    if route.tags:
        op["tags"] = list(route.tags)
    params = _parameters(route, components)
    if params:
        op["parameters"] = params
    if route.request is not None:
        op["requestBody"] = {"required": route.request_required, "content": {
            "application/json": {"schema": route.request.json_schema(components)}}}
    if route.public and auth:
        op["security"] = []
    for status, (description, schema) in route.responses.items():
        content: dict[str, Any] = {}
        if schema is not None:
            content["application/json"] = {"schema": schema.json_schema(components)}
        if status == 200 and route.text:
            content[route.text] = {"schema": {"type": "string"}}
        if status == 200 and route.stream is not None:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": (
                    "Server-sent events: `data: <chunk JSON>` lines, then `data: [DONE]`; each "
                    "chunk follows " + _ref_name(route.stream, components) + ".")}}
        op["responses"][str(status)] = {"description": description, "content": content}
    errors = dict(route.errors)
    if params or route.request is not None:
        errors.setdefault(400, _INVALID)
    if route.request is not None:
        errors.setdefault(413, _TOO_LARGE)
    errors.setdefault(500, _INTERNAL)
    if auth and not route.public:
        errors.setdefault(401, _UNAUTHORIZED)
    error_ref = ERROR.json_schema(components)
    for status, description in sorted(errors.items()):
        response: dict[str, Any] = {"description": description,
                                    "content": {"application/json": {"schema": error_ref}}}
        if status == 429:
            response["headers"] = {"Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"}}}
        op["responses"][str(status)] = response
    return op


def _ref_name(schema: Schema, components: dict[str, JsonSchema]) -> str:
    ref = schema.json_schema(components)
    return f"`{ref['$ref']}`" if "$ref" in ref else "the chunk schema"


def build_openapi(routes: list[Route], version: str, auth: bool) -> dict[str, Any]:
    """The document; with ``auth`` (an API key is configured) it declares bearer security."""
    components: dict[str, JsonSchema] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = \
            _operation(route, components, auth)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "kvtier", "version": version, "description": (
            "OpenAI-compatible completions with a tiered, persistent KV cache, "
            "server-side sessions and cache statistics.")},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items()))},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "The server's API key (server.api_key), on every route but /health."}}
        doc["security"] = [{"bearer": []}]
    return doc

"""The one place where errors become OpenAI-style error JSON with an HTTP status.

``{"error": {"message", "type", "param", "code"}}``: the official clients pick their exception
class from the status alone, so the status is what must be right; ``type`` and ``code`` follow
OpenAI's own responses where OpenAI has an equivalent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from kvtier.errors import (BlockCorrupt, BlockMissing, ConfigError, ContextOverflow,
                           InvalidRequest, KvtierError, ModelMismatch, ModelNotFound, Overloaded,
                           SessionBusy, SessionNotFound, StateRejected, StoreLocked, TierFull,
                           UnsupportedLayout)
from kvtier.http.responses import Error, ErrorDetail

log = logging.getLogger("kvtier.http")


class Unauthorized(KvtierError):
    """The request lacks the configured API key."""


class ShuttingDown(KvtierError):
    """The server stopped taking new work."""


class Interrupted(KvtierError):
    """A generation was cut short because the server is shutting down."""


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None = None


# Looked up along each error's MRO, so a subclass maps like its nearest listed base.
ERROR_KINDS: dict[type[BaseException], ErrorKind] = {
    InvalidRequest: ErrorKind(400, "invalid_request_error"),
    ContextOverflow: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    Unauthorized: ErrorKind(401, "authentication_error", "invalid_api_key"),
    SessionNotFound: ErrorKind(404, "invalid_request_error", "session_not_found"),
    ModelNotFound: ErrorKind(404, "invalid_request_error", "model_not_found"),
    ModelMismatch: ErrorKind(409, "invalid_request_error", "model_mismatch"),
    SessionBusy: ErrorKind(409, "invalid_request_error", "session_busy"),
    Overloaded: ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    TierFull: ErrorKind(507, "server_error", "insufficient_storage"),
    StoreLocked: ErrorKind(503, "server_error", "store_locked"),
    ShuttingDown: ErrorKind(503, "server_error", "shutting_down"),
    Interrupted: ErrorKind(503, "server_error", "shutting_down"),
    BlockCorrupt: ErrorKind(500, "server_error", "block_corrupt"),
    BlockMissing: ErrorKind(500, "server_error", "block_missing"),
    UnsupportedLayout: ErrorKind(500, "server_error", "unsupported_layout"),
    StateRejected: ErrorKind(500, "server_error", "state_rejected"),
    ConfigError: ErrorKind(500, "server_error", "config_error"),
    KvtierError: ErrorKind(500, "server_error"),
}
_INTERNAL = ErrorKind(500, "server_error", "internal_error")

# aiohttp's own HTTP exceptions (unknown route, wrong method, body too large, ...).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "request_too_large"}


def kind_of(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        kind = ERROR_KINDS.get(cls)
        if kind is not None:
            return kind
    return _INTERNAL


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> Error:
    return Error(error=ErrorDetail(message=message, type=type_, param=param, code=code))


def error_payload(exc: BaseException) -> tuple[int, Error, dict[str, str]]:
    """Status, JSON body and extra headers for any exception; internals are never shown."""
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPException):
        status = exc.status
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        message = exc.reason if exc.text is None or exc.text.startswith(f"{status}:") \
            else exc.text
        if status == 405:
            headers["Allow"] = exc.headers.get("Allow", "")
        return status, error_body(message, type_, None, _HTTP_CODES.get(status)), headers
    kind = kind_of(exc)
    if kind is _INTERNAL:
        return kind.status, error_body("internal server error", kind.type, None, kind.code), {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    param = getattr(exc, "param", None)
    return kind.status, error_body(str(exc), kind.type, param, kind.code), headers


def error_response(exc: BaseException) -> web.Response:
    status, body, headers = error_payload(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc, exc_info=kind_of(exc) is _INTERNAL)
    return web.json_response(text=body.model_dump_json(), status=status, headers=headers)

"""What the handlers and middlewares share: server state, per-request keys, JSON in and out."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel

from kvtier.engine.api import CacheStats, Usage
from kvtier.errors import InvalidRequest
from kvtier.http.auth import ApiKeys
from kvtier.http.metrics import Metrics

if TYPE_CHECKING:
    from kvtier.engine.pool import ModelPool
    from kvtier.engine.handle import GenerationHandle

# Per-request values the access log and the metrics middleware read.
USAGE = web.RequestKey("kvtier_usage", Usage)
STATUS = web.RequestKey("kvtier_status", int)
TENANT = web.RequestKey("kvtier_tenant", str)
"""Whose request: the tenant its API key names."""
CLIENT_GONE = 499  # nginx's "client closed request": the status a cancelled handler is logged with


@dataclass(slots=True)
class ServerState:
    engine: ModelPool
    metrics: Metrics
    keys: ApiKeys
    public_paths: frozenset[str]
    read_timeout_s: float = 30.0
    """How long a request's body may take to arrive (408 after)."""
    openapi: bytes = b""
    started: int = field(default_factory=lambda: int(time.time()))
    closing: bool = False
    """Set at shutdown: new generations get 503."""
    handles: set[GenerationHandle] = field(default_factory=set)
    """Generations in flight, cancelled when the shutdown grace period ends."""
    prepare: ThreadPoolExecutor | None = None
    """Where requests are prepared (session read, prompt tokenized): its own few threads, so
    big prompts wait for each other, not for the store's work or /health."""
    preparing: int = 0
    """Requests waiting for or in ``prepare``; beyond ``max_preparing`` new ones get 429."""
    max_preparing: int = 64
    stats: CacheStats | None = None
    """The latest cache statistics, refreshed in the background: /health reads them and so
    never waits on a thread."""


STATE = web.AppKey("kvtier_state", ServerState)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """``body`` serialized by its model."""
    return web.json_response(text=body.model_dump_json(), status=status, headers=headers)


async def read_json(request: web.Request, required: bool = True) -> Any:
    """The decoded body; malformed JSON (or NaN) is an InvalidRequest; a body that does not
    arrive within the read timeout gets 408."""
    try:
        async with asyncio.timeout(request.app[STATE].read_timeout_s):
            raw = await request.read()  # beyond client_max_size aiohttp raises 413
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body did not arrive in time") from None
    if not raw.strip():
        if required:
            raise InvalidRequest("the request body is empty; expected a JSON object")
        return {}
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

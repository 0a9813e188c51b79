"""The aiohttp application: the route table, the handlers but generation.py's, middlewares.

Handlers parse requests with the models of :mod:`kvtier.http.schemas`, answer with those of
:mod:`kvtier.http.responses`, talk to the engine only through its boundary types, and let typed
errors fly: one middleware turns every exception into OpenAI error JSON.
Generation runs on the engine's thread; preparing a request (reading its session, tokenizing its
prompt) runs in the prepare executor, store work (sessions, stats, metrics) in the default
executor, so the event loop never waits on llama.cpp or disk, and /health, which answers from
statistics refreshed in the background, never waits on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvtier.config import ServerConfig
from kvtier.engine.api import DEFAULT_TENANT
from kvtier.http import responses as r
from kvtier.http import schemas as s
from kvtier.http.auth import ApiKeys
from kvtier.http.common import (CLIENT_GONE, STATE, STATUS, TENANT, USAGE, ServerState,
                                json_response, read_json)
from kvtier.http.cors import Cors
from kvtier.http.errors import Unauthorized, error_response
from kvtier.http.generation import chat_completions, completions
from kvtier.http.metrics import CONTENT_TYPE, Metrics
from kvtier.http.openapi import Route, build_openapi

if TYPE_CHECKING:
    from kvtier.engine.pool import ModelPool

log = logging.getLogger("kvtier.http")
access_log = logging.getLogger("kvtier.http.access")


def _session_param(request: web.Request) -> str:
    return s.session_id_param(request.match_info["session_id"])


# -- models, sessions, stats -------------------------------------------------------------------

async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(r.ModelList(data=[
        r.Model(id=name, created=state.started, loaded=loaded)
        for name, loaded in state.engine.models()]))


async def get_model(request: web.Request) -> web.Response:
    """With one model served, any name finds it (as llama.cpp's server answers)."""
    state = request.app[STATE]
    name = state.engine.resolve(request.match_info["model"])
    return json_response(r.Model(id=name, created=state.started,
                                 loaded=state.engine.is_loaded(name)))


async def list_sessions(request: web.Request) -> web.Response:
    query = s.session_list_query(request.query)
    infos = await asyncio.to_thread(request.app[STATE].engine.list_sessions,
                                    query.after or "", query.limit + 1, request[TENANT])
    return json_response(r.SessionList.page(infos, query.limit))


async def get_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    info = await asyncio.to_thread(request.app[STATE].engine.get_session, session_id,
                                   request[TENANT])
    return json_response(r.Session.of(info))


async def delete_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    await asyncio.to_thread(request.app[STATE].engine.delete_session, session_id,
                            request[TENANT])
    return json_response(r.SessionDeleted(id=session_id))


async def fork_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    body = s.parse(s.ForkSessionRequest, await read_json(request, required=False))
    info = await asyncio.to_thread(request.app[STATE].engine.fork_session, session_id,
                                   body.new_id, request[TENANT])
    return json_response(r.Session.of(info))


async def cache_stats(request: web.Request) -> web.Response:
    stats = await asyncio.to_thread(request.app[STATE].engine.cache_stats)
    return json_response(r.CacheStats.of(stats))


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    assert state.stats is not None  # read once before the server listens
    return json_response(r.Health.of(state.stats, state.engine.model_name, state.closing),
                         status=503 if state.closing else 200)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[STATE].metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].openapi, content_type="application/json")


# -- the route table (also the source of /openapi.json) ---------------------------------------

_GEN_ERRORS = {
    400: "Malformed JSON, an invalid parameter, or a prompt that does not fit the context "
         "(code context_length_exceeded).",
    404: "Unknown model or session.",
    409: "The session is already generating a reply (code session_busy), or its KV belongs to "
         "another model (code model_mismatch).",
    408: "The body did not arrive within server.read_timeout_s of its headers.",
    429: "The queue is full (or too many requests wait to be tokenized); retry after "
         "Retry-After seconds.",
    503: "The server is shutting down.",
}
_SESSION_ERRORS = {400: "Invalid session id.",
                   404: "No session of the caller's tenant has this id."}
_SESSION_HEADERS = {"X-Session-Id": s.SessionId}

ROUTES: list[Route] = [
    Route("POST", "/v1/chat/completions", chat_completions, "createChatCompletion",
          "Chat completion, streamed or not; session_id (or X-Session-Id) continues a session.",
          {200: ("The completion.", r.ChatCompletion)}, request=s.ChatCompletionRequest,
          headers=_SESSION_HEADERS, stream=r.ChatCompletionChunk, tags=("generation",),
          errors=_GEN_ERRORS),
    Route("POST", "/v1/completions", completions, "createCompletion",
          "Text completion, streamed or not; session_id (or X-Session-Id) continues a session.",
          {200: ("The completion.", r.Completion)}, request=s.CompletionRequest,
          headers=_SESSION_HEADERS, stream=r.CompletionChunk, tags=("generation",),
          errors=_GEN_ERRORS),
    Route("GET", "/v1/models", list_models, "listModels",
          "The models this server serves, and which are loaded.",
          {200: ("The models.", r.ModelList)}, tags=("models",)),
    Route("GET", "/v1/models/{model}", get_model, "retrieveModel", "One model.",
          {200: ("The model.", r.Model)}, tags=("models",),
          errors={404: "Unknown model (only when several are served)."}),
    Route("GET", "/v1/sessions", list_sessions, "listSessions",
          "Sessions in id order, a page at a time (pass the last id as 'after').",
          {200: ("A page of sessions.", r.SessionList)}, query=s.SessionListQuery,
          tags=("sessions",)),
    Route("GET", "/v1/sessions/{session_id}", get_session, "getSession",
          "A session: its messages, tokens and stored blocks per tier.",
          {200: ("The session.", r.Session)}, tags=("sessions",), errors=_SESSION_ERRORS),
    Route("DELETE", "/v1/sessions/{session_id}", delete_session, "deleteSession",
          "Deletes a session (blocks shared with other sessions stay).",
          {200: ("Deleted.", r.SessionDeleted)}, tags=("sessions",),
          errors={**_SESSION_ERRORS, 409: "The session is generating a reply (code "
                                          "session_busy)."}),
    Route("POST", "/v1/sessions/{session_id}/fork", fork_session, "forkSession",
          "Copies a session under a new id (given, or generated); the two share their blocks.",
          {200: ("The new session.", r.Session)}, request=s.ForkSessionRequest,
          request_required=False, tags=("sessions",),
          errors={**_SESSION_ERRORS, 400: "Invalid id, or the new id is taken."}),
    Route("GET", "/v1/cache/stats", cache_stats, "getCacheStats",
          "Per tier: blocks, bytes, budget, compression ratio, hits, misses, promotions, "
          "demotions, drops; token counts by source; slots; measured throughput.",
          {200: ("Cache statistics.", r.CacheStats)}, tags=("cache",)),
    Route("GET", "/health", health, "health", "Liveness and a short cache summary.",
          {200: ("Serving.", r.Health), 503: ("Shutting down.", r.Health)}, public=True,
          tags=("server",)),
    Route("GET", "/metrics", metrics, "metrics", "Prometheus metrics.",
          {200: ("Prometheus text format.", None)}, text="text/plain", tags=("server",)),
    Route("GET", "/openapi.json", openapi, "openapi", "This document.",
          {200: ("The OpenAPI document.", r.OpenApiDocument)}, tags=("server",)),
]


# -- middlewares ---------------------------------------------------------------------------------

def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts, times and logs every request (outermost, so it sees the final status; here and
    not in aiohttp's access log, which skips requests whose client went away)."""
    metrics = request.app[STATE].metrics
    started = time.monotonic()
    metrics.in_flight.inc()
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = request.get(STATUS, response.status)
        return response
    finally:
        elapsed = time.monotonic() - started
        metrics.in_flight.dec()
        route = _route_label(request)
        metrics.requests.labels(request.method, route, str(status)).inc()
        metrics.duration.labels(route).observe(elapsed)
        usage = request.get(USAGE)
        tokens = "-" if usage is None else (f"prompt={usage.prompt_tokens} cached="
                                            f"{usage.cached_tokens} completion="
                                            f"{usage.completion_tokens}")
        access_log.info("%s %s %s %s %.3fs", request.method, request.path_qs, status, tokens,
                        elapsed)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:  # every error becomes OpenAI JSON; CancelledError passes
        return error_response(exc)


@web.middleware
async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    """Names the request's tenant from its key (when keys are configured)."""
    state = request.app[STATE]
    tenant: str | None = DEFAULT_TENANT
    if state.keys.required and request.path not in state.public_paths:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        tenant = state.keys.tenant_of(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
    request[TENANT] = tenant
    return await handler(request)


def openapi_document(auth: bool) -> dict[str, Any]:
    """The OpenAPI document of :data:`ROUTES`, as served at /openapi.json (``auth``: an API key
    is configured)."""
    try:
        version = metadata.version("kvtier")
    except metadata.PackageNotFoundError:
        version = "0"
    return build_openapi(ROUTES, version, auth)


def create_app(engine: ModelPool, keys: ApiKeys | None = None,
               server: ServerConfig | None = None) -> web.Application:
    """The application for ``engine``; the caller owns the engine and closes it."""
    server = server or ServerConfig()
    keys = keys or ApiKeys({})
    cors = Cors(tuple(server.cors_origins))
    app = web.Application(middlewares=[observe, errors, cors.preflight, authenticate],
                          client_max_size=server.max_body_bytes)
    state = ServerState(engine=engine, metrics=Metrics(engine.cache_stats), keys=keys,
                        public_paths=frozenset(route.path for route in ROUTES if route.public),
                        read_timeout_s=server.read_timeout_s,
                        max_preparing=server.prepare_threads + server.max_queue)
    state.openapi = json.dumps(openapi_document(keys.required)).encode()
    app[STATE] = state
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.on_response_prepare.append(cors.headers)
    app.cleanup_ctx.append(_background(server.prepare_threads))
    return app


STATS_REFRESH_S = 1.0
"""How often /health's statistics are read again."""


def _background(prepare_threads: int) -> Any:
    """The prepare executor and the task that keeps /health's statistics fresh."""

    async def context(app: web.Application) -> Any:
        state = app[STATE]
        state.prepare = ThreadPoolExecutor(prepare_threads, thread_name_prefix="kvtier-prepare")
        state.stats = await asyncio.to_thread(state.engine.cache_stats)
        task = asyncio.create_task(_refresh_stats(state))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state.prepare.shutdown(wait=False, cancel_futures=True)

    return context


async def _refresh_stats(state: ServerState) -> None:
    while True:
        await asyncio.sleep(STATS_REFRESH_S)
        try:
            state.stats = await asyncio.to_thread(state.engine.cache_stats)
        except Exception:  # /health keeps the last statistics; the next round tries again
            log.exception("reading the cache statistics failed")


async def drain(app: web.Application, grace_s: float) -> None:
    """Refuses new generations, lets running ones finish for ``grace_s``, then cuts the rest."""
    state = app[STATE]
    state.closing = True
    deadline = time.monotonic() + grace_s
    while state.handles and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.handles:
        log.info("cutting %d generation(s) short", len(state.handles))
    for handle in list(state.handles):
        handle.cancel()

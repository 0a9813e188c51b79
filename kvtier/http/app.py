"""The aiohttp application: routes, handlers and middlewares.

Handlers parse bodies with :mod:`kvtier.http.schemas`, talk to the engine only through its boundary
types, and let typed errors fly: one middleware turns every exception into OpenAI error JSON.
Generation runs on the engine's thread; store work (sessions, stats, metrics) runs in the default
executor, so the event loop never waits on llama.cpp or disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvtier.engine.api import Finished, GenerationRequest, SessionInfo, TokenEvent, Usage
from kvtier.errors import InvalidRequest, ModelNotFound
from kvtier.http import schemas as s
from kvtier.http.errors import (Interrupted, ShuttingDown, Unauthorized, error_body, error_payload,
                                error_response)
from kvtier.http.metrics import CONTENT_TYPE, Metrics
from kvtier.http.openapi import Route, build_openapi

if TYPE_CHECKING:
    from kvtier.engine.engine import Engine, GenerationHandle

log = logging.getLogger("kvtier.http")
access_log = logging.getLogger("kvtier.http.access")

# Per-request values the access log and the metrics middleware read.
USAGE = web.RequestKey("kvtier_usage", Usage)
STATUS = web.RequestKey("kvtier_status", int)
CLIENT_GONE = 499  # nginx's "client closed request": the status a cancelled handler is logged with

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class ServerState:
    engine: Engine
    metrics: Metrics
    api_key: str
    public_paths: frozenset[str]
    openapi: bytes = b""
    started: int = field(default_factory=lambda: int(time.time()))
    closing: bool = False
    """Set at shutdown: new generations get 503."""
    handles: set[GenerationHandle] = field(default_factory=set)
    """Generations in flight, cancelled when the shutdown grace period ends."""


STATE = web.AppKey("kvtier_state", ServerState)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


async def _read_json(request: web.Request, required: bool = True) -> Any:
    raw = await request.read()  # beyond client_max_size aiohttp raises 413
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


def _session_param(request: web.Request) -> str:
    return s.SESSION_ID.check(request.match_info["session_id"], "session_id")


# -- generation ------------------------------------------------------------------------------------

def _usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass(slots=True)
class _Reply:
    """Shapes one generation's output as chat or text-completion JSON."""
    chat: bool
    id: str
    model: str
    session_id: str | None
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _tail(self, out: dict[str, Any]) -> dict[str, Any]:
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out

    def full(self, finished: Finished) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text},
                      "finish_reason": finished.finish_reason, "logprobs": None}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": finished.text,
                      "finish_reason": finished.finish_reason, "logprobs": None}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out["usage"] = _usage_json(finished.usage)
        return self._tail(out)

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              include_usage: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": None}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason,
                      "logprobs": None}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if include_usage:
            out["usage"] = None
        return self._tail(out)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = _usage_json(usage)
        return self._tail(out)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _submit(engine: Engine, gen: GenerationRequest) -> GenerationHandle:
    """``engine.submit`` off the loop: it reads the session from the store and tokenizes."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, engine.submit, gen, loop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_cancel_orphan)  # the client left while we were submitting
        raise


def _cancel_orphan(future: asyncio.Future[GenerationHandle]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


async def _generate(request: web.Request, parsed: s.ParsedGeneration, chat: bool
                    ) -> web.StreamResponse:
    state = request.app[STATE]
    if state.closing:
        raise ShuttingDown("the server is shutting down")
    engine = state.engine
    gen = parsed.request
    started = time.monotonic()
    log.debug("%s %s session=%s sampling=%s", gen.request_id, request.path, gen.session_id,
              gen.sampling)
    handle = await _submit(engine, gen)
    state.handles.add(handle)
    finished: Finished | None = None
    try:
        events = handle.__aiter__()
        # Wait for the first event before answering, so that errors the engine finds while
        # preparing the prompt still get their own HTTP status.
        first = await anext(events)
        state.metrics.ttft.labels("chat" if chat else "completions").observe(
            time.monotonic() - started)
        reply = _Reply(chat, gen.request_id, engine.model_name, gen.session_id)
        if parsed.stream:
            response, finished = await _stream(request, reply, parsed, first, events)
            return response
        finished = first if isinstance(first, Finished) else await _last(events)
        if finished.finish_reason == "cancelled":
            raise Interrupted("the server shut down before the reply was finished; a "
                              "session keeps what was generated")
        request[USAGE] = finished.usage
        state.metrics.observe_usage(finished.usage)
        headers = {"X-Session-Id": gen.session_id} if gen.session_id else None
        return _json(reply.full(finished), headers=headers)
    except asyncio.CancelledError:
        state.metrics.disconnects.inc()
        raise
    finally:
        state.handles.discard(handle)
        if finished is None:
            handle.cancel()


async def _last(events: AsyncIterator[TokenEvent | Finished]) -> Finished:
    async for event in events:
        if isinstance(event, Finished):
            return event
    raise RuntimeError("the engine ended a generation without a Finished event")


async def _stream(request: web.Request, reply: _Reply, parsed: s.ParsedGeneration,
                  first: TokenEvent | Finished, events: AsyncIterator[TokenEvent | Finished]
                  ) -> tuple[web.StreamResponse, Finished | None]:
    """Sends SSE chunks; the Finished event is None if the stream broke off before it."""
    state = request.app[STATE]
    headers = dict(_SSE_HEADERS)
    if reply.session_id:
        headers["X-Session-Id"] = reply.session_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    usage = parsed.include_usage
    finished: Finished | None = None
    try:
        if reply.chat:
            await response.write(_sse(reply.chunk("", role=True, include_usage=usage)))
        event = first
        while isinstance(event, TokenEvent):
            if event.text:
                await response.write(_sse(reply.chunk(event.text, include_usage=usage)))
            event = await anext(events)
        finished = event
        if finished.finish_reason == "cancelled":
            await response.write(_sse(error_body(
                "the server shut down before the reply was finished", "server_error", None,
                "shutting_down")))
        else:
            request[USAGE] = finished.usage
            state.metrics.observe_usage(finished.usage)
            await response.write(_sse(reply.chunk(None if reply.chat else "",
                                                  finished.finish_reason, include_usage=usage)))
            if usage:
                await response.write(_sse(reply.usage_chunk(finished.usage)))
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        # The client closed the connection between two chunks.
        state.metrics.disconnects.inc()
        request[STATUS] = CLIENT_GONE
    except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
        status, body, _ = error_payload(exc)
        log.error("%s failed mid-stream: %s: %s", reply.id, type(exc).__name__, exc,
                  exc_info=status >= 500)
        request[STATUS] = status
        with contextlib.suppress(ConnectionError):
            await response.write(_sse(body))
            await response.write_eof()
    return response, finished


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    parsed = s.parse_chat(body, request.headers.get("X-Session-Id"),
                          f"chatcmpl-{uuid.uuid4().hex}")
    return await _generate(request, parsed, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    parsed = s.parse_completion(body, request.headers.get("X-Session-Id"),
                                f"cmpl-{uuid.uuid4().hex}")
    return await _generate(request, parsed, chat=False)


# -- models, sessions, stats -------------------------------------------------------------------

def _model_json(state: ServerState) -> dict[str, Any]:
    return {"id": state.engine.model_name, "object": "model", "created": state.started,
            "owned_by": "kvtier"}


async def list_models(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": [_model_json(request.app[STATE])]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model = request.match_info["model"]
    if model != state.engine.model_name:
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves "
                            f"{state.engine.model_name!r}")
    return _json(_model_json(state))


def _session_json(info: SessionInfo, with_messages: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": info.session_id, "object": "session", "created": info.created,
        "last_used": info.last_used, "model": info.model, "n_tokens": info.n_tokens,
        "n_messages": len(info.messages), "blocks_per_tier": dict(info.blocks_per_tier),
        "parent": info.parent}
    if with_messages:
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in info.messages]
    return out


async def list_sessions(request: web.Request) -> web.Response:
    query = s.parse_query(s.SESSION_LIST_QUERY, request.query)
    limit = query["limit"]
    infos = await asyncio.to_thread(request.app[STATE].engine.list_sessions,
                                    query.get("after", ""), limit + 1)
    page = infos[:limit]
    return _json({"object": "list", "data": [_session_json(i, False) for i in page],
                  "first_id": page[0].session_id if page else None,
                  "last_id": page[-1].session_id if page else None,
                  "has_more": len(infos) > limit})


async def get_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    info = await asyncio.to_thread(request.app[STATE].engine.get_session, session_id)
    return _json(_session_json(info, True))


async def delete_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    await asyncio.to_thread(request.app[STATE].engine.delete_session, session_id)
    return _json({"id": session_id, "object": "session.deleted", "deleted": True})


async def fork_session(request: web.Request) -> web.Response:
    session_id = _session_param(request)
    body = s.FORK_REQUEST.check(await _read_json(request, required=False), "")
    info = await asyncio.to_thread(request.app[STATE].engine.fork_session, session_id,
                                   body.get("new_id"))
    return _json(_session_json(info, True))


async def cache_stats(request: web.Request) -> web.Response:
    stats = await asyncio.to_thread(request.app[STATE].engine.cache_stats)
    return _json({"object": "cache.stats", **dataclasses.asdict(stats)})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = await asyncio.to_thread(state.engine.cache_stats)
    return _json({"status": "shutting_down" if state.closing else "ok",
                  "model": state.engine.model_name, "slots": dataclasses.asdict(stats.slots),
                  "cache": [{"name": t.name, "blocks": t.blocks, "bytes": t.bytes}
                            for t in stats.tiers]},
                 status=503 if state.closing else 200)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[STATE].metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].openapi, content_type="application/json")


# -- the route table (also the source of /openapi.json) ---------------------------------------

_GEN_ERRORS = {
    400: "Malformed JSON, an invalid parameter, a session that is already generating, or a "
         "prompt that does not fit the context (code context_length_exceeded).",
    404: "Unknown model or session.",
    409: "The session's KV belongs to another model.",
    429: "The queue is full; retry after Retry-After seconds.",
    503: "The server is shutting down.",
}
_SESSION_ERRORS = {404: "No session has this id."}

ROUTES: list[Route] = [
    Route("POST", "/v1/chat/completions", chat_completions, "createChatCompletion",
          "Chat completion, streamed or not; session_id (or X-Session-Id) continues a session.",
          {200: ("The completion.", s.CHAT_COMPLETION)}, request=s.CHAT_REQUEST,
          headers=s.SESSION_HEADERS, stream=s.CHAT_CHUNK, tags=("generation",),
          errors=_GEN_ERRORS),
    Route("POST", "/v1/completions", completions, "createCompletion",
          "Text completion, streamed or not; session_id (or X-Session-Id) continues a session.",
          {200: ("The completion.", s.COMPLETION)}, request=s.COMPLETION_REQUEST,
          headers=s.SESSION_HEADERS, stream=s.COMPLETION_CHUNK, tags=("generation",),
          errors=_GEN_ERRORS),
    Route("GET", "/v1/models", list_models, "listModels", "The models this server serves.",
          {200: ("The models.", s.MODEL_LIST)}, tags=("models",)),
    Route("GET", "/v1/models/{model}", get_model, "retrieveModel", "One model.",
          {200: ("The model.", s.MODEL_OBJECT)}, tags=("models",),
          errors={404: "Unknown model."}),
    Route("GET", "/v1/sessions", list_sessions, "listSessions",
          "Sessions in id order, a page at a time (pass the last id as 'after').",
          {200: ("A page of sessions.", s.SESSION_LIST)}, query=s.SESSION_LIST_QUERY,
          tags=("sessions",)),
    Route("GET", "/v1/sessions/{session_id}", get_session, "getSession",
          "A session: its messages, tokens and stored blocks per tier.",
          {200: ("The session.", s.SESSION)}, tags=("sessions",),
          errors={400: "Invalid session id.", **_SESSION_ERRORS}),
    Route("DELETE", "/v1/sessions/{session_id}", delete_session, "deleteSession",
          "Deletes a session (blocks shared with other sessions stay).",
          {200: ("Deleted.", s.SESSION_DELETED)}, tags=("sessions",),
          errors={400: "Invalid session id.", **_SESSION_ERRORS}),
    Route("POST", "/v1/sessions/{session_id}/fork", fork_session, "forkSession",
          "Copies a session under a new id (given, or generated); the two share their blocks.",
          {200: ("The new session.", s.SESSION)}, request=s.FORK_REQUEST,
          request_required=False, tags=("sessions",),
          errors={400: "Invalid id, or the new id is taken.", **_SESSION_ERRORS}),
    Route("GET", "/v1/cache/stats", cache_stats, "getCacheStats",
          "Per tier: blocks, bytes, budget, compression ratio, hits, misses, promotions, "
          "demotions, drops; token counts by source; slots.",
          {200: ("Cache statistics.", s.CACHE_STATS)}, tags=("cache",)),
    Route("GET", "/health", health, "health", "Liveness and a short cache summary.",
          {200: ("Serving.", s.HEALTH), 503: ("Shutting down.", s.HEALTH)}, public=True,
          tags=("server",)),
    Route("GET", "/metrics", metrics, "metrics", "Prometheus metrics.",
          {200: ("Prometheus text format.", None)}, text="text/plain", tags=("server",)),
    Route("GET", "/openapi.json", openapi, "openapi", "This document.",
          {200: ("The OpenAPI document.", s.AnyValue())}, tags=("server",)),
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
    state = request.app[STATE]
    if state.api_key and request.path not in state.public_paths:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), state.api_key.encode()):
            raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
    return await handler(request)


def openapi_document(auth: bool) -> dict[str, Any]:
    """The OpenAPI document of :data:`ROUTES`, as served at /openapi.json (``auth``: an API key
    is configured)."""
    try:
        version = metadata.version("kvtier")
    except metadata.PackageNotFoundError:
        version = "0"
    return build_openapi(ROUTES, version, auth)


def create_app(engine: Engine, api_key: str = "", max_body_bytes: int = 8 * 1024**2
               ) -> web.Application:
    """The application for ``engine``; the caller owns the engine and closes it."""
    app = web.Application(middlewares=[observe, errors, authenticate],
                          client_max_size=max_body_bytes)
    state = ServerState(engine=engine, metrics=Metrics(engine.cache_stats), api_key=api_key,
                        public_paths=frozenset(r.path for r in ROUTES if r.public))
    state.openapi = json.dumps(openapi_document(bool(api_key))).encode()
    app[STATE] = state
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return app


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

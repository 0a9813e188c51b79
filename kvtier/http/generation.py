"""The generation routes: chat and text completions, whole or streamed as server-sent events.

``engine.submit`` runs off the event loop; the events of its handle arrive on the loop. The first
event is awaited before answering, so errors found while preparing the prompt keep their own HTTP
status; after a stream has started, an error is sent as an event, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from kvtier.engine.api import Finished, GenerationRequest, TokenEvent
from kvtier.http import responses as r
from kvtier.http import schemas as s
from kvtier.errors import Overloaded
from kvtier.http.common import (CLIENT_GONE, STATE, STATUS, TENANT, USAGE, ServerState,
                                json_response, read_json)
from kvtier.http.errors import Interrupted, ShuttingDown, error_body, error_payload

if TYPE_CHECKING:
    from kvtier.engine.handle import GenerationHandle

log = logging.getLogger("kvtier.http")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


async def _submit(state: ServerState, gen: GenerationRequest) -> GenerationHandle:
    """``engine.submit`` off the loop, in the prepare executor: it reads the session from the
    store and tokenizes. Too many waiting there already: 429."""
    if state.preparing >= state.max_preparing:
        raise Overloaded(f"{state.preparing} requests are waiting to be tokenized")
    if gen.session_id is not None:
        # Waiting for the session's previous turn to be stored is store work: not on one of
        # the few prepare threads, which it could hold for seconds.
        await asyncio.to_thread(state.engine.wait_session, gen.session_id, gen.tenant)
    loop = asyncio.get_running_loop()
    state.preparing += 1
    future = loop.run_in_executor(state.prepare, state.engine.submit, gen, loop)
    future.add_done_callback(lambda _: _prepared(state))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_cancel_orphan)  # the client left while we were submitting
        raise


def _prepared(state: ServerState) -> None:
    state.preparing -= 1


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
    handle = await _submit(state, gen)
    state.handles.add(handle)
    finished: Finished | None = None
    try:
        events = handle.__aiter__()
        # Wait for the first event before answering, so that errors the engine finds while
        # preparing the prompt still get their own HTTP status.
        first = await anext(events)
        state.metrics.ttft.labels("chat" if chat else "completions").observe(
            time.monotonic() - started)
        reply = r.Reply(chat, gen.request_id, engine.resolve(gen.model), gen.session_id,
                        parsed.include_usage)
        if parsed.stream:
            response, finished = await _stream(request, reply, first, events)
            return response
        finished = first if isinstance(first, Finished) else await _last(events)
        if finished.finish_reason == "cancelled":
            raise Interrupted("the server shut down before the reply was finished; a "
                              "session keeps what was generated")
        request[USAGE] = finished.usage
        state.metrics.observe_usage(finished.usage)
        headers = {"X-Session-Id": gen.session_id} if gen.session_id else None
        return json_response(reply.full(finished), headers=headers)
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


async def _stream(request: web.Request, reply: r.Reply, first: TokenEvent | Finished,
                  events: AsyncIterator[TokenEvent | Finished]
                  ) -> tuple[web.StreamResponse, Finished | None]:
    """Sends SSE chunks; the Finished event is None if the stream broke off before it."""
    state = request.app[STATE]
    headers = dict(_SSE_HEADERS)
    if reply.session_id:
        headers["X-Session-Id"] = reply.session_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    finished: Finished | None = None
    try:
        if reply.chat:
            await response.write(reply.event("", role=True))
        event = first
        while isinstance(event, TokenEvent):
            if event.text:
                await response.write(reply.event(event.text))
            event = await anext(events)
        finished = event
        if finished.finish_reason == "cancelled":
            await response.write(r.sse(error_body(
                "the server shut down before the reply was finished", "server_error", None,
                "shutting_down")))
        else:
            request[USAGE] = finished.usage
            state.metrics.observe_usage(finished.usage)
            await response.write(reply.event(None, finished.finish_reason))
            if reply.include_usage:
                await response.write(reply.usage_event(finished.usage))
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
            await response.write(r.sse(body))
            await response.write_eof()
    return response, finished


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    parsed = s.parse_chat(body, request.headers.get("X-Session-Id"),
                          f"chatcmpl-{uuid.uuid4().hex}", request[TENANT])
    return await _generate(request, parsed, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    parsed = s.parse_completion(body, request.headers.get("X-Session-Id"),
                                f"cmpl-{uuid.uuid4().hex}", request[TENANT])
    return await _generate(request, parsed, chat=False)

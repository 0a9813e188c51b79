"""The generation handle without a model: what the engine thread emits is what the reader gets."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvtier.engine.api import Finished, TokenEvent, Usage
from kvtier.engine.handle import GenerationHandle
from kvtier.errors import KvtierError, Overloaded

DONE = Finished("ab", "stop", Usage(3, 2, 0))


def emit_all(handle: GenerationHandle, error: BaseException | None = None) -> None:
    """What the engine thread does for a two-token reply (or one that fails after a token)."""
    handle.emit_token(TokenEvent("a", 1))
    if error is not None:
        handle.fail(error)
        return
    handle.emit_token(TokenEvent("b", 2))
    handle.finish(DONE)


def test_sync_iteration_yields_tokens_then_the_finish():
    handle = GenerationHandle()
    thread = threading.Thread(target=emit_all, args=(handle,))
    thread.start()
    assert list(handle) == [TokenEvent("a", 1), TokenEvent("b", 2), DONE]
    thread.join()


def test_result_skips_tokens_and_raises_the_failure():
    handle = GenerationHandle()
    emit_all(handle)
    assert handle.result() == DONE
    failing = GenerationHandle()
    emit_all(failing, Overloaded("full"))
    events = iter(failing)
    assert next(events) == TokenEvent("a", 1)
    with pytest.raises(Overloaded):
        next(events)


def test_async_iteration_gets_events_from_another_thread():
    async def read() -> list[object]:
        handle = GenerationHandle(asyncio.get_running_loop())
        thread = threading.Thread(target=emit_all, args=(handle,))
        thread.start()
        events = [event async for event in handle]
        thread.join()
        return events

    assert asyncio.run(read()) == [TokenEvent("a", 1), TokenEvent("b", 2), DONE]


def test_async_iteration_raises_the_failure():
    async def read() -> None:
        handle = GenerationHandle(asyncio.get_running_loop())
        emit_all(handle, KvtierError("boom"))
        async for _ in handle:
            pass

    with pytest.raises(KvtierError, match="boom"):
        asyncio.run(read())


def test_the_wrong_kind_of_iteration_is_refused():
    with pytest.raises(RuntimeError, match="async for"):
        asyncio.run(_iterate_sync_inside_loop())
    with pytest.raises(RuntimeError, match="use for"):
        GenerationHandle().__aiter__()


async def _iterate_sync_inside_loop() -> None:
    for _ in GenerationHandle(asyncio.get_running_loop()):
        pass


def test_cancel_is_seen_by_the_engine_thread():
    handle = GenerationHandle()
    assert not handle.cancelled
    handle.cancel()
    assert handle.cancelled


def test_a_closed_loop_cancels_the_generation():
    loop = asyncio.new_event_loop()
    handle = GenerationHandle(loop)
    loop.close()
    handle.emit_token(TokenEvent("a", 1))  # nobody can read it: the engine should stop
    assert handle.cancelled

"""The handle of one request: the engine thread writes its events, the submitter reads them.

The engine thread calls :meth:`GenerationHandle.emit_token` for each piece of text, then exactly
one of :meth:`~GenerationHandle.finish` and :meth:`~GenerationHandle.fail`. The submitter reads
with ``for`` (submitted without an event loop) or ``async for`` (submitted with one), or waits with
:meth:`~GenerationHandle.result`, and may :meth:`~GenerationHandle.cancel` at any time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from kvtier.engine.api import Finished, TokenEvent

_Item = TokenEvent | Finished | BaseException


class GenerationHandle:
    """The events of one request: TokenEvents, then a Finished, or an exception."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._sync: queue.Queue[_Item] = queue.Queue()
        self._async: asyncio.Queue[_Item] | None = asyncio.Queue() if loop is not None else None
        self._cancelled = threading.Event()

    # -- the engine thread's side ----------------------------------------------------------------
    def emit_token(self, event: TokenEvent) -> None:
        """Hand the reader one piece of generated text."""
        self._put(event)

    def finish(self, finished: Finished) -> None:
        """End the request normally; the reader's iteration stops after this event."""
        self._put(finished)

    def fail(self, error: BaseException) -> None:
        """End the request with ``error``, which the reader's iteration raises."""
        self._put(error)

    @property
    def cancelled(self) -> bool:
        """The reader cancelled, or went away with its event loop: stop generating."""
        return self._cancelled.is_set()

    def _put(self, item: _Item) -> None:
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self._cancelled.set()
        else:
            self._sync.put(item)

    # -- the reader's side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; what was generated so far is still stored."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        if self._async is not None:
            raise RuntimeError("this handle was submitted with a loop: use async for")
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    async def _aiter(self) -> AsyncIterator[TokenEvent | Finished]:
        assert self._async is not None
        while True:
            item = await self._async.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]:
        if self._async is None:
            raise RuntimeError("this handle was submitted without a loop: use for")
        return self._aiter()

    def result(self) -> Finished:
        """Block until the request is done and return its Finished event."""
        for item in self:
            if isinstance(item, Finished):
                return item
        raise AssertionError("unreachable")

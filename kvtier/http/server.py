"""Running the HTTP server: ``kvtier serve`` and its graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from kvtier.config import Config
from kvtier.errors import ConfigError
from kvtier.http.app import create_app, drain
from kvtier.http.auth import api_keys_of

if TYPE_CHECKING:
    from kvtier.engine.pool import ModelPool

log = logging.getLogger("kvtier.http")

async def run(config: Config, stop: asyncio.Event, engine: ModelPool | None = None,
              on_ready: Callable[[str], None] | None = None) -> None:
    """Serves until ``stop`` is set, then drains and shuts down; closes the models it loaded.

    ``on_ready`` gets the base URL once the socket listens.
    """
    own_engine = engine is None
    keys = api_keys_of(config)  # a bad keys file stops the server before the model loads
    if engine is None:
        from kvtier.engine.pool import ModelPool
        engine = await asyncio.to_thread(ModelPool, config)
    try:
        if stop.is_set():
            return
        app = create_app(engine, keys, config.server)
        # handler_cancellation: a client that disconnects cancels its handler, which cancels
        # the generation. The access log is written by the app's own middleware. aiohttp
        # closes a connection still waiting for a whole request's headers after
        # keepalive_timeout, from when it opened or its last response: the header read timeout.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=config.server.shutdown_grace_s,
                               keepalive_timeout=config.server.read_timeout_s)
        await runner.setup()
        try:
            host, _, port = config.server.listen.rpartition(":")
            site = web.TCPSite(runner, host.strip("[]"), int(port))
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError("server.listen", f"cannot listen on {config.server.listen}: "
                                  f"{exc.strerror or exc}") from None
            url = f"http://{config.server.listen}"
            first = engine.engine()
            log.info("serving %s on %s (%d slots; %d tokens each hot, conversations up to %d)",
                     ", ".join(name for name, _ in engine.models()), url, first.n_slots,
                     first.sizing.slot_tokens, first.context_size)
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            log.info("shutting down: finishing running requests (up to %.0f s)",
                     config.server.shutdown_grace_s)
            await site.stop()  # no new connections
            await drain(app, config.server.shutdown_grace_s)
        finally:
            await runner.cleanup()
    finally:
        if own_engine:
            await asyncio.to_thread(engine.close)
            log.info("store flushed and closed")


def serve(config: Config) -> int:
    """``kvtier serve``: runs until SIGTERM or SIGINT; returns the exit status."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(config, stop)

    asyncio.run(main())
    return 0

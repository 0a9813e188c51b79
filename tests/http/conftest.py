"""A real kvtier server on a loopback port, with the real default model, shared by the HTTP tests.

The server runs :func:`kvtier.http.server.run` (the code behind ``kvtier serve``) on its own event
loop in a thread. Generation requests in these tests ask for a few tokens only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvtier.config import Config, load_config
from kvtier.http.server import run

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_config(data_dir: Path, **overrides: Any) -> Config:
    """Small and quick: 1,024-token slots, two threads (other tests share the machine)."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir), "server.listen": f"127.0.0.1:{free_port()}",
        "model.context_size": 1024, "model.n_slots": 2, "model.n_threads": 2,
        "server.max_queue": 8, "tiers.host_ram_budget": "64MiB",
        "tiers.local_ssd_budget": "256MiB", "tiers.nfs_budget": "256MiB"}
    values.update(overrides)
    return load_config(None, values)


@dataclass
class Server:
    url: str
    """Base URL, e.g. http://127.0.0.1:PORT"""
    api_key: str
    config: Config
    loop: asyncio.AbstractEventLoop | None = None
    """The server's event loop (it runs in a thread of this process)."""

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None
                = None, raw: bytes | None = None, auth: bool = True
                ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request with the standard library: status, headers, body (never raises)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        if auth and self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        all_headers.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any
             ) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kwargs)
        return status, json.loads(data)


@contextlib.contextmanager
def running_server(config: Config, api_key: str = "") -> Iterator[Server]:
    """Runs the server in a thread until the block ends (then drains and closes the engine)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        box["loop"], box["stop"] = loop, stop

        def on_ready(url: str) -> None:
            box["url"] = url
            ready.set()

        try:
            loop.run_until_complete(run(config, stop, on_ready=on_ready))
        except BaseException as exc:  # reported to the test below
            box["error"] = exc
        finally:
            loop.close()
            ready.set()

    if api_key:
        config.server.api_key = api_key
    thread = threading.Thread(target=main, name="kvtier-test-server", daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in box or "url" not in box:
        raise RuntimeError(f"the server did not start: {box.get('error')!r}")
    try:
        yield Server(box["url"], api_key, config, box["loop"])
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(60)
        if "error" in box:
            raise box["error"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server: no API key, 2 slots."""
    with running_server(server_config(tmp_path_factory.mktemp("kvtier-http"))) as srv:
        # The first generation of a process compiles the storage kernels: pay it once, here.
        srv.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
        yield srv

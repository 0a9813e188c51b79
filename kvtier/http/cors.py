"""CORS: which browser origins may call the API (``server.cors_origins``).

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, before the API
key is checked: browsers send it without credentials. Every other response to an allowed origin
carries ``Access-Control-Allow-Origin`` (set as the response is prepared, so streamed replies and
error JSON get it too). With no origins configured nothing is added and OPTIONS is a 405.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

ALLOW_HEADERS = "Authorization, Content-Type, X-Session-Id"
EXPOSE_HEADERS = "X-Session-Id, Retry-After"
MAX_AGE_S = 600


@dataclass(frozen=True, slots=True)
class Cors:
    origins: tuple[str, ...]
    """Allowed origins; ``*`` allows any."""

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin in self.origins)

    def _allow(self, headers: Any, origin: str) -> None:
        headers["Access-Control-Allow-Origin"] = "*" if "*" in self.origins else origin
        if "*" not in self.origins:
            headers["Vary"] = "Origin"

    @web.middleware
    async def preflight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers \
                or not self.allowed(origin):
            return await handler(request)
        allowed = _methods(request)
        if not allowed:
            return await handler(request)  # an unknown path: 404 as usual
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ", ".join(sorted(allowed)),
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S)})

    async def headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: the origin's headers on every response to it."""
        origin = request.headers.get("Origin")
        if self.allowed(origin) and "Access-Control-Allow-Origin" not in response.headers:
            assert origin is not None
            self._allow(response.headers, origin)
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


def _methods(request: web.Request) -> set[str]:
    """The methods the requested path's routes take (none route OPTIONS, so a path that exists
    resolves to a 405 naming them)."""
    exc = getattr(request.match_info, "http_exception", None)
    return set(exc.allowed_methods) if isinstance(exc, web.HTTPMethodNotAllowed) else set()

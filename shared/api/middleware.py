"""The base of the services' middleware: plain ASGI, HTTP requests only.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which relays every chunk of a request
body through a task and a memory stream: a real cost on multi-megabyte uploads.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMiddleware:
    """Wraps `app`; HTTP requests go through `handle`, anything else (lifespan) straight on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class NotingSend:
    """Wraps `send`: notes the response's status (500 until one starts: an exception) and
    lets `on_start` add to the response-start message, e.g. a header."""

    def __init__(self, send: Send, on_start: Callable[[Message], None] | None = None) -> None:
        self._send = send
        self._on_start = on_start
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self._on_start is not None:
                self._on_start(message)
        await self._send(message)

"""The base of the services' middleware: plain ASGI, HTTP requests only.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which relays every chunk of a request
body through a task and a memory stream: a real cost on multi-megabyte uploads.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


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

"""Request-body size limit, enforced while the body streams in rather than after."""

from __future__ import annotations

import contextlib

from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from shared.api.errors import error_body
from shared.api.middleware import HttpMiddleware


class BodyTooLarge(Exception):
    """Raised from `receive` once the streamed body passes the limit."""


def _response(limit: int) -> JSONResponse:
    return JSONResponse(
        error_body(
            "request_too_large",
            f"the request body exceeds {limit} bytes; split the upload into several requests",
            {"limit_bytes": limit},
        ),
        status_code=413,
    )


class BodySizeLimit(HttpMiddleware):
    """Counts body bytes as they arrive and stops the request at the limit with 413.

    A declared Content-Length over the limit is answered before the app runs. A body that
    streams past the limit makes `receive` raise, so the parser never sees the bytes beyond
    it (nothing past the limit reaches disk or storage); whatever the app then tries to
    answer (the body parser turns any such error into a 400) is replaced by the 413.
    The limit is read from the app's settings on every request.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int = scope["app"].state.settings.max_request_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _response(limit)(scope, receive, send)
            return
        received = 0
        exceeded = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if not exceeded:
                await send(message)
            elif not answered:
                answered = True
                await _response(limit)(scope, receive, send)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not answered:
            await _response(limit)(scope, receive, send)

"""Request ids and one structured access-log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Receive, Scope, Send

from shared.api.middleware import HttpMiddleware, NotingSend
from shared.logs import log_context

log = logging.getLogger("access")
REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept only if it is short and plain; anything else is replaced.
ACCEPTED_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ID_PARAMS = {"batch_id": "batch_id", "image_id": "image_id", "run_id": "run_id"}


def route_template(scope: Scope) -> str | None:
    """The matched route's path template ("/v1/batches/{batch_id}"), once routing ran."""
    return getattr(scope.get("route"), "path", None)


class RequestContext(HttpMiddleware):
    """Gives every request an id (the caller's X-Request-ID when plain, else a new one),
    binds it to the request's log lines, answers with it, and logs one access line."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = offered if ACCEPTED_REQUEST_ID.match(offered) else uuid.uuid4().hex
        started = time.perf_counter()
        noting = NotingSend(
            send, lambda start: MutableHeaders(scope=start).append(REQUEST_ID_HEADER, request_id)
        )
        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, noting)
            finally:
                params = scope.get("path_params", {})
                log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    route_template(scope) or scope["path"],
                    noting.status,
                    (time.perf_counter() - started) * 1000,
                    extra={field: str(params[p]) for p, field in ID_PARAMS.items() if p in params},
                )


def install_request_logging(app: FastAPI) -> None:
    app.add_middleware(RequestContext)

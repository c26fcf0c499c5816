"""Request ids and one structured access-log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from shared.logs import log_context

log = logging.getLogger("access")
REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept only if it is short and plain; anything else is replaced.
ACCEPTED_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ID_PARAMS = {"batch_id": "batch_id", "image_id": "image_id", "run_id": "run_id"}


def install_request_logging(app: FastAPI) -> None:
    @app.middleware("http")
    async def _request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if ACCEPTED_REQUEST_ID.match(offered) else uuid.uuid4().hex
        started = time.perf_counter()
        with log_context(request_id=request_id):
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
            finally:
                route = getattr(request.scope.get("route"), "path", None) or request.url.path
                ids = {
                    field: str(request.path_params[param])
                    for param, field in ID_PARAMS.items()
                    if param in request.path_params
                }
                log.info(
                    "%s %s %d %.1fms",
                    request.method,
                    route,
                    status,
                    (time.perf_counter() - started) * 1000,
                    extra=ids,
                )
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

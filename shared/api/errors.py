"""One error shape for every service: {"error": {"code", "message", "detail"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError as DatabaseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from urllib3.exceptions import HTTPError as StorageConnectionError

from shared.storage import ObjectsNotDeleted

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client can act on: a status, a stable code and a message saying what to fix."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        detail: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail or {}
        self.headers = headers


def error_body(code: str, message: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail or {}}}


_HTTP_CODES = {
    400: "malformed_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.detail), exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"location": ".".join(str(p) for p in err.get("loc", ())), "message": err.get("msg")}
            for err in exc.errors()
        ]
        message = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        return JSONResponse(
            error_body(
                "invalid_request", f"the request is not valid: {message}", {"problems": problems}
            ),
            422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400:
            message += ": send a JSON body, or multipart/form-data with files in 'files'"
        return JSONResponse(
            error_body(code, message),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(DatabaseError)
    async def _database_down(request: Request, exc: DatabaseError) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            error_body(
                "database_unavailable",
                "the database is unavailable; retry after the delay in Retry-After",
            ),
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(StorageConnectionError)
    @app.exception_handler(ObjectsNotDeleted)
    async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
        # Endpoints that can leave something half-done catch these themselves (an upload
        # discards what it stored); the rest, erasure included, are safe to retry as they are.
        log.warning(
            "object storage unavailable on %s %s: %s", request.method, request.url.path, exc
        )
        return JSONResponse(
            error_body(
                "storage_unavailable",
                "object storage is unavailable; retry after the delay in Retry-After",
            ),
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(
                "internal_error", "an unexpected error occurred; it was logged and can be retried"
            ),
            500,
        )

"""A small Python client for the ingest and results APIs."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

MEDIA_TYPES = {
    ".dcm": "application/dicom",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}


class ApiClientError(Exception):
    """The service answered with an error; `code` is its stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class Client:
    def __init__(
        self, *, ingest_url: str, results_url: str, api_key: str, timeout: float = 60.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        self._ingest = httpx.Client(base_url=ingest_url, headers=headers, timeout=timeout)
        self._results = httpx.Client(base_url=results_url, headers=headers, timeout=timeout)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **options: float) -> Client:
        """A client from SCREENING_INGEST_URL, SCREENING_RESULTS_URL and SCREENING_API_KEY."""
        return cls(
            ingest_url=env["SCREENING_INGEST_URL"],
            results_url=env["SCREENING_RESULTS_URL"],
            api_key=env["SCREENING_API_KEY"],
            **options,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close_connections()

    def close_connections(self) -> None:
        self._ingest.close()
        self._results.close()

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.is_success:
            body: dict[str, Any] = response.json()
            return body
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": response.text[:500], "detail": {}}
        raise ApiClientError(
            response.status_code,
            error.get("code", "http_error"),
            error.get("message", ""),
            error.get("detail") or {},
        )

    def create_batch(self, name: str, *, priority: str = "normal") -> dict[str, Any]:
        return self._json(
            self._ingest.post("/v1/batches", json={"name": name, "priority": priority})
        )

    def upload(self, batch_id: str, paths: Sequence[Path], **fields: str) -> dict[str, Any]:
        with ExitStack() as stack:
            files = [
                (
                    "files",
                    (
                        p.name,
                        stack.enter_context(open(p, "rb")),
                        MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream"),
                    ),
                )
                for p in paths
            ]
            return self._json(
                self._ingest.post(f"/v1/batches/{batch_id}/images", files=files, data=fields)
            )

    def close_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._ingest.post(f"/v1/batches/{batch_id}/close"))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._results.get(f"/v1/batches/{batch_id}"))

    def wait(self, batch_id: str, *, timeout: float, poll: float = 10.0) -> dict[str, Any]:
        """Wait until the batch completes; raises TimeoutError with its last counts.

        Long polls: each request waits up to `poll` seconds on the server for the batch to
        change (ETag / If-None-Match), so progress arrives as it happens at one request per
        change, not one per second.
        """
        deadline = time.monotonic() + timeout
        status = self.batch(batch_id)
        etag: str | None = None
        while status["status"] != "completed":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"batch {batch_id} not completed after {timeout:.0f}s: "
                    f"{status['status']} {status['counts']}"
                )
            response = self._results.get(
                f"/v1/batches/{batch_id}",
                params={"wait": round(min(poll, remaining), 2)},
                headers={"If-None-Match": etag} if etag else {},
            )
            if response.status_code != 304:
                status = self._json(response)
                etag = response.headers.get("ETag")
        return status

    def iter_results(self, batch_id: str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = self._json(self._results.get(f"/v1/batches/{batch_id}/results", params=params))
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

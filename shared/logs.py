"""Process-wide logging: one JSON object per line, carrying the ids an operator searches by.

Every record has `ts`, `level`, `service`, `logger` and `message`; `request_id` while a web
request is handled (also returned as the `X-Request-ID` header), and `batch_id`, `image_id`,
`run_id` where the code knows them (passed as `extra=` or bound with `log_context`).
`SCREENING_LOG_FORMAT=text` gives the old one-line text form for reading in a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("request_id", "batch_id", "image_id", "run_id", "task_id")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "log_context", default=None
)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Bind ids to every record logged inside the block (this thread or task only)."""
    bound = {k: str(v) for k, v in fields.items() if v}
    token = _context.set({**(_context.get() or {}), **bound})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get() or {})
        for name in CONTEXT_FIELDS:
            if name in record.__dict__:
                entry[name] = str(record.__dict__[name])
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str) -> None:
    level = os.environ.get("SCREENING_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    if os.environ.get("SCREENING_LOG_FORMAT", "json").lower() == "text":
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
        )
    else:
        handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

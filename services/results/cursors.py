"""Opaque keyset cursors: base64 of the last row's sort key."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from shared.api.errors import ApiError

T = TypeVar("T")


def encode(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def _decode(cursor: str, count: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as err:
        raise _invalid() from err
    if not isinstance(parts, list) or len(parts) != count:
        raise _invalid()
    return [str(p) for p in parts]


def _invalid() -> ApiError:
    return ApiError(
        422, "invalid_cursor", "the cursor is not one this API returned; pass next_cursor unchanged"
    )


def decode_id_cursor(cursor: str) -> uuid.UUID:
    (image_id,) = _decode(cursor, 1)
    try:
        return uuid.UUID(image_id)
    except ValueError as err:
        raise _invalid() from err


def decode_batch_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    created, batch_id = _decode(cursor, 2)
    try:
        return datetime.fromisoformat(created), uuid.UUID(batch_id)
    except ValueError as err:
        raise _invalid() from err


def id_page(
    rows: Sequence[T], limit: int, id_of: Callable[[T], uuid.UUID]
) -> tuple[list[T], str | None]:
    """Split a fetch of limit + 1 rows into the page and the next page's cursor (None: last)."""
    page = list(rows[:limit])
    return page, (encode(str(id_of(page[-1]))) if len(rows) > limit else None)

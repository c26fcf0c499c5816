"""Keyed pseudonyms for identifiers the service keeps in place of the originals: the same
input and server secret give the same pseudonym, so a site's own identifier still finds its
records, and nothing without the secret turns one back. Free of imaging libraries, so the
results service can derive them too."""

from __future__ import annotations

import hashlib
import hmac


def pseudonymous_uid(secret: str, uid: str) -> str:
    """A DICOM UID (2.25 form) standing in for `uid`."""
    digest = hmac.new(secret.encode(), b"uid:" + uid.encode(), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"

"""DICOMweb STOW-RS (PS3.18 10.5): `POST /dicomweb/studies[/{study}]`.

The body is `multipart/related; type="application/dicom"`, read part by part as it arrives:
each part is spooled (memory, then a temporary file) and goes through the same intake and
study assembly as a C-STORE (`shared/dicom_studies.py`). The answer is the Store Instances
Response in DICOM JSON: 200 when every instance was stored, 202 when some failed, 409 when
none was; each failure with its reason. An outage of Postgres or the object store answers
503 with Retry-After: what was stored before it stays stored, and a retry of the whole
request stores each instance once.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any, BinaryIO, cast

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from minio.error import S3Error
from sqlalchemy.exc import SQLAlchemyError
from urllib3.exceptions import HTTPError as StorageConnectionError

from services.ingest.deps import CallerDep, ProducerDep, SettingsDep, StoreDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import COMMON_ERRORS, error_responses
from shared.db.models import BatchSource, Scope
from shared.dicom_studies import Outcome, Receipt, Sender, queue_received, receive_instance
from shared.imaging.formats import RejectCode

STORE_RESPONSE = {"content": {"application/dicom+json": {"schema": {"type": "object"}}}}
router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/dicomweb",
    tags=["dicomweb"],
    responses={
        **COMMON_ERRORS,
        **error_responses(413, 415),
        200: {"description": "every instance stored", **STORE_RESPONSE},
        202: {"description": "some instances failed (FailedSOPSequence)", **STORE_RESPONSE},
        409: {"description": "no instance stored (FailedSOPSequence)", **STORE_RESPONSE},
    },
)

DICOM_JSON = "application/dicom+json"
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
# Failure Reason (0008,1197) per refusal, from PS3.18 Table I.2-2 and PS3.4 C-STORE statuses.
PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, CANNOT_UNDERSTAND = 0x0110, 0x0122, 0xC000
STUDY_DOES_NOT_MATCH = 0xA900
FAILURE_REASONS = {
    RejectCode.NOT_MAMMOGRAPHY: SOP_CLASS_NOT_SUPPORTED,
    RejectCode.NOT_DICOM_IMAGE: SOP_CLASS_NOT_SUPPORTED,
    RejectCode.INVALID_DICOM: CANNOT_UNDERSTAND,
    RejectCode.EMPTY_FILE: CANNOT_UNDERSTAND,
    RejectCode.UNSUPPORTED_MEDIA_TYPE: CANNOT_UNDERSTAND,
    RejectCode.STUDY_MISMATCH: STUDY_DOES_NOT_MATCH,
}
TRANSIENT_ERRORS = (SQLAlchemyError, S3Error, StorageConnectionError, ConnectionError, TimeoutError)


def _boundary(content_type: str) -> bytes:
    """The multipart boundary, or a 415 saying what STOW-RS takes."""
    media = content_type.split(";", 1)[0].strip().lower()
    kind = re.search(r'type="?([^";]+)"?', content_type, re.IGNORECASE)
    boundary = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if media != "multipart/related" or boundary is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            'STOW-RS takes Content-Type: multipart/related; type="application/dicom"; '
            f"boundary=...; this request is {media or 'untyped'}",
        )
    if kind is not None and kind.group(1).strip().lower() != "application/dicom":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"only DICOM parts (type=application/dicom) can be stored, not {kind.group(1)}",
        )
    return boundary.group(1).encode()


async def parts(stream: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[BinaryIO]:
    """Each part's body of a multipart body, spooled, as the bytes arrive. The parts' own
    headers are read and not needed: every part is taken for a DICOM file."""
    delimiter = b"\r\n--" + boundary
    buffer = b"\r\n"  # the first delimiter has no CRLF before it
    part: Any = None
    in_headers = False
    async for chunk in stream:
        buffer += chunk
        while True:
            if part is None and not in_headers:
                start = buffer.find(delimiter)
                if start < 0:
                    buffer = buffer[-len(delimiter) :]
                    break
                after = buffer[start + len(delimiter) :]
                if after[:2] == b"--":
                    return  # the closing delimiter
                if len(after) < 2:
                    break
                buffer, in_headers = after, True
            if in_headers:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                buffer, in_headers = buffer[end + 4 :], False
                part = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115 (closed once its caller is done with it)
            if part is not None:
                end = buffer.find(delimiter)
                if end < 0:
                    keep = len(delimiter)
                    part.write(buffer[:-keep])
                    buffer = buffer[-keep:]
                    break
                part.write(buffer[:end])
                buffer = buffer[end:]
                part.seek(0)
                yield cast(BinaryIO, part)
                part.close()
                part = None
    if part is not None or in_headers:
        raise ApiError(
            400,
            "invalid_multipart",
            "the multipart body ended before its closing boundary; send the whole request",
        )


def _item(receipt: Receipt, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if receipt.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [receipt.sop_class_uid]}
    if receipt.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [receipt.sop_instance_uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


async def _store(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    producer: ProducerDep,
    study: str | None,
) -> Response:
    boundary = _boundary(request.headers.get("content-type", ""))
    sender = Sender(tenant_id=caller.tenant.id, source=BatchSource.DICOMWEB, label="STOW-RS")
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    received: list[uuid.UUID] = []
    try:
        async for body in parts(request.stream(), boundary):
            try:
                receipt = await run_in_threadpool(
                    receive_instance,
                    body,
                    sender=sender,
                    settings=settings,
                    store=store,
                    expected_study_uid=study,
                )
            except TRANSIENT_ERRORS as err:
                raise ApiError(
                    503,
                    "storage_unavailable",
                    f"{len(stored)} instances were stored before the database or object "
                    "store became unavailable; retry the request (stored instances are not "
                    "stored twice)",
                    headers={"Retry-After": "5"},
                ) from err
            if receipt.outcome == Outcome.REFUSED:
                assert receipt.rejection is not None
                code = receipt.rejection.code
                failed.append(_item(receipt, FAILURE_REASONS.get(code, PROCESSING_FAILURE)))
            else:
                stored.append(_item(receipt))
                if receipt.outcome == Outcome.STORED and receipt.image_id is not None:
                    received.append(receipt.image_id)
    finally:
        # What was committed is queued, even when a later part met an outage.
        await run_in_threadpool(queue_received, settings, producer, received)
    answer: dict[str, Any] = {}
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    status = 409 if not stored else 202 if failed else 200
    return Response(json.dumps(answer), status_code=status, media_type=DICOM_JSON)


@router.post("/studies", response_class=Response)
async def stow_studies(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    producer: ProducerDep,
) -> Response:
    """Store instances of any studies (STOW-RS)."""
    return await _store(request, caller, settings, store, producer, None)


@router.post("/studies/{study}", response_class=Response)
async def stow_study(
    study: str,
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    producer: ProducerDep,
) -> Response:
    """Store instances of one study (STOW-RS); an instance of another study fails."""
    return await _store(request, caller, settings, store, producer, study)

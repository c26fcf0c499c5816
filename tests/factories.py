"""Row factories for tests: plain functions, committed so other connections see the rows."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from devstack.synth import SynthOptions
from shared.batches import create_batch, get_or_create_study
from shared.db.models import (
    DEFAULT_SCOPES,
    Batch,
    BatchPriority,
    Image,
    Laterality,
    ModelVersion,
    Scope,
    Tenant,
    View,
)
from shared.storage import ObjectStore
from shared.tenants import create_tenant, issue_api_key


def make_tenant(
    session: Session, name: str | None = None, *, scopes: Iterable[Scope] = DEFAULT_SCOPES
) -> tuple[Tenant, str]:
    """A committed tenant and the secret of its first API key (submit and read, unless told)."""
    tenant = create_tenant(session=session, name=name or f"tenant-{uuid.uuid4().hex[:8]}")
    secret = issue_api_key(session=session, tenant=tenant, scopes=scopes).secret
    session.commit()
    return tenant, secret


def make_batch(
    session: Session,
    tenant: Tenant,
    *,
    name: str = "batch",
    priority: BatchPriority = BatchPriority.NORMAL,
) -> Batch:
    batch = create_batch(session=session, tenant_id=tenant.id, name=name, priority=priority)
    session.commit()
    return batch


def make_image(
    session: Session,
    batch: Batch,
    *,
    study_key: str = "study-1",
    object_key: str | None = None,
    media_type: str = "application/dicom",
    laterality: Laterality | None = Laterality.LEFT,
    view: View | None = View.CC,
    data: bytes = b"",
) -> Image:
    study_id = get_or_create_study(
        session=session,
        tenant_id=batch.tenant_id,
        batch_id=batch.id,
        study_key=study_key,
        patient_key="p" * 64,
    )
    image = Image(
        tenant_id=batch.tenant_id,
        batch_id=batch.id,
        study_id=study_id,
        filename=f"{uuid.uuid4().hex[:6]}.dcm",
        object_key=object_key or f"test/{uuid.uuid4()}",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        media_type=media_type,
        laterality=laterality,
        view=view,
    )
    session.add(image)
    session.commit()
    return image


def make_model_version(session: Session, *, trained: bool = False) -> ModelVersion:
    """A committed model version row (no checkpoint object behind it)."""
    version = ModelVersion(
        name=f"m-{uuid.uuid4().hex[:6]}", architecture={}, checkpoint_key="k", trained=trained
    )
    session.add(version)
    session.commit()
    return version


def make_stored_image(session: Session, store: ObjectStore, batch: Batch, data: bytes) -> Image:
    """An image row whose object really is in the object store."""
    key = f"test/{uuid.uuid4()}"
    store.put_bytes(key, data, content_type="application/dicom")
    return make_image(session, batch, object_key=key, data=data)


# Small synthetic images (256 x 208 at 0.8 mm) for tests that need many of them quickly.
SMALL_SYNTH = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
# A tiny network at a small input: a training epoch on a few dozen exams takes seconds.
TINY_TRAINING: dict[str, Any] = {
    "input_height": 128,
    "input_width": 112,
    "stem_channels": 4,
    "stage_channels": [4, 8, 8, 8],
    "patience": 100,
    # One train/validation/test split (a few dozen exams would default to cross-validation),
    # from scratch (the shipped model's layers are wider anyway).
    "folds": 1,
    "init_from": "none",
}

"""Erasure on request: a batch, or every exam of one patient, removed from every table and
the object store (shared/erasure.py). Needs the `erase` scope, which no key has unless an
operator gives it (`screening admin key create --scope erase`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.ingest.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import COMMON_ERRORS, PlainText, error_responses
from shared.db.models import AuditAction, Scope
from shared.erasure import ErasureReport, erase_batch, erase_patient, patient_keys
from shared.lifecycle import refresh_batches

router = APIRouter(
    dependencies=[require_scope(Scope.ERASE)],
    prefix="/v1",
    tags=["erasure"],
    responses={**COMMON_ERRORS, **error_responses(404)},
)


class PatientErasure(BaseModel):
    # The patient id as the site knows it (DICOM Patient ID, or the patient_id given with a
    # PNG/JPEG upload): the service derives the keyed hash it stored and never keeps this.
    patient_id: Annotated[PlainText, Field(min_length=1, max_length=64)]


class Erased(BaseModel):
    """What an erasure removed, by kind (zeros: nothing was left to remove)."""

    batches: int
    studies: int
    images: int
    objects: int
    predictions: int
    shadow_scores: int
    outcomes: int
    identity_records: int
    dicom_results: int
    training_examples: int
    rejected_files: int


@router.delete("/batches/{batch_id}", response_model=Erased)
def delete_batch(
    batch_id: uuid.UUID, session: SessionDep, caller: CallerDep, store: StoreDep
) -> Erased:
    """Erase the batch and everything in it, whatever its state (images still being screened
    end without a result). A batch already erased answers 404, like one that never was."""
    report = erase_batch(session, store, tenant_id=caller.tenant.id, batch_id=batch_id)
    if report is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")
    return _audited(session, caller, report, "batch", batch_id)


@router.post("/erasures", response_model=Erased)
def post_erasure(
    body: PatientErasure,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
) -> Erased:
    """Erase every exam of one patient in this tenant: studies, images, objects, results,
    outcomes, vault records. Idempotent: asking again answers zeros. The same patient id at
    another tenant is another patient, untouched."""
    keys = patient_keys(settings.patient_key_secret, caller.tenant.id, body.patient_id)
    report = erase_patient(session, store, tenant_id=caller.tenant.id, keys=keys)
    refresh_batches(session=session, batch_ids=report.batch_ids)
    return _audited(session, caller, report, "patient", None)


def _audited(
    session: SessionDep,
    caller: CallerDep,
    report: ErasureReport,
    resource_type: str,
    resource_id: uuid.UUID | None,
) -> Erased:
    """The fact of the erasure (who, when, how many of each kind), never whom it was of."""
    counts = report.counts()
    caller.audit(session, AuditAction.ERASE, resource_type, resource_id, **counts)
    session.commit()
    return Erased(**counts)

"""Put an exam's original identifiers back into its de-identified DICOM results, on the way
out (a delivery to the site, or a download by a key with the `export_identified` scope).

The rendered objects carry the pseudonymous UIDs of the images they refer to, and the study's
patient and study attributes as the de-identified images had them. Here every pseudonymous
UID anywhere in the object (the study, the referenced series, instances and frame of
reference, in any sequence) becomes the original it was derived from, and the patient and
study attributes become the originals. Our objects' own UIDs stay as they are.
"""

from __future__ import annotations

import copy
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.models import ExamExport, Image
from shared.imaging.deid import Deidentifier
from shared.imaging.formats import MediaType
from shared.imaging.intake import deidentifier_for
from shared.storage import ObjectStore
from shared.vault import OriginalIdentity, open_identities

# The Patient and General Study attributes a returned object takes from the original study.
STUDY_ATTRIBUTES = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_id": "StudyID",
    "referring_physician_name": "ReferringPhysicianName",
}
DEIDENTIFICATION_MARKS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)


def original_uid_map(
    identities: Sequence[OriginalIdentity], deidentifier: Deidentifier
) -> dict[str, str]:
    """pseudonymous UID -> original UID, for every UID the identities hold."""
    return {
        deidentifier.pseudonymous_uid(uid): uid
        for identity in identities
        for uid in identity.original_uids()
    }


def _replace_uids(dataset: Dataset, originals: dict[str, str]) -> None:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                _replace_uids(item, originals)
        elif element.VR == "UI" and element.value:
            if element.VM > 1:
                element.value = [originals.get(str(v), str(v)) for v in element.value]
            else:
                element.value = originals.get(str(element.value), str(element.value))


def reidentify(
    dataset: Dataset, identities: Sequence[OriginalIdentity], deidentifier: Deidentifier
) -> Dataset:
    """A copy of `dataset` carrying the original identifiers of the exam's images."""
    identified = copy.deepcopy(dataset)
    _replace_uids(identified, original_uid_map(identities, deidentifier))
    study = identities[0]
    for field, keyword in STUDY_ATTRIBUTES.items():
        setattr(identified, keyword, getattr(study, field) or "")
    for keyword in DEIDENTIFICATION_MARKS:
        if keyword in identified:
            delattr(identified, keyword)
    return identified


# -- identities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportObjects:
    datasets: Sequence[Dataset]
    identified: bool


def export_objects(
    session: Session,
    *,
    settings: Settings,
    store: ObjectStore,
    export: ExamExport,
    keys: Sequence[str] | None = None,
    identified: bool,
    actor: str,
    purpose: str,
) -> ExportObjects:
    """The exam's stored objects (or those under `keys`), with the original identifiers put
    back when `identified` and the vault holds them. Raises VaultKeyMissing."""
    wanted = [o["key"] for o in export.objects if keys is None or o["key"] in keys]
    datasets = [pydicom.dcmread(io.BytesIO(store.get_bytes(key))) for key in wanted]
    if not identified:
        return ExportObjects(datasets, identified=False)
    image_ids = list(
        session.scalars(
            select(Image.id).where(
                Image.study_id == export.study_id, Image.media_type == MediaType.DICOM.value
            )
        )
    )
    identities: dict[uuid.UUID, OriginalIdentity] = open_identities(
        session,
        settings=settings,
        tenant_id=export.tenant_id,
        image_ids=image_ids,
        purpose=purpose,
        actor=actor,
        resource_type="study",
        resource_id=export.study_id,
    )
    if not identities:
        return ExportObjects(datasets, identified=False)
    deidentifier = deidentifier_for(settings.patient_key_secret)
    ordered = [identities[i] for i in image_ids if i in identities]
    return ExportObjects([reidentify(d, ordered, deidentifier) for d in datasets], identified=True)

"""The identity vault: each DICOM image's original identifiers, sealed with AES-GCM.

Everything stored is de-identified (shared/imaging/deid.py), yet a result only helps if it
lands in the patient's real study. So, at intake, the identifiers a returned object must carry
(the original UIDs, patient id and name, birth date and sex, accession number, study date and
time, referring physician) are sealed here and kept in Postgres, one row per image, and
nowhere else: not in object storage, logs, metrics or API responses. Only the export step
opens them (a delivery to the site's PACS, or a download or view by a key with the
`export_identified` scope), and every opening is audited.

Keys: `SCREENING_VAULT_KEYS` (JSON `{"key id": "base64 of 32 random bytes"}`) or the same
JSON in `SCREENING_VAULT_KEY_FILE`; `SCREENING_VAULT_ACTIVE_KEY` names the key that seals new
rows. Each row records its key id, so a key can be rotated: new rows take the new key, and old
rows still open while the old key stays configured. The associated data binds a row to its
tenant and image, so a sealed record moved to another image does not open. Threat model:
docs/security.md.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import audit
from shared.config import Settings
from shared.db.models import AuditAction, IdentityRecord

NONCE_BYTES = 12
KEY_BYTES = 32


class VaultKeyMissing(Exception):
    """A sealed row's key is not configured (rotated out, or the key file is missing)."""

    code = "vault_key_missing"

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"the identity vault key {key_id!r} is not configured; add it to "
            "SCREENING_VAULT_KEYS or SCREENING_VAULT_KEY_FILE (keep rotated-out keys there "
            "while rows sealed with them remain)"
        )
        self.key_id = key_id


class VaultNotConfigured(Exception):
    code = "vault_not_configured"

    def __init__(self) -> None:
        super().__init__(
            "no identity vault key is configured (SCREENING_VAULT_KEYS or "
            "SCREENING_VAULT_KEY_FILE, and SCREENING_VAULT_ACTIVE_KEY)"
        )


class OriginalIdentity(BaseModel):
    """What a returned object needs to land in the patient's real study."""

    study_instance_uid: str
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None

    def original_uids(self) -> list[str]:
        uids = (
            self.study_instance_uid,
            self.series_instance_uid,
            self.sop_instance_uid,
            self.frame_of_reference_uid,
        )
        return [uid for uid in uids if uid]


@dataclass(frozen=True)
class SealedIdentity:
    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class VaultKeys:
    keys: dict[str, bytes]
    active: str | None

    def key(self, key_id: str) -> bytes:
        if key_id not in self.keys:
            raise VaultKeyMissing(key_id)
        return self.keys[key_id]


def _json_object(text: str, source: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not JSON: {err}") from err
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f'{source} must be a JSON object {{"key id": "base64 key"}}')
    return value


def _decode_keys(mapping: dict[str, str], source: str) -> dict[str, bytes]:
    keys = {}
    for key_id, encoded in mapping.items():
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError as err:
            raise ValueError(f"vault key {key_id!r} {source}is not base64") from err
        if len(raw) != KEY_BYTES:
            raise ValueError(f"vault key {key_id!r} {source}is not {KEY_BYTES} bytes")
        keys[key_id] = raw
    return keys


def check_vault_settings(settings: Settings) -> None:
    """Fail at start, not at the first DICOM image, when the vault's keys are unusable.
    Keys are read once per process: restart the services after changing them."""
    vault_keys(settings)


@lru_cache(maxsize=8)
def vault_keys(settings: Settings) -> VaultKeys:
    keys = _decode_keys(_json_object(settings.vault_keys or "{}", "SCREENING_VAULT_KEYS"), "")
    if settings.vault_key_file is not None:
        source = str(settings.vault_key_file)
        if not settings.vault_key_file.exists():
            raise ValueError(f"SCREENING_VAULT_KEY_FILE {source} does not exist")
        from_file = _json_object(settings.vault_key_file.read_text(), source)
        keys.update(_decode_keys(from_file, f"in {source} "))
    active = settings.vault_active_key
    if active is None and len(keys) == 1:
        (active,) = keys
    if active is not None and active not in keys:
        raise ValueError(f"SCREENING_VAULT_ACTIVE_KEY {active!r} is not among the vault keys")
    return VaultKeys(keys=keys, active=active)


def new_key() -> str:
    """A fresh key, as SCREENING_VAULT_KEYS and the key file spell it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _associated_data(tenant_id: uuid.UUID, image_id: uuid.UUID) -> bytes:
    return f"mammoscreen-identity:{tenant_id}:{image_id}".encode()


def seal(
    identity: OriginalIdentity, *, keys: VaultKeys, tenant_id: uuid.UUID, image_id: uuid.UUID
) -> SealedIdentity:
    if keys.active is None:
        raise VaultNotConfigured()
    nonce = os.urandom(NONCE_BYTES)
    plaintext = identity.model_dump_json(exclude_none=True).encode()
    ciphertext = AESGCM(keys.key(keys.active)).encrypt(
        nonce, plaintext, _associated_data(tenant_id, image_id)
    )
    return SealedIdentity(keys.active, nonce, ciphertext)


def open_record(record: IdentityRecord, keys: VaultKeys) -> OriginalIdentity:
    plaintext = AESGCM(keys.key(record.key_id)).decrypt(
        record.nonce, record.ciphertext, _associated_data(record.tenant_id, record.image_id)
    )
    return OriginalIdentity.model_validate_json(plaintext)


def record_of(
    sealed: SealedIdentity, *, tenant_id: uuid.UUID, image_id: uuid.UUID
) -> IdentityRecord:
    return IdentityRecord(image_id=image_id, tenant_id=tenant_id, **asdict(sealed))


def open_identities(
    session: Session,
    *,
    settings: Settings,
    tenant_id: uuid.UUID,
    image_ids: Sequence[uuid.UUID],
    purpose: str,
    actor: str,
    resource_type: str,
    resource_id: uuid.UUID | None,
) -> dict[uuid.UUID, OriginalIdentity]:
    """The original identities of those of `image_ids` the vault holds, audited as one event
    in the caller's transaction. Raises VaultKeyMissing when a row's key is not configured."""
    records = list(
        session.scalars(
            select(IdentityRecord).where(
                IdentityRecord.tenant_id == tenant_id, IdentityRecord.image_id.in_(image_ids)
            )
        )
    )
    if not records:
        return {}
    keys = vault_keys(settings)
    opened = {record.image_id: open_record(record, keys) for record in records}
    audit.record(
        session=session,
        tenant_id=tenant_id,
        key_prefix=actor,
        action=AuditAction.DECRYPT_IDENTITY,
        resource_type=resource_type,
        resource_id=resource_id,
        detail={"purpose": purpose, "images": len(opened)},
    )
    return opened

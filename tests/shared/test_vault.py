"""The vault's sealing, on its own: rotation, binding to the image, refusing bad keys."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from shared.config import Settings
from shared.vault import (
    OriginalIdentity,
    VaultKeyMissing,
    check_vault_settings,
    new_key,
    open_record,
    record_of,
    seal,
    vault_keys,
)

IDENTITY = OriginalIdentity(study_instance_uid="1.2.3", patient_id="PID-1", patient_name="DOE^J")


def test_a_row_names_its_key_and_opens_after_rotation_while_that_key_stays() -> None:
    old, new = new_key(), new_key()
    tenant, image = uuid.uuid4(), uuid.uuid4()
    before = vault_keys(Settings(vault_keys=json.dumps({"old": old})))
    record = record_of(
        seal(IDENTITY, keys=before, tenant_id=tenant, image_id=image),
        tenant_id=tenant,
        image_id=image,
    )
    assert record.key_id == "old"
    assert b"PID-1" not in record.ciphertext
    rotated = vault_keys(
        Settings(vault_keys=json.dumps({"old": old, "new": new}), vault_active_key="new")
    )
    assert seal(IDENTITY, keys=rotated, tenant_id=tenant, image_id=image).key_id == "new"
    assert open_record(record, rotated) == IDENTITY
    with pytest.raises(VaultKeyMissing, match="'old'"):
        open_record(record, vault_keys(Settings(vault_keys=json.dumps({"new": new}))))


def test_a_sealed_row_moved_to_another_image_does_not_open() -> None:
    keys = vault_keys(Settings(vault_keys=json.dumps({"k": new_key()})))
    tenant, image = uuid.uuid4(), uuid.uuid4()
    sealed = seal(IDENTITY, keys=keys, tenant_id=tenant, image_id=image)
    moved = record_of(sealed, tenant_id=tenant, image_id=uuid.uuid4())
    with pytest.raises(InvalidTag):
        open_record(moved, keys)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("not json", "not JSON"),
        ('["a"]', "JSON object"),
        ('{"k": "***"}', "not base64"),
        ('{"k": "QUFBQUFBQUE="}', "not 32 bytes"),
    ],
)
def test_unusable_keys_are_refused_at_start(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_vault_settings(Settings(vault_keys=value))


def test_a_missing_key_file_or_an_unknown_active_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_vault_settings(Settings(vault_key_file=tmp_path / "none.json"))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"a": new_key()}))
    check_vault_settings(Settings(vault_key_file=keys))
    with pytest.raises(ValueError, match="not among"):
        check_vault_settings(Settings(vault_key_file=keys, vault_active_key="b"))

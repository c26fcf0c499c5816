from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.models import ApiKey
from shared.tenants import authenticate, hash_key, issue_api_key
from tests.factories import make_tenant


def test_issued_key_authenticates_its_tenant(session: Session) -> None:
    tenant, secret = make_tenant(session)
    found = authenticate(session=session, secret=secret)
    assert found is not None
    assert found.id == tenant.id


def test_many_keys_authenticate_whatever_characters_the_secret_has(session: Session) -> None:
    # Secrets are URL-safe base64 and may contain '_' and '-'.
    tenant, _ = make_tenant(session)
    secrets = [issue_api_key(session=session, tenant=tenant).secret for _ in range(40)]
    session.commit()
    assert any("_" in s.split("_", 2)[2] for s in secrets)
    assert all(authenticate(session=session, secret=s) is not None for s in secrets)


def test_only_a_hash_of_the_key_is_stored(session: Session) -> None:
    _, secret = make_tenant(session)
    stored = session.scalars(select(ApiKey)).one()
    assert stored.key_hash == hash_key(secret)
    assert secret not in (stored.key_hash, stored.prefix)
    assert secret.startswith(stored.prefix + "_")


def test_wrong_malformed_and_revoked_keys_are_refused(session: Session) -> None:
    _, secret = make_tenant(session)
    assert (
        authenticate(session=session, secret=secret[:-1] + ("A" if secret[-1] != "A" else "B"))
        is None
    )
    assert authenticate(session=session, secret="not-a-key") is None
    assert authenticate(session=session, secret="") is None
    key = session.scalars(select(ApiKey)).one()
    key.revoked_at = utcnow()
    session.commit()
    assert authenticate(session=session, secret=secret) is None

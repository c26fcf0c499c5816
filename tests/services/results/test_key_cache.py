"""The results service remembers authenticated keys only while Postgres would tell it of a
change: a revoked key stops working as soon as the notice arrives."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.results.app import create_app as create_results
from shared.api.keycache import AuthenticatedKey, KeyCache
from shared.config import Settings
from shared.db.models import Tenant
from shared.tenants import revoke_api_key
from tests.factories import make_tenant
from tests.helpers import auth, wait_for


def test_a_remembered_key_is_forgotten_when_it_is_revoked(
    results: TestClient, session: Session
) -> None:
    cache: KeyCache = results.app.state.key_cache  # type: ignore[attr-defined]
    changes = results.app.state.batch_changes  # type: ignore[attr-defined]
    wait_for(changes.listening.is_set, timeout=30, what="the results app to LISTEN")
    tenant, key = make_tenant(session)
    assert results.get("/v1/batches", headers=auth(key)).status_code == 200
    remembered = cache.get(key)
    assert remembered is not None
    assert remembered.tenant.id == tenant.id

    revoke_api_key(session=session, tenant=tenant, prefix=remembered.prefix)
    session.commit()  # the trigger's NOTIFY auth_changed goes out now
    wait_for(lambda: cache.get(key) is None, timeout=5, what="the cache to forget the key")
    refused = results.get("/v1/batches", headers=auth(key))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_without_the_listener_every_request_reads_its_key(
    settings: Settings, session: Session
) -> None:
    results = TestClient(create_results(settings))  # no lifespan: nobody LISTENs
    cache: KeyCache = results.app.state.key_cache  # type: ignore[attr-defined]
    tenant, key = make_tenant(session)
    assert results.get("/v1/batches", headers=auth(key)).status_code == 200
    assert cache.get(key) is None  # not trusted: nothing would tell it of a revocation
    prefix = "_".join(key.split("_", 2)[:2])  # msk_<prefix>_<secret>
    revoke_api_key(session=session, tenant=tenant, prefix=prefix)
    session.commit()
    assert results.get("/v1/batches", headers=auth(key)).status_code == 401


def _key(tenant: Tenant) -> AuthenticatedKey:
    return AuthenticatedKey(prefix="msk_test", scopes=frozenset({"read"}), tenant=tenant)


def test_the_cache_keeps_nothing_older_than_its_ttl_or_looked_up_across_a_notice() -> None:
    now = [0.0]
    cache = KeyCache(ttl_s=30, clock=lambda: now[0])
    key = _key(Tenant(name="t"))
    cache.remember("secret", key, cache.generation)
    assert cache.get("secret") is None  # untrusted until the listener connects

    cache.trust(True)
    cache.remember("secret", key, cache.generation)
    assert cache.get("secret") is key
    now[0] = 31.0
    assert cache.get("secret") is None  # older than the TTL

    looked_up_at = cache.generation
    cache.clear()  # a notice came while the key was being looked up
    cache.remember("secret", key, looked_up_at)
    assert cache.get("secret") is None

    cache.remember("secret", key, cache.generation)
    cache.trust(False)  # the listener dropped: it may miss notices from now on
    assert cache.get("secret") is None

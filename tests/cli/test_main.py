from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from cli.main import main
from shared.config import Settings, get_settings
from shared.tenants import authenticate


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SCREENING_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_tenant_and_key_lifecycle(
    cli_env: None, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["admin", "tenant", "create", "acme", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    first_key = created["api_key"]
    assert authenticate(session=session, secret=first_key) is not None

    assert main(["admin", "tenant", "create", "acme"]) == 2  # names are unique
    assert "exists already" in capsys.readouterr().err

    assert main(["admin", "key", "create", "acme"]) == 0
    second_key = capsys.readouterr().out.strip().rsplit(" ", 1)[1]
    assert main(["admin", "key", "list", created["id"]]) == 0
    listing = capsys.readouterr().out
    prefixes = [line.split()[0] for line in listing.splitlines()]
    assert prefixes == ["_".join(k.split("_", 2)[:2]) for k in (first_key, second_key)]
    assert first_key not in listing
    assert second_key not in listing

    assert main(["admin", "key", "revoke", "acme", prefixes[0]]) == 0
    session.expire_all()
    assert authenticate(session=session, secret=first_key) is None  # at once
    assert authenticate(session=session, secret=second_key) is not None
    assert main(["admin", "key", "list", "acme"]) == 0
    assert "revoked" in capsys.readouterr().out.splitlines()[0]

    assert main(["admin", "key", "revoke", "acme", "msk_nope"]) == 2
    assert main(["admin", "key", "list", "no-such-tenant"]) == 2

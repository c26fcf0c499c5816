from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from cli.main import main
from shared.config import Settings, get_settings
from shared.tenants import authenticate, authenticate_key, find_tenant


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


def test_scoped_keys_destinations_and_the_vault_switch(
    cli_env: None, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["admin", "tenant", "create", "site"]) == 0
    capsys.readouterr()
    assert main(["admin", "key", "create", "site", "--scope", "read",
                 "--scope", "export_identified"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "scopes: export_identified, read" in out
    api_key = authenticate_key(session=session, secret=out.strip().rsplit(" ", 1)[1])
    assert api_key is not None
    assert sorted(api_key.scopes) == ["export_identified", "read"]
    assert main(["admin", "key", "list", "site"]) == 0
    assert "scopes export_identified,read" in capsys.readouterr().out

    # A node without a port cannot take results back; the error says how to fix it.
    assert main(["admin", "dicom-node", "add", "site", "--ae-title", "PACS1"]) == 0
    assert main(["admin", "destination", "add", "site", "pacs", "--ae-title", "PACS1"]) == 2
    assert "--host and --port" in capsys.readouterr().err
    assert main(["admin", "dicom-node", "add", "site", "--ae-title", "PACS2",
                 "--host", "10.1.2.3", "--port", "104"]) == 0  # fmt: skip
    assert main(["admin", "destination", "add", "site", "pacs", "--ae-title", "PACS2",
                 "--secondary-capture"]) == 0  # fmt: skip
    assert main(["admin", "destination", "add", "site", "web", "--url", "ftp://x"]) == 2
    assert main(["admin", "destination", "add", "site", "web",
                 "--url", "https://pacs.example/dicom-web"]) == 0  # fmt: skip
    assert main(["admin", "destination", "add", "site", "web", "--url", "https://x"]) == 2
    assert "taken" in capsys.readouterr().err
    assert main(["admin", "destination", "disable", "site", "web"]) == 0
    assert main(["admin", "destination", "list", "site"]) == 0
    listing = capsys.readouterr().out.splitlines()[-2:]
    assert "PACS2@10.1.2.3:104  enabled  +secondary capture" in listing[0]
    assert "https://pacs.example/dicom-web  disabled" in listing[1]

    assert main(["admin", "vault", "off", "site"]) == 0
    assert "de-identified UIDs" in capsys.readouterr().out
    session.expire_all()
    tenant = find_tenant(session=session, name_or_id="site")
    assert tenant is not None
    assert tenant.identity_vault is False
    assert main(["admin", "vault", "new-key"]) == 0
    assert len(base64.b64decode(capsys.readouterr().out.strip())) == 32

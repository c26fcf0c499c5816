"""Honest promotion on the real database: a rejected version needs --force and a reason, and
every registry change is a system event in each tenant's audit log."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from shared.db.models import ModelStatus, ModelVersion, Scope
from shared.ml.registry import RegistryError, promote, rollback
from tests.factories import make_tenant
from tests.helpers import auth


def _version(
    session: Session, name: str, status: ModelStatus, reason: str | None = None
) -> ModelVersion:
    version = ModelVersion(
        name=name,
        architecture={},
        checkpoint_key=f"models/{name}.pt",
        trained=True,
        status=status,
        rejection_reason=reason,
    )
    session.add(version)
    session.commit()
    return version


def test_a_rejected_version_is_promoted_only_with_a_reason_the_audit_log_keeps(
    session: Session, results: TestClient
) -> None:
    _, key = make_tenant(session, scopes=[Scope.READ, Scope.AUDIT])
    active = _version(session, "serving", ModelStatus.ACTIVE)
    rejected = _version(
        session, "at-chance", ModelStatus.REJECTED, "its test-split exam AUC is 0.31 ..."
    )

    for reason in (None, "  "):
        with pytest.raises(RegistryError) as refused:
            promote(session=session, version=rejected, actor="operator:ana", force_reason=reason)
        assert refused.value.code == "model_rejected"
        assert "0.31" in refused.value.message
        assert "--force" in refused.value.message
        session.rollback()
    session.refresh(active)
    session.refresh(rejected)
    assert (active.status, rejected.status) == (ModelStatus.ACTIVE, ModelStatus.REJECTED)

    previous = promote(
        session=session,
        version=rejected,
        actor="operator:ana",
        force_reason="site lead accepts it for a shadow trial",
    )
    session.commit()
    assert previous is not None
    assert previous.name == "serving"
    assert (active.status, rejected.status) == (ModelStatus.RETIRED, ModelStatus.ACTIVE)

    rollback(session=session, actor="operator:ben")
    session.commit()
    events = results.get("/v1/audit", headers=auth(key)).json()["items"]
    assert [(e["action"], e["key_prefix"], e["detail"]["name"]) for e in events] == [
        ("rollback_model", "operator:ben", "serving"),
        ("promote_model", "operator:ana", "at-chance"),
    ]
    forced = events[1]["detail"]
    assert forced["forced"] is True
    assert forced["reason"] == "site lead accepts it for a shadow trial"
    assert forced["rejection_reason"].startswith("its test-split exam AUC is 0.31")
    assert forced["previous"] == "serving"


def test_an_accepted_candidate_is_promoted_without_force(session: Session) -> None:
    _version(session, "serving", ModelStatus.ACTIVE)
    candidate = _version(session, "better", ModelStatus.CANDIDATE)
    promote(session=session, version=candidate, actor="operator:ana")
    session.commit()
    assert candidate.status == ModelStatus.ACTIVE

"""The model registry: model versions in Postgres, checkpoints in object storage."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shared.db.models import ModelStatus, ModelVersion
from shared.storage import ObjectStore

UNTRAINED_MODEL_NAME = "untrained-seed0"
REGISTRY_LOCK_KEY = 0x6D616D6D6F  # any constant unique to this lock


def active_model(*, session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE))


def ensure_active_model(*, session: Session, store: ObjectStore) -> ModelVersion:
    """The active model version; registers a seeded, randomly initialised one if none exists.

    Until a trained model is promoted, scores come from this untrained network, and its
    `trained` flag tells every consumer to say so.
    """
    current = active_model(session=session)
    if current is not None:
        return current
    # Serialise first-time registration across workers; the lock ends with the transaction.
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})
    current = active_model(session=session)
    if current is not None:
        return current
    existing = session.scalar(
        select(ModelVersion).where(ModelVersion.name == UNTRAINED_MODEL_NAME).with_for_update()
    )
    if existing is not None:
        existing.status = ModelStatus.ACTIVE
        return existing

    import torch

    from shared.ml.checkpoint import checkpoint_bytes
    from shared.ml.model import ScreeningNetConfig, build_model

    torch.manual_seed(0)
    config = ScreeningNetConfig()
    model = build_model(config)
    key = f"models/{UNTRAINED_MODEL_NAME}/checkpoint.pt"
    store.put_bytes(
        key,
        checkpoint_bytes(model, extra={"trained": False}),
        content_type="application/octet-stream",
    )
    version = ModelVersion(
        name=UNTRAINED_MODEL_NAME,
        architecture=config.to_dict(),
        checkpoint_key=key,
        status=ModelStatus.ACTIVE,
        trained=False,
        metrics={"note": "randomly initialised; scores are not meaningful"},
    )
    session.add(version)
    session.flush()
    return version

"""The model registry: model versions in Postgres, checkpoints in object storage."""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shared import audit
from shared.config import Settings
from shared.db.base import utcnow
from shared.db.models import AuditAction, ModelStatus, ModelVersion
from shared.ml.config import TrainingConfig, weights_fit
from shared.storage import Keys, ObjectStore

UNTRAINED_MODEL_NAME = "untrained-seed0"
REGISTRY_LOCK_KEY = 0x6D616D6D6F  # any constant unique to this lock


def active_model(*, session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE))


REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped_model_dir(settings: Settings) -> Path | None:
    """The trained model kept in the repository (settings.shipped_model; "none" for none)."""
    if settings.shipped_model.lower() in ("", "none"):
        return None
    path = Path(settings.shipped_model)
    path = path if path.is_absolute() else REPO_ROOT / path
    return path if (path / "checkpoint.pt").exists() else None


def ensure_active_model(
    *, session: Session, store: ObjectStore, shipped: Path | None = None
) -> ModelVersion:
    """The active model version. If none is active: the model shipped in `shipped` (made by
    `make bench-model`, registered as trained and active), else a seeded, randomly
    initialised one whose `trained` flag tells every consumer its scores mean nothing.
    """
    current = active_model(session=session)
    if current is not None:
        return current
    # Serialise first-time registration across workers; the lock ends with the transaction.
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})
    current = active_model(session=session)
    if current is not None:
        return current
    if shipped is not None:
        return _register_shipped(session=session, store=store, directory=shipped)
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
    key = Keys.model_checkpoint(UNTRAINED_MODEL_NAME)
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


def _register_shipped(*, session: Session, store: ObjectStore, directory: Path) -> ModelVersion:
    record = json.loads((directory / "version.json").read_text())
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.name == record["name"]).with_for_update()
    )
    if version is None:
        checkpoint = (directory / "checkpoint.pt").read_bytes()
        key = Keys.model_checkpoint(record["name"])
        store.put_bytes(key, checkpoint, content_type="application/octet-stream")
        version = ModelVersion(
            name=record["name"],
            architecture=_architecture(checkpoint),
            checkpoint_key=key,
            trained=True,
            metrics={**record["metrics"], "bench": record.get("bench", {})},
            recall_threshold=record["recall_threshold"],
            calibration=record["calibration"],
            model_card={**record["model_card"], "reproduce": record.get("reproduce")},
        )
        session.add(version)
    if version.input_reference is None:  # registered before the shipped model had one
        version.input_reference = record.get("input_reference")
    if version.score_reference is None:  # likewise its drift reference
        version.score_reference = record.get("score_reference")
    version.status = ModelStatus.ACTIVE
    version.promoted_at = utcnow()
    session.flush()
    return version


def _architecture(checkpoint: bytes) -> dict[str, Any]:
    import torch

    payload = torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=True)
    architecture: dict[str, Any] = payload["model_config"]
    return architecture


class RegistryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def list_models(*, session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())))


def find_model(*, session: Session, name_or_id: str) -> ModelVersion:
    query = select(ModelVersion).where(ModelVersion.name == name_or_id)
    with contextlib.suppress(ValueError):  # not an id: a name only
        query = select(ModelVersion).where(
            (ModelVersion.name == name_or_id) | (ModelVersion.id == uuid.UUID(name_or_id))
        )
    version = session.scalar(query)
    if version is None:
        raise RegistryError("model_not_found", f"no model version named or with id {name_or_id}")
    return version


def promote(
    *, session: Session, version: ModelVersion, actor: str, force_reason: str | None = None
) -> ModelVersion | None:
    """Make `version` the active model; the previously active one is retired and returned.

    A version registration rejected (no better than chance, or worse than the active version
    on the same held-out exams) is refused unless `force_reason` says why it goes live anyway.
    Every promotion is a system event in the audit log, with `actor` and any reason.
    Workers read the active version at the start of every task, so new predictions use it
    without a restart.
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})
    session.refresh(version)
    if not version.trained:
        raise RegistryError(
            "model_untrained", f"{version.name} was never trained; promote a trained version"
        )
    if version.status == ModelStatus.ACTIVE:
        return None
    forced = version.status == ModelStatus.REJECTED
    if forced and not (force_reason or "").strip():
        raise RegistryError(
            "model_rejected",
            f"{version.name} was rejected at registration: {version.rejection_reason} "
            "Promote it anyway only with --force and a --reason the audit log keeps.",
        )
    previous = active_model(session=session)
    now = utcnow()
    if previous is not None:
        previous.status = ModelStatus.RETIRED
        previous.retired_at = now
        session.flush()  # one active version at a time (a unique index says so)
    version.status = ModelStatus.ACTIVE
    version.promoted_at = now
    version.retired_at = None
    version.shadow_since = None  # active now: nothing left to shadow
    _audit(
        session,
        AuditAction.PROMOTE_MODEL,
        version,
        actor,
        previous=previous.name if previous else None,
        forced=forced,
        reason=force_reason,
        rejection_reason=version.rejection_reason if forced else None,
    )
    session.flush()
    return previous


def _audit(
    session: Session, action: AuditAction, version: ModelVersion, actor: str, **detail: Any
) -> None:
    audit.record(
        session=session,
        tenant_id=None,
        key_prefix=actor[:32],
        action=action,
        resource_type="model_version",
        resource_id=version.id,
        detail={"name": version.name, **detail},
    )


def rollback(*, session: Session, actor: str) -> ModelVersion:
    """Re-activate the trained version retired most recently (the one active before the
    current one); the current one is retired. A second rollback undoes the first."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})
    current = active_model(session=session)
    if current is None or current.promoted_at is None:
        raise RegistryError("nothing_to_roll_back", "no promoted model version is active")
    previous = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.status == ModelStatus.RETIRED,
            ModelVersion.trained.is_(True),
            ModelVersion.retired_at.is_not(None),
            ModelVersion.id != current.id,
        )
        .order_by(ModelVersion.retired_at.desc())
        .limit(1)
    )
    if previous is None:
        raise RegistryError(
            "nothing_to_roll_back", f"{current.name} is the first version ever made active"
        )
    now = utcnow()
    current.status = ModelStatus.RETIRED
    current.retired_at = now
    session.flush()
    previous.status = ModelStatus.ACTIVE
    previous.promoted_at = now
    previous.retired_at = None
    _audit(session, AuditAction.ROLLBACK_MODEL, previous, actor, previous=current.name)
    session.flush()
    return previous


def shadow_model(*, session: Session) -> ModelVersion | None:
    """The version in shadow mode, if any."""
    return session.scalar(select(ModelVersion).where(ModelVersion.shadow_since.is_not(None)))


def set_shadow(
    *, session: Session, version: ModelVersion | None, actor: str
) -> ModelVersion | None:
    """Put `version` in shadow mode (None: none), taking the previous one out; returns the
    previous. From now on it scores every newly screened image after the active version, its
    scores kept apart (shadow_scores). A system event in the audit log."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})
    if version is not None:
        session.refresh(version)
        if not version.trained:
            raise RegistryError("model_untrained", f"{version.name} was never trained")
        if version.status == ModelStatus.ACTIVE:
            raise RegistryError(
                "model_active", f"{version.name} is the active version; shadow a candidate"
            )
    previous = shadow_model(session=session)
    if previous is not None and version is not None and previous.id == version.id:
        return None
    if previous is not None:
        previous.shadow_since = None
        _audit(session, AuditAction.SHADOW_MODEL, previous, actor, shadow=False)
        session.flush()  # one shadow at a time (a unique index says so)
    if version is not None:
        version.shadow_since = utcnow()
        _audit(session, AuditAction.SHADOW_MODEL, version, actor, shadow=True)
    session.flush()
    return previous


def resolve_init_from(*, session: Session, config: TrainingConfig) -> str | None:
    """The registered version a run starts from (its name), or None for from scratch.

    "auto": the active version when it is trained and its layers have the run's shapes.
    A named version must exist, be trained and fit (RegistryError otherwise): a site that
    asks for one must not silently get a model trained from scratch.
    """
    if config.init_from == "none":
        return None
    if config.init_from == "auto":
        active = active_model(session=session)
        if active is None or not active.trained or not weights_fit(active.architecture, config):
            return None
        return active.name
    version = find_model(session=session, name_or_id=config.init_from)
    if not version.trained:
        raise RegistryError(
            "init_from_untrained", f"{version.name} was never trained: nothing to start from"
        )
    if not weights_fit(version.architecture, config):
        widths = {k: version.architecture.get(k) for k in ("stem_channels", "stage_channels")}
        raise RegistryError(
            "init_from_mismatch",
            f"{version.name} has layers of other widths ({widths}) than this run's; set "
            "stem_channels and stage_channels to match, or init_from to none",
        )
    return version.name


def register_imported(
    *,
    session: Session,
    store: ObjectStore,
    name: str,
    archive: bytes,
    manifest: dict[str, Any],
    validation: dict[str, Any],
    actor: str,
) -> ModelVersion:
    """Register a site's TorchScript model (validated by the caller: shared/ml/imported.py)
    as a candidate. It carries no evaluation on this deployment's data and no input
    reference; its card says so."""
    if session.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
        raise RegistryError("model_exists", f"a model version named {name} exists; pick another")
    key = Keys.model_checkpoint(name)
    store.put_bytes(key, archive, content_type="application/octet-stream")
    version = ModelVersion(
        name=name,
        architecture={"format": "torchscript", "architecture": "torchscript", "manifest": manifest},
        checkpoint_key=key,
        status=ModelStatus.CANDIDATE,
        trained=True,
        metrics={"imported": validation},
        recall_threshold=manifest.get("recall_threshold"),
        model_card={
            "name": name,
            "imported": True,
            "description": manifest.get("description", ""),
            "manifest": manifest,
            "validation_on_import": validation,
            "not_for_clinical_use": True,
            "limitations": [
                "Trained elsewhere: no evaluation on this deployment's data, and no input "
                "reference, so no input_unlike_training_data warnings.",
                "No heatmaps: an imported model has no class activation map here.",
            ],
        },
    )
    session.add(version)
    session.flush()
    audit.record(
        session=session,
        tenant_id=None,
        key_prefix=actor[:32],
        action=AuditAction.IMPORT_MODEL,
        resource_type="model_version",
        resource_id=version.id,
        detail={"name": name, "bytes": len(archive)},
    )
    return version

"""`screening`: the project's command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mammoscreen_client import Client

from cli.evaluate import add_evaluate_command
from cli.outcomes import add_outcome_commands
from cli.remote import add_commands, run_guarded

DEFAULT_STACK_DIR = Path(".stack")


def _cmd_synth(args: argparse.Namespace) -> int:
    from devstack.synth import SynthOptions, generate_exams, variant_mix

    defaults = SynthOptions()
    options = SynthOptions(
        height=args.height,
        width=args.width,
        malignant_prevalence=(
            defaults.malignant_prevalence
            if args.malignant_prevalence is None
            else args.malignant_prevalence
        ),
        benign_prevalence=(
            defaults.benign_prevalence if args.benign_prevalence is None else args.benign_prevalence
        ),
        style=args.style,
        views=tuple(args.views.split(",")),
        anatomy=args.anatomy,
    )
    images = generate_exams(
        Path(args.out),
        exams=args.exams,
        seed=args.seed,
        options=options,
        variants=variant_mix(args.encodings),
    )
    counts: dict[str, int] = defaultdict(int)
    for image in images:
        counts[image.label.value] += 1
    print(
        f"wrote {len(images)} images of {args.exams} exams to {args.out} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} images)"
    )
    return 0


def _cmd_tenant_create(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError

    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.tenants import create_tenant, issue_api_key

    try:
        with session_scope(get_settings().database_url) as session:
            tenant = create_tenant(session=session, name=args.name)
            issued = issue_api_key(session=session, tenant=tenant)
            tenant_id = str(tenant.id)
    except IntegrityError:
        print(
            f"error: a tenant named {args.name!r} exists already; choose another name",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps({"id": tenant_id, "name": args.name, "api_key": issued.secret}))
    else:
        print(f"tenant {args.name}: {tenant_id}")
        print(f"api key (shown once, only its hash is stored): {issued.secret}")
    return 0


def _cmd_key(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.db.models import DEFAULT_SCOPES
    from shared.tenants import find_tenant, issue_api_key, list_api_keys, revoke_api_key

    with session_scope(get_settings().database_url) as session:
        tenant = find_tenant(session=session, name_or_id=args.tenant)
        if tenant is None:
            print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
            return 2
        if args.key_command == "create":
            issued = issue_api_key(
                session=session, tenant=tenant, scopes=args.scope or DEFAULT_SCOPES
            )
            print(f"scopes: {', '.join(issued.api_key.scopes)}")
            print(
                f"api key for {tenant.name} (shown once, only its hash is stored): {issued.secret}"
            )
        elif args.key_command == "revoke":
            revoked = revoke_api_key(session=session, tenant=tenant, prefix=args.prefix)
            if revoked is None:
                print(
                    f"error: {tenant.name} has no key {args.prefix!r}; see "
                    f"'screening admin key list {args.tenant}'",
                    file=sys.stderr,
                )
                return 2
            print(f"revoked {args.prefix}")
        else:
            for key in list_api_keys(session=session, tenant=tenant):
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                print(
                    f"{key.prefix}  created {key.created_at:%Y-%m-%d %H:%M}  {state}  "
                    f"scopes {','.join(key.scopes)}"
                )
    return 0


def _cmd_dicom_node(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.dicom_nodes import NodeError, add_node, list_nodes, remove_node
    from shared.tenants import find_tenant

    with session_scope(get_settings().database_url) as session:
        tenant = find_tenant(session=session, name_or_id=args.tenant)
        if tenant is None:
            print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
            return 2
        if args.node_command == "add":
            try:
                node = add_node(
                    session=session,
                    tenant_id=tenant.id,
                    ae_title=args.ae_title,
                    host=args.host,
                    port=args.port,
                )
            except NodeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            where = f" from {node.host}" if node.host else " from any host"
            print(f"DICOM node {node.ae_title}{where} sends studies for {tenant.name}")
        elif args.node_command == "remove":
            if not remove_node(
                session=session, tenant_id=tenant.id, ae_title=args.ae_title, host=args.host
            ):
                print(
                    f"error: {tenant.name} has no node {args.ae_title!r}"
                    f"{' at ' + args.host if args.host else ''}; see "
                    f"'screening admin dicom-node list {args.tenant}'",
                    file=sys.stderr,
                )
                return 2
            print(f"removed {args.ae_title}")
        else:
            for node in list_nodes(session=session, tenant_id=tenant.id):
                address = f"{node.host or '*'}:{node.port or '-'}"
                print(f"{node.ae_title:16}  {address}  added {node.created_at:%Y-%m-%d %H:%M}")
    return 0


def _cmd_destination(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError

    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.deliveries import (
        DestinationError,
        add_destination,
        disable_destination,
        list_destinations,
    )
    from shared.dicom_nodes import list_nodes
    from shared.tenants import find_tenant

    try:
        with session_scope(get_settings().database_url) as session:
            tenant = find_tenant(session=session, name_or_id=args.tenant)
            if tenant is None:
                print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
                return 2
            if args.destination_command == "add":
                node = None
                if args.ae_title:
                    matches = [
                        n
                        for n in list_nodes(session=session, tenant_id=tenant.id)
                        if n.ae_title == args.ae_title and (args.host in (None, n.host))
                    ]
                    if len(matches) != 1:
                        print(
                            f"error: {tenant.name} has {len(matches)} DICOM nodes "
                            f"{args.ae_title!r}{' at ' + args.host if args.host else ''}; "
                            "add the node first (screening admin dicom-node add ... --host "
                            "--port), or name its --host",
                            file=sys.stderr,
                        )
                        return 2
                    (node,) = matches
                destination = add_destination(
                    session=session,
                    tenant_id=tenant.id,
                    name=args.name,
                    node=node,
                    url=args.url,
                    secondary_capture=args.secondary_capture,
                )
                print(f"results of {tenant.name} go to {args.name} ({destination.transport})")
            elif args.destination_command == "disable":
                if (
                    disable_destination(session=session, tenant_id=tenant.id, name=args.name)
                    is None
                ):
                    print(f"error: {tenant.name} has no destination {args.name!r}", file=sys.stderr)
                    return 2
                print(f"disabled {args.name}")
            else:
                for d in list_destinations(session=session, tenant_id=tenant.id):
                    where = (
                        f"{d.dicom_node.ae_title}@{d.dicom_node.host}:{d.dicom_node.port}"
                        if d.dicom_node is not None
                        else d.url
                    )
                    state = "disabled" if d.disabled_at else "enabled"
                    capture = "  +secondary capture" if d.secondary_capture else ""
                    print(f"{d.name:20}  {d.transport:8}  {where}  {state}{capture}")
    except (DestinationError, IntegrityError) as err:
        reason = err if isinstance(err, DestinationError) else "that name is taken"
        print(f"error: {reason}", file=sys.stderr)
        return 2
    return 0


def _cmd_vault(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.tenants import find_tenant
    from shared.vault import new_key

    if args.vault_command == "new-key":
        print(new_key())
        return 0
    with session_scope(get_settings().database_url) as session:
        tenant = find_tenant(session=session, name_or_id=args.tenant)
        if tenant is None:
            print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
            return 2
        tenant.identity_vault = args.vault_command == "on"
        print(
            f"identity vault of {tenant.name}: {args.vault_command}"
            + (
                ""
                if tenant.identity_vault
                else " (new images keep no identifiers; exports carry de-identified UIDs)"
            )
        )
    return 0


def _cmd_backup(args: argparse.Namespace) -> int:
    from devstack.backup import BackupError, create_backup, describe, restore_backup
    from shared.config import get_settings

    try:
        if args.backup_command == "create":
            summary = create_backup(get_settings(), args.directory)
            print(f"backed up to {describe(summary)}")
        else:
            summary = restore_backup(get_settings(), args.directory, replace=args.replace)
            print(f"restored {describe(summary)}")
            print("run `screening admin db upgrade` if the backup predates this version")
    except BackupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _given_or(value: int | None, current: int | None) -> int | None:
    return current if value is None else value


def _cmd_tenant_retention(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.retention import set_retention
    from shared.tenants import find_tenant

    with session_scope(get_settings().database_url) as session:
        tenant = find_tenant(session=session, name_or_id=args.tenant)
        if tenant is None:
            print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
            return 2
        if args.images_days is not None or args.results_days is not None or args.forever:
            try:
                set_retention(
                    session,
                    tenant,
                    image_days=None
                    if args.forever
                    else _given_or(args.images_days, tenant.image_retention_days),
                    result_days=None
                    if args.forever
                    else _given_or(args.results_days, tenant.result_retention_days),
                )
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2

        def days(value: int | None) -> str:
            return "until erased" if value is None else f"{value} days after the batch completed"

        print(f"retention of {tenant.name}:")
        print(f"  images (files, previews, heatmaps): {days(tenant.image_retention_days)}")
        print(f"  results and rows: {days(tenant.result_retention_days)}")
    return 0


def _cmd_db_upgrade(_: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    from devstack.stack import REPO_ROOT
    from shared.config import get_settings

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", get_settings().database_url)
    command.upgrade(config, "head")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    """Everything a fresh deployment needs before it serves: schema, bucket, a model."""
    _cmd_db_upgrade(args)
    return _cmd_models_ensure_default(args)


def _cmd_models_ensure_default(_: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.ml.registry import ensure_active_model, shipped_model_dir
    from shared.storage import ObjectStore

    settings = get_settings()
    store = ObjectStore(settings)
    store.ensure_bucket()
    with session_scope(settings.database_url) as session:
        version = ensure_active_model(
            session=session, store=store, shipped=shipped_model_dir(settings)
        )
        print(f"active model: {version.name} ({version.id}), trained={version.trained}")
    return 0


def _client_from_settings() -> Client:
    from mammoscreen_client import Client
    from shared.config import get_settings

    settings = get_settings()
    if not settings.api_key:
        raise SystemExit(
            "no API key: set SCREENING_API_KEY (make up writes one to .stack/env; "
            "`set -a; . .stack/env; set +a` loads it)"
        )
    return Client(
        ingest_url=settings.ingest_url, results_url=settings.results_url, api_key=settings.api_key
    )


def _auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_epoch(run: dict[str, Any]) -> None:
    curve = run["curve"]
    if run.get("stages"):
        parts = []
        for stage in run["stages"]:
            name = "final" if stage["kind"] == "final" else f"fold {stage['fold']}"
            auc = f" AUC {stage['exam_auc']:.3f}" if stage["exam_auc"] is not None else ""
            parts.append(f"{name} {stage['status']} ({stage['epochs_done']} epochs{auc})")
        print(f"  {run['status']}: " + ", ".join(parts), flush=True)
    elif curve:
        point = curve[-1]
        print(
            f"  {run['status']}: epoch {point['epoch']}  loss {point['train_loss']:.4f}  "
            f"validation AUC {_auc(point['validation_auc'])}  ({point['seconds']:.0f}s)",
            flush=True,
        )
    else:
        print(f"  {run['status']}", flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    """Upload a labelled folder through the API and train on it."""
    from mammoscreen_client import submit_training_folder

    hyperparameters = dict(json.loads(args.hyperparameters)) if args.hyperparameters else {}
    if args.epochs is not None:
        hyperparameters["epochs"] = args.epochs
    with _client_from_settings() as client:
        run = submit_training_folder(
            client,
            Path(args.folder),
            name=args.name,
            seed=args.seed,
            hyperparameters=hyperparameters,
            on_upload=lambda done, total: print(f"  uploaded {done}/{total}", flush=True),
        )
        start = f"from {run['init_from']}" if run.get("init_from") else "from scratch"
        how = (
            f"{run['folds']}-fold cross-validation and a final model"
            if run.get("kind") == "cross_validation"
            else "one split"
        )
        print(
            f"training run {run['id']} queued ({how}, {start}); "
            f"splits: {json.dumps(run['split_sizes'])}"
        )
        if not args.wait:
            return 0
        final = client.wait_training(run["id"], timeout=args.timeout, on_progress=_print_epoch)
    if final["status"] != "completed":
        print(f"training run failed: {final['error_code']}: {final['error_message']}")
        return 1
    evaluation = final["evaluation"]
    cross_validated = "cross_validation" in evaluation
    held_out = evaluation["cross_validation" if cross_validated else "test"]
    low, high = held_out["exam_auc_ci95"]
    version = final["model_version"]
    summary = (
        f"{'pooled out-of-fold' if cross_validated else 'test'} exam AUC "
        f"{held_out['exam_auc']:.3f} (95% CI {low:.3f}-{high:.3f}), sensitivity "
        f"{held_out['sensitivity']:.2f}, specificity {held_out['specificity']:.2f}"
    )
    if cross_validated:
        spread_low, spread_high = held_out["fold_auc_range"]
        summary += (
            f"; {held_out['folds']} folds, fold AUC {held_out['fold_auc_mean']:.3f} "
            f"(sd {held_out['fold_auc_sd']:.3f}, {spread_low:.3f}-{spread_high:.3f})"
        )
    if evaluation.get("init_from"):
        summary += f"; warm-started from {evaluation['init_from']}"
    if version["status"] == "rejected":
        print(
            f"registered {version['name']} as REJECTED: {summary}.\n"
            f"  {version['rejection_reason']}\n"
            "  It does not serve unless an operator forces it live with a reason."
        )
        return 0
    print(
        f"registered candidate {version['name']}: {summary}. "
        f"Promote it with: screening models promote {version['name']}"
    )
    return 0


def _cmd_models_list(_: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.ml.registry import list_models

    with session_scope(get_settings().database_url) as session:
        for version in list_models(session=session):
            auc = (version.metrics.get("test") or {}).get("exam_auc")
            print(
                f"{version.name:<24} {version.status.value:<9} trained={version.trained!s:<5} "
                f"test_exam_auc={'-' if auc is None else f'{auc:.3f}'} "
                f"threshold={version.recall_threshold} id={version.id}"
            )
    return 0


def _operator() -> str:
    """Who ran a registry command, for the audit log: the login of the shell running it."""
    import getpass

    return f"operator:{getpass.getuser()}"


def _cmd_models_promote(args: argparse.Namespace) -> int:
    if args.force and not (args.reason or "").strip():
        print("--force needs --reason: say why a rejected model goes live", file=sys.stderr)
        return 2
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.ml.registry import RegistryError, find_model, promote

    try:
        with session_scope(get_settings().database_url) as session:
            version = find_model(session=session, name_or_id=args.model)
            previous = promote(
                session=session,
                version=version,
                actor=_operator(),
                force_reason=args.reason if args.force else None,
            )
            print(
                f"active: {version.name}"
                + (f" (retired {previous.name})" if previous else " (already active)")
            )
    except RegistryError as err:
        print(f"{err.code}: {err.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_models_shadow(args: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.ml.registry import RegistryError, find_model, set_shadow

    if (args.model is None) == (not args.off):
        print("name a model version, or --off", file=sys.stderr)
        return 2
    try:
        with session_scope(get_settings().database_url) as session:
            version = None if args.off else find_model(session=session, name_or_id=args.model)
            previous = set_shadow(session=session, version=version, actor=_operator())
            shown = f"shadow: {version.name}" if version else "shadow: none"
            print(shown + (f" (was {previous.name})" if previous else ""))
    except RegistryError as err:
        print(f"{err.code}: {err.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_models_import(args: argparse.Namespace) -> int:
    """Validate a site's TorchScript model on synthetic exams and register it."""
    import tempfile

    import torch

    from devstack.synth import DEMO_VARIANTS, generate_exams
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.db.models import Laterality
    from shared.imaging.decode import decode_image
    from shared.ml.imported import ImportedModel, Manifest, ManifestError, load_model
    from shared.ml.imported import validate_imported as validate
    from shared.ml.registry import RegistryError, register_imported
    from shared.storage import ObjectStore

    settings = get_settings()
    archive = Path(args.file).read_bytes()
    try:
        manifest = Manifest.from_dict(json.loads(Path(args.manifest).read_text()))
        architecture = {"format": "torchscript", "manifest": manifest.to_dict()}
        try:
            model = load_model(architecture, archive, device=torch.device("cpu"))
        except Exception as err:  # not a TorchScript archive, or one this torch cannot read
            raise ManifestError(
                "model_unreadable", f"{args.file} is not a TorchScript archive: {err}"
            ) from err
        assert isinstance(model, ImportedModel)
        preprocess = manifest.preprocess()
        with tempfile.TemporaryDirectory(prefix="import-check-") as folder:
            exams = generate_exams(Path(folder), exams=2, seed=1, variants=DEMO_VARIANTS)
            inputs = [
                preprocess(
                    decode_image(exam.path.read_bytes(), "application/dicom"),
                    Laterality(exam.laterality),
                )
                for exam in exams
            ]
        validation = validate(model, inputs)
        with session_scope(settings.database_url) as session:
            version = register_imported(
                session=session,
                store=ObjectStore(settings),
                name=args.name,
                archive=archive,
                manifest=manifest.to_dict(),
                validation=validation,
                actor=_operator(),
            )
            print(
                f"registered candidate {version.name} (TorchScript, validated on "
                f"{validation['images']} synthetic images; probabilities "
                f"{validation['probability_range'][0]:.3f}-"
                f"{validation['probability_range'][1]:.3f}). It has no evaluation on this "
                "deployment's data: measure it on your labelled exams before making it "
                f"active (screening models promote {version.name})"
            )
    except (ManifestError, RegistryError) as err:
        print(f"{err.code}: {err.message}", file=sys.stderr)
        return 1
    except (OSError, json.JSONDecodeError) as err:
        print(f"manifest_invalid: {args.manifest}: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_models_rollback(_: argparse.Namespace) -> int:
    from shared.config import get_settings
    from shared.db.base import session_scope
    from shared.ml.registry import RegistryError, rollback

    try:
        with session_scope(get_settings().database_url) as session:
            version = rollback(session=session, actor=_operator())
            print(f"active: {version.name} (rolled back)")
    except RegistryError as err:
        print(f"{err.code}: {err.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_stack_up(args: argparse.Namespace) -> int:
    from devstack.stack import up

    state = up(Path(args.dir))
    print(f"stack up; environment in {Path(args.dir) / 'env'} (source it):")
    for name in (
        "SCREENING_INGEST_URL",
        "SCREENING_RESULTS_URL",
        "SCREENING_DATABASE_URL",
        "SCREENING_REDIS_URL",
        "SCREENING_S3_ENDPOINT",
        "SCREENING_DICOM_HOST",
        "SCREENING_DICOM_PORT",
        "SCREENING_DICOM_AE_TITLE",
    ):
        print(f"  {name}={state.env[name]}")
    return 0


def _cmd_stack_down(args: argparse.Namespace) -> int:
    from devstack.stack import down

    survivors = down(Path(args.dir))
    if survivors:
        print(f"error: processes still running after stop: {survivors}", file=sys.stderr)
        return 1
    print("stack down; no process left running")
    return 0


def _short(value: str, width: int) -> str:
    return value if len(value) <= width else "…" + value[-(width - 1) :]


def format_results_table(rows: Sequence[Mapping[str, Any]], study_names: dict[str, str]) -> str:
    header = f"{'study':<12} {'breast':<6} {'view':<4} {'score':>7} {'status':<7} model version"
    lines = [header, "-" * len(header)]
    for row in rows:
        version = row["model_version"]
        version_text = (
            "-"
            if version is None
            else (version["name"] + ("" if version["trained"] else " (UNTRAINED)"))
        )
        score = "-" if row["score"] is None else f"{row['score']:.4f}"
        lines.append(
            f"{study_names.get(row['study_id'], _short(row['study_id'], 12)):<12} "
            f"{row['laterality'] or '?':<6} {row['view'] or '?':<4} {score:>7} "
            f"{row['status']:<7} {version_text}"
            + (f"  [{row['error_code']}]" if row["error_code"] else "")
        )
    return "\n".join(lines)


def format_exams_table(
    exams: Sequence[Mapping[str, Any]], study_names: dict[str, str], truth: dict[str, str]
) -> str:
    """Exams by exam score, with the recommendation and (synthetic data only) the truth."""
    header = f"{'exam':<8} {'exam score':>10} {'probability':>11} {'recommendation':<14} truth"
    lines = [header, "-" * len(header)]
    ordered = sorted(exams, key=lambda e: -1.0 if e["exam_score"] is None else e["exam_score"])
    for exam in reversed(ordered):
        score = "-" if exam["exam_score"] is None else f"{exam['exam_score']:.3f}"
        probability = (
            "-" if exam.get("exam_probability") is None else f"{exam['exam_probability']:.3f}"
        )
        lines.append(
            f"{study_names.get(exam['id'], _short(exam['id'], 8)):<8} {score:>10} "
            f"{probability:>11} {exam.get('recall') or '-':<14} {truth.get(exam['id'], '?')}"
        )
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from devstack.stack import StackState, down, up
    from devstack.synth import DEMO_VARIANTS, generate_exams
    from mammoscreen_client import Client

    stack_dir = Path(args.dir)
    started_here = StackState.load(stack_dir / "state.json") is None
    state = up(stack_dir)
    try:
        data_dir = stack_dir / "demo-data"
        images = generate_exams(data_dir, exams=args.exams, seed=args.seed, variants=DEMO_VARIANTS)
        by_exam: dict[str, list[Path]] = defaultdict(list)
        truth: dict[str, str] = {}
        for image in images:
            by_exam[image.study].append(image.path)
            if image.label.value != "normal":
                truth[image.study] = image.label.value
        encodings = sorted({image.encoding for image in images})
        print(
            f"generated {len(images)} synthetic DICOM images of {len(by_exam)} exams, "
            f"encoded as: {', '.join(encodings)}"
        )
        with Client.from_env(state.env) as client:
            batch = client.create_batch("demo batch")
            study_names: dict[str, str] = {}
            study_truth: dict[str, str] = {}
            for index, (study_uid, paths) in enumerate(by_exam.items()):
                upload = client.upload(batch["id"], paths)
                for accepted in upload["accepted"]:
                    study_names[accepted["study_id"]] = f"exam{index:02d}"
                    study_truth[accepted["study_id"]] = truth.get(study_uid, "normal")
                for rejected in upload["rejected"]:
                    print(f"rejected {rejected['filename']}: {rejected['code']}")
            client.close_batch(batch["id"])
            print(f"batch {batch['id']} submitted and closed; screening...")
            status = client.wait(batch["id"], timeout=args.timeout)
            rows = list(client.iter_results(batch["id"], page_size=10))
            exams = list(client.iter_exams(batch["id"]))
        print(format_results_table(rows, study_names))
        print()
        print(format_exams_table(exams, study_names, study_truth))
        for warning in status["warnings"]:
            print(f"NOTE: {warning}")
        done = status["counts"]["done"]
        print(
            f"batch {status['status']}: {done} of {len(images)} images done, "
            f"{status['counts']['failed']} failed"
        )
        return 0 if done == len(images) == len(rows) else 1
    finally:
        if started_here and not args.keep_stack:
            survivors = down(stack_dir)
            print("stack stopped" if not survivors else f"left running: {survivors}")


def build_parser() -> argparse.ArgumentParser:
    from shared.db.models import Scope

    parser = argparse.ArgumentParser(prog="screening", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic screening exams as DICOM")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--exams", type=int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=int, default=1024, help="rows per image")
    synth.add_argument("--width", type=int, default=832, help="columns per image")
    synth.add_argument(
        "--malignant-prevalence", type=float, help="share of malignant exams (default 0.25)"
    )
    synth.add_argument(
        "--benign-prevalence", type=float, help="share of benign exams (default 0.5)"
    )
    synth.add_argument(
        "--encodings",
        choices=["plain", "demo", "all"],
        default="plain",
        help="plain: explicit VR little endian; demo: MONOCHROME1, JPEG 2000, grey background "
        "and burnt-in label mixed in; all: every transfer syntax, MONOCHROME1 and 2",
    )
    synth.add_argument(
        "--style",
        choices=["digital", "film", "vendor"],
        default="digital",
        help="digital: a 14-bit detector (what the shipped model knows); film: scanned "
        "screen-film mammograms, 8-bit; vendor: 12-bit digital views after vendor processing",
    )
    synth.add_argument(
        "--views", default="CC,MLO", help="views per breast, e.g. MLO for film-archive exams"
    )
    synth.add_argument(
        "--anatomy",
        choices=["ellipse", "realistic"],
        default="ellipse",
        help="ellipse: what the shipped model knows; realistic: contour, nipple, skin line, "
        "curved pectoral edge, BI-RADS density classes, vessels and ligaments",
    )
    synth.set_defaults(func=_cmd_synth)

    admin = commands.add_parser("admin", help="administration").add_subparsers(
        dest="admin_command", required=True
    )
    tenant = admin.add_parser("tenant", help="tenants").add_subparsers(
        dest="tenant_command", required=True
    )
    create = tenant.add_parser("create", help="create a tenant and its first API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(func=_cmd_tenant_create)
    retention = tenant.add_parser(
        "retention", help="show or set how long a tenant's images and results are kept"
    )
    retention.add_argument("tenant", help="tenant name or id")
    retention.add_argument(
        "--images-days", type=int, help="days after a batch completes that its images are kept"
    )
    retention.add_argument(
        "--results-days", type=int, help="days after a batch completes that the batch is kept"
    )
    retention.add_argument("--forever", action="store_true", help="keep both until erased")
    retention.set_defaults(func=_cmd_tenant_retention)

    backup = admin.add_parser(
        "backup", help="back up the database and the bucket, or restore a backup"
    ).add_subparsers(dest="backup_command", required=True)
    made = backup.add_parser("create", help="dump the database and copy the bucket into DIR")
    made.add_argument("directory", type=Path)
    made.set_defaults(func=_cmd_backup)
    restored = backup.add_parser(
        "restore", help="restore DIR into this stack's database and bucket"
    )
    restored.add_argument("directory", type=Path)
    restored.add_argument(
        "--replace", action="store_true", help="overwrite a database that already holds tenants"
    )
    restored.set_defaults(func=_cmd_backup)

    key = admin.add_parser("key", help="API keys of a tenant").add_subparsers(
        dest="key_command", required=True
    )
    for name, text in (
        ("create", "issue a new key (shown once)"),
        ("list", "list keys by prefix"),
        ("revoke", "revoke a key by prefix"),
    ):
        sub = key.add_parser(name, help=text)
        sub.add_argument("tenant", help="tenant name or id")
        if name == "revoke":
            sub.add_argument("prefix", help="the key's visible prefix, e.g. msk_1a2b3c4d")
        if name == "create":
            sub.add_argument(
                "--scope",
                action="append",
                choices=[s.value for s in Scope],
                help="what the key may do; repeat for several (default: submit and read)",
            )
        sub.set_defaults(func=_cmd_key)

    destination = admin.add_parser(
        "destination", help="where a tenant's DICOM results (SR, heatmaps) are delivered"
    ).add_subparsers(dest="destination_command", required=True)
    for name, text in (
        ("add", "deliver by C-STORE to a registered DICOM node, or by STOW-RS to a URL"),
        ("list", "the tenant's destinations"),
        ("disable", "deliver no more results there"),
    ):
        sub = destination.add_parser(name, help=text)
        sub.add_argument("tenant", help="tenant name or id")
        if name != "list":
            sub.add_argument("name", help="a name for the destination")
        if name == "add":
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--ae-title", help="a DICOM node of the tenant (C-STORE)")
            target.add_argument("--url", help="a DICOMweb base URL (STOW-RS)")
            sub.add_argument("--host", help="the node's host, where the AE title is not unique")
            sub.add_argument(
                "--secondary-capture",
                action="store_true",
                help="also send each image with the heatmap burnt in",
            )
        sub.set_defaults(func=_cmd_destination)

    vault = admin.add_parser(
        "vault", help="the identity vault: keys, and whether a tenant keeps identities"
    ).add_subparsers(dest="vault_command", required=True)
    vault.add_parser("new-key", help="print a fresh vault key (base64)").set_defaults(
        func=_cmd_vault
    )
    for name in ("on", "off"):
        sub = vault.add_parser(name, help=f"turn the tenant's identity vault {name}")
        sub.add_argument("tenant", help="tenant name or id")
        sub.set_defaults(func=_cmd_vault)

    node = admin.add_parser(
        "dicom-node", help="DICOM nodes (PACS, modalities) that may send a tenant's studies"
    ).add_subparsers(dest="node_command", required=True)
    for name, text in (
        ("add", "allow a calling AE title (from one host, if given) to send studies"),
        ("list", "the tenant's nodes"),
        ("remove", "no longer accept associations from this AE title (and host)"),
    ):
        sub = node.add_parser(name, help=text)
        sub.add_argument("tenant", help="tenant name or id")
        if name != "list":
            sub.add_argument("--ae-title", required=True, help="the node's calling AE title")
            sub.add_argument("--host", help="only from this IP address")
        if name == "add":
            sub.add_argument("--port", type=int, help="where the node takes results back")
        sub.set_defaults(func=_cmd_dicom_node)

    db = commands.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations up to head").set_defaults(func=_cmd_db_upgrade)

    commands.add_parser("init", help="migrate, create the bucket, register a model").set_defaults(
        func=_cmd_init
    )

    models = commands.add_parser("models", help="model registry").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser(
        "ensure-default", help="register the shipped model (or an untrained one) if none is active"
    ).set_defaults(func=_cmd_models_ensure_default)
    models.add_parser("list", help="every model version and its status").set_defaults(
        func=_cmd_models_list
    )
    promote = models.add_parser("promote", help="make a trained version the active one")
    promote.add_argument("model", help="model version name or id")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote a version its registration rejected (needs --reason)",
    )
    promote.add_argument("--reason", help="why, kept in the audit log with --force")
    promote.set_defaults(func=_cmd_models_promote)
    models.add_parser(
        "rollback", help="re-activate the version that was active before this one"
    ).set_defaults(func=_cmd_models_rollback)
    shadow = models.add_parser(
        "shadow",
        help="a candidate scores every new image after the active version, shown only to "
        "evaluations and the agreement view",
    )
    shadow.add_argument("model", nargs="?", help="model version name or id")
    shadow.add_argument("--off", action="store_true", help="no version in shadow mode")
    shadow.set_defaults(func=_cmd_models_shadow)
    imported = models.add_parser(
        "import", help="register a TorchScript model trained elsewhere, with its manifest"
    )
    imported.add_argument("file", help="the TorchScript archive (torch.jit.save)")
    imported.add_argument("--manifest", required=True, help="its manifest (JSON)")
    imported.add_argument("--name", required=True, help="the version's name")
    imported.set_defaults(func=_cmd_models_import)

    train = commands.add_parser(
        "train", help="upload a labelled folder (images + labels.csv) and train a model on it"
    )
    train.add_argument("folder", help="images and labels.csv (file,label[,box_x0..box_y1])")
    train.add_argument("--name", required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--hyperparameters", help="JSON object, e.g. '{\"learning_rate\": 0.001}'")
    train.add_argument("--wait", action="store_true", help="follow the run until it finishes")
    train.add_argument("--timeout", type=float, default=3600)
    train.set_defaults(func=_cmd_train)

    stack = commands.add_parser("stack", help="the local stack").add_subparsers(
        dest="stack_command", required=True
    )
    for name, func, text in (
        ("up", _cmd_stack_up, "start the local stack"),
        ("down", _cmd_stack_down, "stop the local stack"),
    ):
        sub = stack.add_parser(name, help=text)
        sub.add_argument("--dir", default=str(DEFAULT_STACK_DIR))
        sub.set_defaults(func=func)

    add_commands(commands)
    add_outcome_commands(commands)
    add_evaluate_command(commands)

    demo = commands.add_parser("demo", help="screen a synthetic batch end to end")
    demo.add_argument("--dir", default=str(DEFAULT_STACK_DIR))
    demo.add_argument("--exams", type=int, default=8)
    demo.add_argument("--seed", type=int, default=2026)
    demo.add_argument("--timeout", type=float, default=600)
    demo.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_guarded(args)


if __name__ == "__main__":
    sys.exit(main())

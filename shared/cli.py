"""`screening`: the project's command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_STACK_DIR = Path(".stack")


def _cmd_synth(args: argparse.Namespace) -> int:
    from shared.imaging.synth import SynthOptions, generate_exams, variant_mix

    options = SynthOptions(
        height=args.height,
        width=args.width,
        malignant_prevalence=args.malignant_prevalence,
        benign_prevalence=args.benign_prevalence,
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
    from shared.tenants import find_tenant, issue_api_key, list_api_keys, revoke_api_key

    with session_scope(get_settings().database_url) as session:
        tenant = find_tenant(session=session, name_or_id=args.tenant)
        if tenant is None:
            print(f"error: no tenant named or with id {args.tenant!r}", file=sys.stderr)
            return 2
        if args.key_command == "create":
            issued = issue_api_key(session=session, tenant=tenant)
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
                print(f"{key.prefix}  created {key.created_at:%Y-%m-%d %H:%M}  {state}")
    return 0


def _cmd_db_upgrade(_: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    from shared.config import get_settings
    from shared.devstack.stack import REPO_ROOT

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
    from shared.ml.registry import ensure_active_model
    from shared.storage import ObjectStore

    settings = get_settings()
    store = ObjectStore(settings)
    store.ensure_bucket()
    with session_scope(settings.database_url) as session:
        version = ensure_active_model(session=session, store=store)
        print(f"active model: {version.name} ({version.id}), trained={version.trained}")
    return 0


def _cmd_stack_up(args: argparse.Namespace) -> int:
    from shared.devstack.stack import up

    state = up(Path(args.dir))
    print(f"stack up; environment in {Path(args.dir) / 'env'} (source it):")
    for name in (
        "SCREENING_INGEST_URL",
        "SCREENING_RESULTS_URL",
        "SCREENING_DATABASE_URL",
        "SCREENING_REDIS_URL",
        "SCREENING_S3_ENDPOINT",
    ):
        print(f"  {name}={state.env[name]}")
    return 0


def _cmd_stack_down(args: argparse.Namespace) -> int:
    from shared.devstack.stack import down

    survivors = down(Path(args.dir))
    if survivors:
        print(f"error: processes still running after stop: {survivors}", file=sys.stderr)
        return 1
    print("stack down; no process left running")
    return 0


def _short(value: str, width: int) -> str:
    return value if len(value) <= width else "…" + value[-(width - 1) :]


def format_results_table(rows: Sequence[dict[str, Any]], study_names: dict[str, str]) -> str:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from shared.client import Client
    from shared.devstack.stack import StackState, down, up
    from shared.imaging.synth import DEMO_VARIANTS, generate_exams

    stack_dir = Path(args.dir)
    started_here = StackState.load(stack_dir / "state.json") is None
    state = up(stack_dir)
    try:
        data_dir = stack_dir / "demo-data"
        images = generate_exams(data_dir, exams=args.exams, seed=args.seed, variants=DEMO_VARIANTS)
        by_exam: dict[str, list[Path]] = defaultdict(list)
        for image in images:
            by_exam[image.study].append(image.path)
        encodings = sorted({image.encoding for image in images})
        print(
            f"generated {len(images)} synthetic DICOM images of {len(by_exam)} exams, "
            f"encoded as: {', '.join(encodings)}"
        )
        with Client.from_env(state.env) as client:
            batch = client.create_batch("demo batch")
            study_names: dict[str, str] = {}
            for index, paths in enumerate(by_exam.values()):
                upload = client.upload(batch["id"], paths)
                for accepted in upload["accepted"]:
                    study_names[accepted["study_id"]] = f"exam{index:02d}"
                for rejected in upload["rejected"]:
                    print(f"rejected {rejected['filename']}: {rejected['code']}")
            client.close_batch(batch["id"])
            print(f"batch {batch['id']} submitted and closed; screening...")
            status = client.wait(batch["id"], timeout=args.timeout)
            rows = list(client.iter_results(batch["id"], page_size=10))
        print(format_results_table(rows, study_names))
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
    parser = argparse.ArgumentParser(prog="screening", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic screening exams as DICOM")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--exams", type=int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=int, default=1024, help="rows per image")
    synth.add_argument("--width", type=int, default=832, help="columns per image")
    synth.add_argument("--malignant-prevalence", type=float, default=0.25)
    synth.add_argument("--benign-prevalence", type=float, default=0.25)
    synth.add_argument(
        "--encodings",
        choices=["plain", "demo", "all"],
        default="plain",
        help="plain: explicit VR little endian; demo: MONOCHROME1, JPEG 2000, grey background "
        "and burnt-in label mixed in; all: every transfer syntax, MONOCHROME1 and 2",
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
        sub.set_defaults(func=_cmd_key)

    db = commands.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations up to head").set_defaults(func=_cmd_db_upgrade)

    commands.add_parser("init", help="migrate, create the bucket, register a model").set_defaults(
        func=_cmd_init
    )

    models = commands.add_parser("models", help="model registry").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser(
        "ensure-default", help="register a seeded untrained model if none is active"
    ).set_defaults(func=_cmd_models_ensure_default)

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
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

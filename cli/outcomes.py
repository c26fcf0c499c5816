"""`screening outcomes`: import a site's outcomes (biopsy, surgery, follow-up) from a CSV file,
and list an exam's.

The file has a header row with `truth`, `breast`, `source` and `date`, and `exam_id` or
`study_key` (or both columns, each row filling one): our exam id, or the site's own study key
(the StudyInstanceUID it sent, or the study key given with a non-DICOM upload). Every row is
checked before anything is sent; then the rows go in requests of up to 10,000, each all or
nothing. Importing a file again replaces what it recorded, so after a fix it can simply be
imported again.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.remote import UsageError, _client, _connection_flags
from mammoscreen_client import OUTCOMES_PER_REQUEST, ApiClientError

TRUTHS = ("malignant", "benign", "normal")
BREASTS = ("left", "right", "both")
SOURCES = ("biopsy", "surgery", "follow_up", "registry", "other")
REQUIRED = ("truth", "breast", "source", "date")


class OutcomeFileError(Exception):
    """The file cannot be imported as it is: every problem, with its line number."""


@dataclass(frozen=True)
class OutcomeRow:
    line: int  # in the file, the header being line 1
    fields: dict[str, str]


def _problems(fields: dict[str, str]) -> list[str]:
    problems = [
        f"{name} {fields[name]!r} is not one of {', '.join(allowed)}"
        for name, allowed in (("truth", TRUTHS), ("breast", BREASTS), ("source", SOURCES))
        if fields[name] not in allowed
    ]
    try:
        datetime.date.fromisoformat(fields["date"])
    except ValueError:
        problems.append(f"date {fields['date']!r} is not a date (YYYY-MM-DD)")
    named_by = [name for name in ("exam_id", "study_key") if fields.get(name)]
    if len(named_by) != 1:
        problems.append("give exactly one of exam_id and study_key")
    elif named_by == ["exam_id"]:
        try:
            uuid.UUID(fields["exam_id"])
        except ValueError:
            problems.append(f"exam_id {fields['exam_id']!r} is not an exam id")
    return problems


def read_outcomes(path: Path) -> list[OutcomeRow]:
    """The file's rows, or OutcomeFileError listing every problem in it."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED if name not in header]
        if missing or not {"exam_id", "study_key"} & set(header):
            wanted = [
                *missing,
                *([] if {"exam_id", "study_key"} & set(header) else ["exam_id or study_key"]),
            ]
            raise OutcomeFileError(f"{path}: the header lacks {', '.join(wanted)}")
        reader.fieldnames = header
        rows: list[OutcomeRow] = []
        problems: list[str] = []
        for line, record in enumerate(reader, start=2):
            fields = {
                name: (value or "").strip()
                for name, value in record.items()
                if name in (*REQUIRED, "exam_id", "study_key")
            }
            found = _problems(fields)
            problems.extend(f"{path}:{line}: {problem}" for problem in found)
            if not found:
                named_by = "exam_id" if fields.get("exam_id") else "study_key"
                rows.append(
                    OutcomeRow(line, {name: fields[name] for name in (*REQUIRED, named_by)})
                )
    if problems:
        raise OutcomeFileError("\n".join(problems))
    if not rows:
        raise OutcomeFileError(f"{path}: no outcomes in the file")
    return rows


def import_outcomes(
    rows: list[OutcomeRow],
    send: Callable[[list[dict[str, str]]], dict[str, Any]],
    *,
    per_request: int = OUTCOMES_PER_REQUEST,
) -> tuple[int, int]:
    """Send the rows in requests of `per_request`; (outcomes recorded, exams). A request the
    service refuses raises OutcomeFileError naming the file's lines and what went in before."""
    recorded = exams = 0
    for start in range(0, len(rows), per_request):
        chunk = rows[start : start + per_request]
        try:
            answer = send([row.fields for row in chunk])
        except ApiClientError as err:
            if err.code != "unknown_exams":
                raise
            lines = ", ".join(str(chunk[i].line) for i in err.detail.get("rows", [])[:50])
            before = (
                f"; the {start} rows before line {chunk[0].line} were recorded (importing the "
                "file again replaces them)"
                if start
                else "; nothing was recorded"
            )
            raise OutcomeFileError(
                f"no exam of yours has the exam_id or study_key of line(s) {lines}{before}"
            ) from err
        recorded += answer["recorded"]
        exams += answer["exams"]
    return recorded, exams


def add_outcome_commands(commands: Any) -> None:
    outcomes = commands.add_parser(
        "outcomes", help="what became of screened exams (biopsy, follow-up ...)"
    ).add_subparsers(dest="outcomes_command", required=True)
    imported = outcomes.add_parser(
        "import", help="record the outcomes of a CSV file (exam_id or study_key, truth, ...)"
    )
    imported.add_argument("file", type=Path)
    _connection_flags(imported)
    imported.set_defaults(func=cmd_outcomes_import)
    listed = outcomes.add_parser("list", help="an exam's outcomes")
    listed.add_argument("exam")
    _connection_flags(listed)
    listed.set_defaults(func=cmd_outcomes_list)


def cmd_outcomes_import(args: argparse.Namespace) -> int:
    try:
        rows = read_outcomes(args.file)
        with _client(args) as client:
            recorded, exams = import_outcomes(rows, client.import_outcomes)
    except OutcomeFileError as err:
        raise UsageError(str(err)) from err
    print(f"recorded {recorded} outcomes for {exams} exams from {len(rows)} rows of {args.file}")
    return 0


def cmd_outcomes_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for outcome in client.outcomes(args.exam):
            print(
                f"{outcome['date']}  {outcome['truth']:<9}  {outcome['breast']:<5}  "
                f"{outcome['source']}"
            )
    return 0

"""The `screening` commands that talk to the services: submit, status, results, batches.

Where the services are and which key to use come from flags, else the environment
(`SCREENING_INGEST_URL`, `SCREENING_RESULTS_URL`, `SCREENING_API_KEY`), else a config file
(`--config`, default `~/.config/mammoscreen/config.toml`) with `ingest_url`, `results_url`
and `api_key`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

from mammoscreen_client import MEDIA_TYPES, ApiClientError, BatchStatus, Client, ImageResult

DEFAULT_CONFIG = Path("~/.config/mammoscreen/config.toml")
UPLOADABLE = {*MEDIA_TYPES, ".zip"}
FILES_PER_REQUEST = 16


class UsageError(Exception):
    """Something the user must fix; printed without a traceback."""


@dataclass(frozen=True)
class Connection:
    ingest_url: str
    results_url: str
    api_key: str


def connection(args: argparse.Namespace) -> Connection:
    config_path = Path(args.config or DEFAULT_CONFIG).expanduser()
    from_file: dict[str, Any] = {}
    if config_path.exists():
        try:
            from_file = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{config_path} is not valid TOML: {err}") from err
    elif args.config:
        raise UsageError(f"config file {config_path} does not exist")
    values = {}
    for name, flag in (
        ("ingest_url", "--ingest-url"),
        ("results_url", "--results-url"),
        ("api_key", "--api-key"),
    ):
        value = (
            getattr(args, name)
            or os.environ.get(f"SCREENING_{name.upper()}")
            or from_file.get(name)
        )
        if not value:
            raise UsageError(
                f"no {name.replace('_', ' ')}: pass {flag}, set SCREENING_{name.upper()}, or "
                f'put {name} = "..." in {config_path} (`make up` writes .stack/env; '
                "`source .stack/env` sets all three)"
            )
        values[name] = str(value)
    return Connection(**values)


def _client(args: argparse.Namespace) -> Client:
    conn = connection(args)
    return Client(ingest_url=conn.ingest_url, results_url=conn.results_url, api_key=conn.api_key)


def collect_files(paths: Sequence[str]) -> list[Path]:
    """Files as given, and the images and zips inside folders (recursively), sorted."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in UPLOADABLE)
            )
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {raw}")
    if not found:
        raise UsageError(
            "nothing to upload: give DICOM (.dcm), PNG, JPEG or zip files, or folders holding them"
        )
    return found


class _CountingReader(io.RawIOBase):
    """A file that advances a byte progress bar as the upload reads it."""

    def __init__(self, handle: IO[bytes], bar: tqdm[Any]) -> None:
        self._handle = handle
        self._bar = bar
        self._sent = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._bar.update(-self._sent)  # a retried request reads the file again
        self._sent = 0
        return self._handle.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._sent += len(data)
        self._bar.update(len(data))
        return data


def upload_with_progress(
    client: Client, batch_id: str, files: list[Path], *, quiet: bool
) -> tuple[int, list[dict[str, Any]]]:
    """Upload in requests of FILES_PER_REQUEST files with a files bar and a bytes bar;
    returns (accepted count, rejected entries)."""
    total_bytes = sum(p.stat().st_size for p in files)
    accepted, rejected = 0, []
    with (
        tqdm(total=len(files), unit="file", desc="files ", disable=quiet, position=0) as by_file,
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="upload",
            disable=quiet,
            position=1,
        ) as by_byte,
    ):
        for start in range(0, len(files), FILES_PER_REQUEST):
            chunk = files[start : start + FILES_PER_REQUEST]
            handles = [open(p, "rb") for p in chunk]  # noqa: SIM115 (closed below)
            try:
                readers = [_CountingReader(h, by_byte) for h in handles]
                try:
                    result = client.upload_files(
                        batch_id,
                        [
                            (
                                p.name,
                                r,
                                MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream"),
                            )
                            for p, r in zip(chunk, readers, strict=True)
                        ],
                    )
                except ApiClientError as err:
                    if err.code != "no_acceptable_files":
                        raise
                    result = {"accepted": [], "rejected": err.detail.get("rejected", [])}
            finally:
                for handle in handles:
                    handle.close()
            accepted += len(result["accepted"])
            rejected.extend(result["rejected"])
            by_file.update(len(chunk))
    return accepted, rejected


def wait_with_progress(
    client: Client, batch_id: str, total: int, *, timeout: float, quiet: bool
) -> BatchStatus:
    """Follow the batch (long polling) with a bar of screened images, rate and ETA."""
    with tqdm(total=total, unit="image", desc="screen", disable=quiet) as bar:

        def progress(status: BatchStatus) -> None:
            finished = status["counts"]["done"] + status["counts"]["failed"]
            bar.update(finished - bar.n)

        return client.wait(batch_id, timeout=timeout, poll=10, on_change=progress)


def summary(client: Client, batch_id: str, status: BatchStatus) -> str:
    counts = status["counts"]
    lines = [
        f"batch {batch_id}: {status['status']}, {counts['done']} screened, "
        f"{counts['failed']} failed, {status['rejected_files']} files refused"
    ]
    exams = list(client.iter_exams(batch_id))
    scored = sorted(
        (e for e in exams if e["exam_score"] is not None),
        key=lambda e: e["exam_score"] or 0.0,
        reverse=True,
    )
    recalls = sum(e.get("recall") == "recall" for e in exams)
    lines.append(f"{len(exams)} exams, {recalls} recommended for recall")
    for exam in scored[:5]:
        recall = exam.get("recall") or "-"
        lines.append(
            f"  exam {exam['id']}  score {exam['exam_score']:.3f}  {recall}"
            + (f"  missing {','.join(exam['missing_views'])}" if exam["missing_views"] else "")
        )
    for warning in status["warnings"]:
        lines.append(f"NOTE: {warning}")
    return "\n".join(lines)


def cmd_submit(args: argparse.Namespace) -> int:
    files = collect_files(args.paths)
    name = args.batch_name or f"submitted {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with _client(args) as client:
        batch = client.create_batch(name, priority=args.priority)
        accepted, rejected = upload_with_progress(client, batch["id"], files, quiet=args.quiet)
        client.close_batch(batch["id"])
        print(f"batch {batch['id']}: {accepted} images accepted, {len(rejected)} refused")
        for entry in rejected[:20]:
            print(f"  refused {entry['filename']}: {entry['code']}: {entry['message']}")
        if not args.wait:
            print(f"follow it with: screening status {batch['id']}")
            return 0 if accepted else 1
        status = wait_with_progress(
            client, batch["id"], accepted, timeout=args.timeout, quiet=args.quiet
        )
        print(summary(client, batch["id"], status))
    return 0 if accepted else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.batch(args.batch)
    counts = ", ".join(f"{k} {v}" for k, v in status["counts"].items() if v)
    print(f"{status['name']} ({status['id']}): {status['status']}; {counts or 'no images'}")
    for warning in status["warnings"]:
        print(f"NOTE: {warning}")
    return 0


TABLE_COLUMNS = ("filename", "laterality", "view", "status", "score", "error_code")


def _table(rows: Iterator[ImageResult]) -> Iterator[str]:
    yield "  ".join(f"{c:<12}" for c in TABLE_COLUMNS)
    for row in rows:
        cells = []
        for column in TABLE_COLUMNS:
            value = row.get(column)
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value or "-"))
        yield "  ".join(f"{c:<12}" for c in cells)


def _dicom_results(client: Client, batch_id: str, folder: Path) -> int:
    """Every exam's report and heatmaps as .dcm files under `folder`; returns files written.
    Exams without DICOM results (not DICOM, or not rendered yet) are named on stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for exam in client.iter_exams(batch_id):
        try:
            (folder / f"report-{exam['id']}.dcm").write_bytes(client.dicom_report(exam["id"]))
            written += 1
            for image in exam["images"]:
                heatmap = client.dicom_heatmap(image["id"])
                (folder / f"heatmap-{image['id']}.dcm").write_bytes(heatmap)
                written += 1
        except ApiClientError as err:
            if err.status not in (404, 409):
                raise
            print(f"exam {exam['id']}: {err.code}: {err.message}", file=sys.stderr)
    return written


def cmd_results(args: argparse.Namespace) -> int:
    if args.format == "dicom":
        if not args.output:
            print("error: --format dicom writes files: give --output DIR", file=sys.stderr)
            return 2
        with _client(args) as client:
            written = _dicom_results(client, args.batch, Path(args.output))
        print(f"{written} DICOM files written to {args.output}", file=sys.stderr)
        return 0
    out: IO[str] = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        with _client(args) as client:
            if args.format == "table":
                for line in _table(client.iter_results(args.batch)):
                    out.write(line + "\n")
            else:
                for chunk in client.export(args.batch, format=args.format):
                    out.write(chunk)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        print(f"written to {args.output}", file=sys.stderr)
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for batch in client.batches(limit=args.limit):
            print(
                f"{batch['id']}  {batch['status']:<10}  {batch['priority']:<6}  "
                f"{batch['created_at'][:19]}  {batch.get('source', 'api'):<8}  {batch['name']}"
            )
    return 0


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingest-url")
    parser.add_argument("--results-url")
    parser.add_argument("--api-key")
    parser.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG})")


def add_commands(commands: Any) -> None:
    submit = commands.add_parser(
        "submit", help="upload files, folders or zips as a batch, and optionally wait"
    )
    submit.add_argument("paths", nargs="+", metavar="PATH")
    submit.add_argument("--batch-name")
    submit.add_argument("--priority", choices=["normal", "urgent"], default="normal")
    submit.add_argument("--wait", action="store_true", help="follow screening to the end")
    submit.add_argument("--timeout", type=float, default=3600)
    submit.add_argument("--quiet", action="store_true", help="no progress bars")
    _connection_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="a batch's status and counts")
    status.add_argument("batch")
    _connection_flags(status)
    status.set_defaults(func=cmd_status)

    results = commands.add_parser("results", help="a batch's results, one row per image")
    results.add_argument("batch")
    results.add_argument(
        "--format",
        choices=["table", "csv", "json", "dicom"],
        default="table",
        help="dicom: each exam's Structured Report and heatmap Segmentations, as files",
    )
    results.add_argument(
        "--output", help="write to this file (a folder for dicom) instead of the terminal"
    )
    _connection_flags(results)
    results.set_defaults(func=cmd_results)

    batches = commands.add_parser("batches", help="your batches, newest first")
    batches.add_argument("--limit", type=int, default=50)
    _connection_flags(batches)
    batches.set_defaults(func=cmd_batches)


def run_guarded(args: argparse.Namespace) -> int:
    """Run a command; print usage and service errors as one line that says what to fix."""
    try:
        result: int = args.func(args)
        return result
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ApiClientError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return 1
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except httpx.TransportError as err:
        print(
            f"error: cannot reach the service ({err}); check --ingest-url/--results-url, and "
            "that the stack is up (`make up`)",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

"""`make bench`, phase "results at scale": polling a programme-sized batch.

On the running local stack (loopback, the results service in its `results_workers`
processes, rate limits at their defaults):

1. fill: one completed batch of `images` images (four views per exam, one in a hundred
   failed, one in fifty flagged unlike the training data, the rest scored) written in SQL in
   the shape the pipeline writes them, through the same triggers, then ANALYZEd.
2. pollers: `pollers` clients, each with its own API key, for `warmup_s` and then the
   `seconds` measured; each repeats status, status with If-None-Match, a results page, an
   exams page (pages of 100, following their cursors), pausing `think_s` after each answer (a
   client that polls, not a load generator: the figures are response times at a stated
   request rate, beside which `results_requests_per_s` is the rate that was served). The
   warm-up's answers are kept apart (`results_warmup_p99_ms`, `status_warmup_p99_ms`): a
   service polled for days is not a process that has just met its first fifty clients (each
   process's first answers build caches: 50 ms for its first status, new Postgres backends
   load their catalogs), and a p99 of a minute's answers is decided by its slowest 1%.
   Meanwhile `bench/jitter.py` times one-byte round trips between two otherwise idle
   processes (`results_machine_wakeup_us`): how late this machine runs a process that woke,
   which every answer's latency includes.
3. export: the whole batch as CSV, rows per second.
4. idle long polls: `long_pollers` requests with `wait` on the unchanged batch for
   `long_poll_seconds` (each asks again when its wait ends with a 304); the CPU Postgres
   spent meanwhile, as a fraction of one core, beside what it spends with no client at all
   just before (`no_client_db_cpu_fraction`).

It also writes the plans (EXPLAIN ANALYZE) of the queries a status answer, a results page
and an exams page run, on this batch, beside the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from sqlalchemy import event, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from bench.cpu import CpuMeter
from bench.jitter import WakeupProbe
from shared.batches import batch_status, create_batch, exams_page
from shared.batches import results_page as results_page_query
from shared.config import Settings
from shared.db.base import get_engine, new_id, session_scope
from shared.db.models import (
    BatchPriority,
    BatchStatus,
    ModelStatus,
    ModelVersion,
    PredictionWarning,
)
from shared.tenants import create_tenant, issue_api_key

VIEWS_PER_EXAM = 4
PAGE = 100
# Idle connections are dropped before uvicorn's 5 s keep-alive ends them, so no request is
# sent on a connection the server is closing (a client's race, not a server failure).
KEEPALIVE_S = 3.0


@dataclass(frozen=True)
class ScaleOptions:
    images: int = 100_000
    pollers: int = 50
    seconds: float = 60.0
    warmup_s: float = 10.0
    think_s: float = 0.5
    long_pollers: int = 200
    long_poll_seconds: float = 30.0
    long_poll_wait_s: float = 20.0


@dataclass
class FilledBatch:
    batch_id: uuid.UUID
    tenant_id: uuid.UUID
    keys: list[str]


def _id_prefix() -> str:
    """The first 20 hex digits of a fresh UUIDv7: ids made from it by appending a 12-digit
    counter sort in the counter's order and after every id made before (as uploads do)."""
    return str(new_id())[:24]


def fill_batch(settings: Settings, *, images: int, keys: int) -> FilledBatch:
    """A tenant with `keys` API keys and a completed batch of `images` images in SQL."""
    with session_scope(settings.database_url) as session:
        tenant = create_tenant(session=session, name=f"bench-scale-{uuid.uuid4().hex[:8]}")
        secrets = [issue_api_key(session=session, tenant=tenant).secret for _ in range(keys)]
        batch = create_batch(
            session=session, tenant_id=tenant.id, name="programme", priority=BatchPriority.NORMAL
        )
        version = session.scalar(
            select(ModelVersion.id).where(ModelVersion.status == ModelStatus.ACTIVE)
        )
        assert version is not None, "the stack registers an active model version"
        ids = {
            "tenant": tenant.id,
            "batch": batch.id,
            "version": version,
            "studies": images // VIEWS_PER_EXAM,
            "images": images,
            "study_prefix": _id_prefix(),
            "image_prefix": _id_prefix(),
            "prediction_prefix": _id_prefix(),
            "flag": PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value,
        }
        _fill(session, ids)
        session.execute(
            text(
                "UPDATE batches SET status = :done, closed_at = now(), completed_at = now() "
                "WHERE id = :batch"
            ),
            {"done": BatchStatus.COMPLETED.value, "batch": batch.id},
        )
        tenant_id, batch_id = tenant.id, batch.id
    # As autovacuum would have left tables that old: statistics, and a visibility map that
    # lets index-only scans skip the heap.
    with get_engine(settings.database_url).connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM (ANALYZE) studies, images, predictions, batch_image_counts")
        )
    return FilledBatch(batch_id=batch_id, tenant_id=tenant_id, keys=secrets)


def _fill(session: Session, ids: dict[str, Any]) -> None:
    session.execute(
        text("""
        INSERT INTO studies (id, tenant_id, batch_id, patient_key, study_key, created_at)
        SELECT (:study_prefix || lpad(to_hex(n), 12, '0'))::uuid, :tenant, :batch,
               md5(n::text) || md5((n + 1)::text), '1.2.826.0.1.3680043.10.' || n, now()
        FROM generate_series(0, :studies - 1) AS n
    """),
        ids,
    )
    session.execute(
        text("""
        INSERT INTO images (id, tenant_id, batch_id, study_id, filename, object_key, sha256,
                            size_bytes, media_type, laterality, view, status, attempts,
                            error_code, error_message, created_at, started_at, finished_at)
        SELECT (:image_prefix || lpad(to_hex(n), 12, '0'))::uuid, :tenant, :batch,
               (:study_prefix || lpad(to_hex(n / 4), 12, '0'))::uuid,
               'exam-' || n / 4 || '-' || n % 4 || '.dcm',
               'images/' || :batch || '/' || n, md5(n::text) || md5((n + 2)::text),
               18000000 + n % 1000, 'application/dicom',
               (CASE WHEN n % 4 < 2 THEN 'L' ELSE 'R' END)::laterality,
               (CASE WHEN n % 2 = 0 THEN 'CC' ELSE 'MLO' END)::view_position,
               (CASE WHEN n % 100 = 99 THEN 'failed' ELSE 'done' END)::image_status, 1,
               CASE WHEN n % 100 = 99 THEN 'undecodable' END,
               CASE WHEN n % 100 = 99 THEN 'the file could not be decoded as an image' END,
               now(), now(), now()
        FROM generate_series(0, :images - 1) AS n
    """),
        ids,
    )
    session.execute(
        text("""
        INSERT INTO predictions (id, tenant_id, image_id, model_version_id, malignancy_score,
                                 heatmap_key, input_distance, warnings, created_at)
        SELECT (:prediction_prefix || lpad(to_hex(n), 12, '0'))::uuid, :tenant,
               (:image_prefix || lpad(to_hex(n), 12, '0'))::uuid, :version, random(),
               'heatmaps/' || :batch || '/' || n || '.png', random() * 6,
               CASE WHEN n % 50 = 0 THEN ARRAY[:flag]::varchar[] ELSE ARRAY[]::varchar[] END,
               now()
        FROM generate_series(0, :images - 1) AS n
        WHERE n % 100 <> 99
    """),
        ids,
    )


# -- pollers ---------------------------------------------------------------------------------


WINDOW_S = 10.0


@dataclass
class Latencies:
    started: float  # time.monotonic() at the start of the first window
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    # Every answer's latency by the window (WINDOW_S) it came in: a p99 that a few seconds
    # of stall made shows as one bad window, a slow service as all of them.
    by_window: dict[int, list[float]] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, status: int) -> None:
        self.by_kind.setdefault(kind, []).append(seconds)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        window = int((time.monotonic() - self.started) // WINDOW_S)
        self.by_window.setdefault(window, []).append(seconds)

    def of(self, *kinds: str) -> list[float]:
        return [s for kind in kinds for s in self.by_kind.get(kind, [])]


def p99_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _p99_ms_or_none(samples: list[float]) -> float | None:
    """None where a short warm-up (tests) saw no answer of that kind."""
    return p99_ms(samples) if samples else None


def _next_cursor(body: bytes) -> str | None:
    """A page's `next_cursor` (its last field), without parsing the whole page: the pollers'
    own CPU is taken from the service's on this machine (real ones run elsewhere)."""
    tail = body[body.rindex(b'"next_cursor":') + len(b'"next_cursor":') : -1]
    cursor: str | None = json.loads(tail)
    return cursor


async def _poller(
    client: aiohttp.ClientSession,
    url: str,
    batch_id: uuid.UUID,
    until: float,
    think_s: float,
    warmup: Latencies,
    measured: Latencies,
    rng: random.Random,
) -> None:
    """Polls until `until`; each answer counts in `measured` if its request was sent once
    the measured window had started, else in `warmup`."""
    etag: str | None = None
    cursors: dict[str, str | None] = {"results": None, "exams": None}
    # Not in step: each starts at a random point of its cycle of four requests. (Started all
    # on status, the fifty pollers asked for their exams pages within the same half second
    # of every cycle: the load came in bursts of twice the rate it averaged.)
    await asyncio.sleep(rng.uniform(0, think_s))
    step = rng.randrange(4)
    while time.monotonic() < until:
        kind = ("status", "status_if_none_match", "results", "exams")[step % 4]
        step += 1
        headers: dict[str, str] = {}
        params: dict[str, str | int] = {}
        path = f"{url}/v1/batches/{batch_id}"
        if kind == "status_if_none_match" and etag:
            headers["If-None-Match"] = etag
        elif kind in cursors:
            path += f"/{kind}"
            params["limit"] = PAGE
            cursor = cursors[kind]
            if cursor:
                params["cursor"] = cursor
        latencies = measured if time.monotonic() >= measured.started else warmup
        started = time.perf_counter()
        async with client.get(path, headers=headers, params=params) as response:
            body = await response.read()
        latencies.add(kind, time.perf_counter() - started, response.status)
        if response.status == 200 and kind.startswith("status"):
            etag = response.headers["ETag"]
        elif response.status == 200:
            cursors[kind] = _next_cursor(body)  # None: the next page is the first
        await asyncio.sleep(think_s)


async def _poll(
    url: str, filled: FilledBatch, options: ScaleOptions
) -> tuple[Latencies, Latencies]:
    """The pollers, each a client of its own (one connection, kept alive), in aiohttp: about
    a third of httpx's CPU per request, which this machine's two cores share with the
    service. The warm-up's answers and the measured window's."""
    now = time.monotonic()
    warmup = Latencies(started=now)
    measured = Latencies(started=now + options.warmup_s)
    clients = [
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=KEEPALIVE_S),
        )
        for key in filled.keys[: options.pollers]
    ]
    try:
        until = measured.started + options.seconds
        await asyncio.gather(
            *(
                _poller(
                    client,
                    url,
                    filled.batch_id,
                    until,
                    options.think_s,
                    warmup,
                    measured,
                    random.Random(i),
                )
                for i, client in enumerate(clients)
            )
        )
        return warmup, measured
    finally:
        for client in clients:
            await client.close()


async def _long_polls(
    url: str, key: str, batch_id: uuid.UUID, options: ScaleOptions, measure: Callable[[], Any]
) -> tuple[Any, dict[str, int]]:
    """Long pollers on the unchanged batch; `measure()` is called once they have all been
    sent and answered once more at the end of the window (what it returns is returned)."""
    answered: dict[str, int] = {}
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=options.long_poll_wait_s + 30,
        limits=httpx.Limits(
            max_connections=options.long_pollers + 10, keepalive_expiry=KEEPALIVE_S
        ),
    ) as client:
        etag = (await client.get(f"/v1/batches/{batch_id}")).headers["ETag"]
        until = time.monotonic() + options.long_poll_seconds

        async def long_poller() -> None:
            while time.monotonic() < until:
                try:
                    response = await client.get(
                        f"/v1/batches/{batch_id}",
                        params={
                            "wait": min(
                                options.long_poll_wait_s, max(0.1, until - time.monotonic())
                            )
                        },
                        headers={"If-None-Match": etag},
                    )
                except httpx.RemoteProtocolError:
                    # A kept-alive connection closed as the request went out: HTTP clients
                    # send an idempotent GET again, and so does this one (counted).
                    answered["disconnected"] = answered.get("disconnected", 0) + 1
                    continue
                status = str(response.status_code)
                answered[status] = answered.get(status, 0) + 1

        start = measure()
        await asyncio.gather(*(long_poller() for _ in range(options.long_pollers)))
        return start, answered


def _export_rows_per_s(url: str, key: str, batch_id: uuid.UUID, images: int) -> tuple[float, int]:
    started = time.perf_counter()
    lines = 0
    with httpx.stream(
        "GET",
        f"{url}/v1/batches/{batch_id}/export",
        params={"format": "csv"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            lines += chunk.count(b"\n")
    seconds = time.perf_counter() - started
    rows = lines - 1  # the header
    assert rows == images, f"the export had {rows} rows, not {images}"
    return rows / seconds, rows


# -- query plans -----------------------------------------------------------------------------


@contextlib.contextmanager
def _captured(session: Session) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def capture(conn: Connection, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def query_plans(settings: Settings, filled: FilledBatch) -> dict[str, list[str]]:
    """EXPLAIN ANALYZE of the queries a status answer, a results page and an exams page run
    (the functions the endpoints call, on a page in the middle of the batch)."""
    plans: dict[str, list[str]] = {}
    tenant, batch = filled.tenant_id, filled.batch_id
    with session_scope(settings.database_url) as session:
        middle = session.scalar(
            text("SELECT id FROM images WHERE batch_id = :b ORDER BY id OFFSET :n LIMIT 1"),
            {"b": batch, "n": PAGE * 10},
        )
        middle_exam = session.scalar(
            text("SELECT id FROM studies WHERE batch_id = :b ORDER BY id OFFSET :n LIMIT 1"),
            {"b": batch, "n": PAGE * 10},
        )
        calls: dict[str, Callable[[], object]] = {
            "status": lambda: batch_status(session=session, tenant_id=tenant, batch_id=batch),
            "results": lambda: results_page_query(
                session=session, tenant_id=tenant, batch_id=batch, limit=PAGE + 1, after=middle
            ),
            "exams": lambda: exams_page(
                session=session,
                tenant_id=tenant,
                batch_id=batch,
                limit=PAGE + 1,
                after=middle_exam,
            ),
        }
        for name, call in calls.items():
            with _captured(session) as statements:
                call()
            plans[name] = []
            for statement, parameters in statements:
                rows = session.connection().exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
                )
                plans[name] += [statement.strip(), *(row[0] for row in rows), ""]
    return plans


def _shortened_lists(plan: str) -> str:
    """A page's 100 ids in an IN list, as its first two and how many more."""

    def shorten(match: re.Match[str]) -> str:
        items = match.group(1).split(",")
        return "'{" + ",".join(items[:2]) + f",... {len(items) - 2} more" + "}'"

    return re.sub(r"'\{([^}']{200,})\}'", shorten, plan)


# -- the phase -------------------------------------------------------------------------------


def measure(
    settings: Settings,
    processes: Callable[[], dict[str, int]],
    options: ScaleOptions,
    plans_out: Path | None,
) -> dict[str, Any]:
    url = settings.results_url
    started = time.perf_counter()
    filled = fill_batch(settings, images=options.images, keys=options.pollers + 1)
    figures: dict[str, Any] = {"results_scale_images": options.images}
    figures["results_scale_fill_s"] = round(time.perf_counter() - started, 1)

    meter = CpuMeter(processes(), alone={"bench": os.getpid()})
    start = meter.mark()
    with WakeupProbe() as wakeups:
        warmup, latencies = asyncio.run(_poll(url, filled, options))
    usage = meter.since(start)
    pages = latencies.of("results", "exams")
    status = latencies.of("status", "status_if_none_match")
    served = len(pages) + len(status)
    figures.update(
        {
            "results_p99_ms": p99_ms(pages),
            "status_p99_ms": p99_ms(status),
            "results_requests_per_s": served / options.seconds,
            "results_warmup_s": options.warmup_s,
            "results_warmup_p99_ms": _p99_ms_or_none(warmup.of("results", "exams")),
            "status_warmup_p99_ms": _p99_ms_or_none(warmup.of("status", "status_if_none_match")),
            "results_pollers": options.pollers,
            "results_think_s": options.think_s,
            "results_http_statuses": {
                str(k): v
                for k, v in sorted((Counter(latencies.statuses) + Counter(warmup.statuses)).items())
            },
            "results_latency_ms": {
                kind: {
                    "requests": len(samples),
                    "p50": 1000 * statistics.median(samples),
                    "p99": p99_ms(samples),
                }
                for kind, samples in sorted(latencies.by_kind.items())
            },
            "results_p99_ms_by_10s": [
                round(p99_ms(samples)) for _, samples in sorted(latencies.by_window.items())
            ],
            # Round trips of one byte between two idle processes during the pollers: the
            # machine's own delay in running a process that woke, which every answer's
            # latency includes.
            "results_machine_wakeup_us": wakeups.result,
            "results_cpu_cores": {
                name: round(cpu / usage.wall_s, 3) for name, cpu in usage.by_process.items()
            },
        }
    )
    key = filled.keys[-1]
    figures["export_rows_per_s"], _ = _export_rows_per_s(url, key, filled.batch_id, options.images)

    postgres = CpuMeter(
        {"postgres": processes()["postgres"], "results": processes()["results"]}, alone={}
    )
    # For comparison: what Postgres spends with no client at all (autovacuum after the
    # phases before, its own housekeeping), over a third of the long polls' window.
    quiet_mark = postgres.mark()
    time.sleep(options.long_poll_seconds / 3)
    quiet = postgres.since(quiet_mark)
    figures["no_client_db_cpu_fraction"] = quiet.by_process["postgres"] / quiet.wall_s
    mark, answered = asyncio.run(_long_polls(url, key, filled.batch_id, options, postgres.mark))
    idle = postgres.since(mark)
    figures["longpoll_idle_db_cpu_fraction"] = idle.by_process["postgres"] / idle.wall_s
    figures["longpoll_idle_results_cpu_fraction"] = idle.by_process["results"] / idle.wall_s
    figures["longpoll_pollers"] = options.long_pollers
    figures["longpoll_http_statuses"] = dict(sorted(answered.items()))
    if plans_out is not None:
        plans = query_plans(settings, filled)
        text_of = "\n".join(f"== {name}\n" + "\n".join(lines) for name, lines in plans.items())
        plans_out.write_text(_shortened_lists(text_of))
        figures["results_query_plans"] = str(plans_out)
    return figures


def main(argv: list[str] | None = None) -> int:
    """This phase alone, on a stack of its own (`make bench` runs it after the others)."""
    import argparse
    import sys
    import tempfile

    from devstack.stack import down, up
    from shared.config import settings_from_environ

    parser = argparse.ArgumentParser(prog="python -m bench.results_scale")
    parser.add_argument("--images", type=int, default=ScaleOptions.images)
    parser.add_argument("--pollers", type=int, default=ScaleOptions.pollers)
    parser.add_argument("--seconds", type=float, default=ScaleOptions.seconds)
    parser.add_argument("--warmup-s", type=float, default=ScaleOptions.warmup_s)
    parser.add_argument("--think-s", type=float, default=ScaleOptions.think_s)
    parser.add_argument("--long-pollers", type=int, default=ScaleOptions.long_pollers)
    parser.add_argument("--long-poll-seconds", type=float, default=ScaleOptions.long_poll_seconds)
    args = parser.parse_args(argv)
    options = ScaleOptions(
        images=args.images,
        pollers=args.pollers,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        think_s=args.think_s,
        long_pollers=args.long_pollers,
        long_poll_seconds=args.long_poll_seconds,
    )
    stack_dir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    state = up(stack_dir)
    try:
        settings = settings_from_environ(state.service_env)
        processes = lambda: {**state.services, **{s.name: s.pid for s in state.servers}}  # noqa: E731
        figures = measure(settings, processes, options, stack_dir / "plans.txt")
    finally:
        down(stack_dir)
    json.dump(figures, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers the tests share: HTTP request pieces, Celery queue inspection, polling with a
deadline, and the inference worker run in-process."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.models import Image
from shared.storage import ObjectStore


def wait_for(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll `condition` until it holds; fail with `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def files_field(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def upload_batch(
    ingest: TestClient, key: str, paths: list[Path], *, name: str = "batch"
) -> tuple[dict[str, object], dict[str, object]]:
    """Create a batch and upload `paths` in one request: (the batch, the upload's answer)."""
    batch = ingest.post("/v1/batches", json={"name": name}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images", files=files_field(paths), headers=auth(key)
    )
    assert upload.status_code == 202, upload.text
    return batch, upload.json()


def queued_task_args(settings: Settings, queue: str = "inference") -> list[list[str]]:
    """Image-id lists of the tasks waiting in a Celery queue on the real Redis."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        messages = client.lrange(queue, 0, -1)
    finally:
        client.close()
    args = []
    for raw in messages:
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        args.append(body[0][0])
    return args


def screen_everything(session: Session, settings: Settings, store: ObjectStore) -> None:
    """Run the inference worker in-process over every image in the test's database."""
    from services.worker.inference import WorkerContext, run_screening
    from services.worker.models import ModelCache

    ctx = WorkerContext(settings, store, ModelCache(settings, store))
    ids = [image.id for image in session.scalars(select(Image))]
    for start in range(0, len(ids), 16):
        run_screening(ids[start : start + 16], ctx)
    session.expire_all()


def dcmtk(tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run one of Debian's dcmtk tools (echoscu, storescu, ...): a DICOM peer we did not write."""
    assert shutil.which(tool), f"{tool} is missing: `make dicom-tools` installs Debian's dcmtk"
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=180, check=False
    )

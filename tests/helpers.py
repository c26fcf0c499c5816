"""Helpers the tests share: HTTP request pieces, Celery queue inspection, polling with a
deadline, and the inference worker run in-process."""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import CONNECTION_FIELDS, Settings, settings_to_environ
from shared.db.models import Image, ModelVersion
from shared.ml.checkpoint import checkpoint_bytes, load_checkpoint
from shared.ml.registry import active_model
from shared.storage import ObjectStore


def stack_environ(
    settings: Settings | None, overrides: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment a test's local stack starts with: this process's less its own
    SCREENING_ settings, the servers of `settings`, then `overrides` (SCREENING_ names).

    One results process, not one per core: each costs seconds of CPU to start, and these
    tests poll gently. The several-process service is what the smoke bench's stack runs."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    if settings is not None:
        environ.update(settings_to_environ(settings, CONNECTION_FIELDS))
    environ["SCREENING_RESULTS_WORKERS"] = "1"
    environ.update(overrides or {})
    return environ


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


def dciodvfy_errors(path: Path) -> list[str]:
    """The errors dicom3tools' validator finds in a DICOM file (warnings are not errors)."""
    assert shutil.which("dciodvfy"), "dciodvfy is missing: `make dicom-tools` installs dicom3tools"
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def sr_number(report: pydicom.Dataset, meaning: str) -> float:
    """The first numeric content item named `meaning`, anywhere in an SR's content tree."""
    stack = list(report.ContentSequence)
    while stack:
        item = stack.pop(0)
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "NUM" and name and name[0].CodeMeaning == meaning:
            return float(item.MeasuredValueSequence[0].NumericValue)
        stack.extend(item.get("ContentSequence", []))
    raise AssertionError(f"no {meaning!r} in the SR")


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass(frozen=True)
class Orthanc:
    """Debian's Orthanc as a site's PACS: its REST API, DICOM port and DICOMweb root."""

    url: str
    aet: str
    dicom_port: int

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def studies(self) -> list[dict[str, object]]:
        ids = httpx.get(f"{self.url}/studies", timeout=30).json()
        return [httpx.get(f"{self.url}/studies/{i}", timeout=30).json() for i in ids]

    def instance_count(self) -> int:
        return int(httpx.get(f"{self.url}/statistics", timeout=30).json()["CountInstances"])


@contextlib.contextmanager
def run_orthanc(
    folder: Path,
    *,
    aet: str = "SITEPACS",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    dicom_port: int | None = None,
) -> Iterator[Orthanc]:
    """Orthanc with its DICOMweb plugin on free ports (or the DICOM port given), knowing
    `modalities` (name: AE title, host, port) as peers it may send to."""
    from devstack.servers import free_port, stop_pid

    assert shutil.which("Orthanc"), "Orthanc is missing: `make dicom-tools` installs it"
    assert ORTHANC_DICOMWEB_PLUGIN.exists(), "`make dicom-tools` installs orthanc-dicomweb"
    http_port, dicom_port = free_port(), dicom_port or free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": aet,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with (folder / "orthanc.log").open("ab") as log:
        process = subprocess.Popen(
            ["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{http_port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=60, what="Orthanc")
        yield Orthanc(url=url, aet=aet, dicom_port=dicom_port)
    finally:
        stop_pid(process.pid)


def training_labels(folder: Path) -> list[dict[str, Any]]:
    """The labels of a generated folder (its labels.csv) as POST /v1/training-runs takes them."""
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = []
    for row in rows:
        entry: dict[str, Any] = {"file": row["file"], "label": row["label"]}
        if row["box_x0"]:
            entry["box"] = [int(row[f"box_{c}"]) for c in ("x0", "y0", "x1", "y1")]
        labels.append(entry)
    return labels


def training_batch(ingest: TestClient, key: str, folder: Path) -> str:
    """Upload a folder as a closed training batch; its id."""
    batch = ingest.post(
        "/v1/batches", json={"name": "training data", "purpose": "training"}, headers=auth(key)
    ).json()
    assert batch["purpose"] == "training"
    paths = sorted(folder.glob("*.dcm"))
    for start in range(0, len(paths), 32):
        response = ingest.post(
            f"/v1/batches/{batch['id']}/images",
            files=files_field(paths[start : start + 32]),
            headers=auth(key),
        )
        assert response.status_code == 202, response.text
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    return str(batch["id"])


def shadow_of_active(session: Session, store: ObjectStore, *, noise: float) -> ModelVersion:
    """A trained candidate: the active version's weights, perturbed by `noise`."""
    active = active_model(session=session)
    assert active is not None
    model = load_checkpoint(store.get_bytes(active.checkpoint_key), device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    key = f"models/shadow-{uuid.uuid4().hex[:8]}.pt"
    store.put_bytes(key, checkpoint_bytes(model), content_type="application/octet-stream")
    version = ModelVersion(
        name=f"shadow-{uuid.uuid4().hex[:6]}",
        architecture=active.architecture,
        checkpoint_key=key,
        trained=True,
        recall_threshold=active.recall_threshold,
        calibration=active.calibration,
    )
    session.add(version)
    session.commit()
    return version

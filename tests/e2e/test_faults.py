"""Fault tests: real servers and real service processes, killed and cut off mid-batch.

Each test ends by counting, in Postgres, what every guarantee in docs/reliability.md promises:
no image lost (all `done`), none screened twice (one prediction each), none stuck.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from devstack.servers import (
    RunningServer,
    restart_server,
    start_postgres,
    start_redis,
    start_s3,
    stop_server,
)
from devstack.stack import StackState, down, kill_service, start_service_again, up
from devstack.synth import SynthOptions, generate_exams
from mammoscreen_client import ApiClientError, Client
from shared.config import settings_from_environ
from shared.db.base import get_engine, session_factory
from shared.db.models import Batch, BatchSource, Image, ImageStatus, Prediction, Tenant
from shared.dicom_nodes import add_node
from shared.storage import Keys, ObjectStore
from tests.helpers import stack_environ, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

S3_KEYS = {"access_key": "fault-access", "secret_key": "fault-secret-key"}
SMALL_FAULT_IMAGES = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
FAST_RECOVERY = {
    "SCREENING_LEASE_S": "6",
    "SCREENING_SWEEP_INTERVAL_S": "1",
    "SCREENING_REQUEUE_AFTER_S": "30",
    "SCREENING_INFERENCE_CHUNK_SIZE": "8",
    "SCREENING_DICOM_STUDY_QUIET_S": "2",
}


@dataclass
class FaultStack:
    dir: Path
    state: StackState
    servers: dict[str, RunningServer]
    images: list[Path]

    @property
    def database_url(self) -> str:
        return self.state.env["SCREENING_DATABASE_URL"]

    def client(self, retries: int = 5) -> Client:
        env = self.state.env
        return Client.from_env(env, retries=retries)

    def restart(self, name: str) -> None:
        credentials = S3_KEYS if name == "s3" else {}
        self.servers[name] = restart_server(self.servers[name], **credentials)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    root = tmp_path_factory.mktemp("faults")
    servers = {
        "postgres": start_postgres(root / "postgres"),
        "redis": start_redis(root / "redis"),
        "s3": start_s3(root / "s3", **S3_KEYS),
    }
    environ = stack_environ(None, FAST_RECOVERY)
    environ.update(
        {
            "SCREENING_ENV": "test",
            "SCREENING_DATABASE_URL": servers["postgres"].url,
            "SCREENING_REDIS_URL": servers["redis"].url,
            "SCREENING_S3_ENDPOINT": servers["s3"].url,
            "SCREENING_S3_ACCESS_KEY": S3_KEYS["access_key"],
            "SCREENING_S3_SECRET_KEY": S3_KEYS["secret_key"],
        }
    )
    small = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
    images = [i.path for i in generate_exams(root / "exams", exams=75, seed=31, options=small)]
    stack = FaultStack(root / "stack", StackState(env={}), servers, images)
    try:
        stack.state = up(stack.dir, environ=environ)
        yield stack
    finally:
        assert down(stack.dir) == [], "service processes left running"
        for server in stack.servers.values():
            stop_server(server)


def submit(stack: FaultStack, paths: list[Path], *, close: bool = True) -> str:
    with stack.client() as client:
        batch_id: str = client.create_batch(f"fault-{uuid.uuid4().hex[:6]}")["id"]
        for start in range(0, len(paths), 25):
            client.upload(batch_id, paths[start : start + 25])
        if close:
            client.close_batch(batch_id)
    return batch_id


def counts(stack: FaultStack, batch_id: str) -> dict[str, int]:
    """Image statuses, predictions and the most predictions any one image has, from Postgres."""
    with session_factory(stack.database_url)() as session:
        batch = uuid.UUID(batch_id)
        by_status = dict(
            session.execute(
                select(Image.status, func.count())
                .where(Image.batch_id == batch)
                .group_by(Image.status)
            ).all()
        )
        per_image = (
            select(func.count().label("n"))
            .select_from(Prediction)
            .join(Image, Image.id == Prediction.image_id)
            .where(Image.batch_id == batch)
            .group_by(Prediction.image_id)
            .subquery()
        )
        predictions, most = session.execute(
            select(
                func.coalesce(func.sum(per_image.c.n), 0), func.coalesce(func.max(per_image.c.n), 0)
            )
        ).one()
    return {
        "done": by_status.get(ImageStatus.DONE, 0),
        "failed": by_status.get(ImageStatus.FAILED, 0),
        "stuck": by_status.get(ImageStatus.QUEUED, 0) + by_status.get(ImageStatus.RUNNING, 0),
        "predictions": int(predictions),
        "most_predictions_per_image": int(most),
    }


def running_attempts(stack: FaultStack) -> dict[uuid.UUID, int]:
    with session_factory(stack.database_url)() as session:
        rows = session.execute(
            select(Image.id, Image.attempts).where(Image.status == ImageStatus.RUNNING)
        ).all()
    return {image_id: attempts for image_id, attempts in rows}


def claimed_again(stack: FaultStack, held: dict[uuid.UUID, int]) -> bool:
    """Whether every image in `held` (id: attempts then) has been claimed once more since."""
    with session_factory(stack.database_url)() as session:
        now = dict(
            session.execute(select(Image.id, Image.attempts).where(Image.id.in_(held))).all()
        )
    return all(now[image_id] > attempts for image_id, attempts in held.items())


def assert_exactly_once(stack: FaultStack, batch_id: str, total: int) -> None:
    wait_for(
        lambda: counts(stack, batch_id)["stuck"] == 0,
        timeout=240,
        what=f"batch {batch_id} to finish: {counts(stack, batch_id)}",
    )
    final = counts(stack, batch_id)
    lost = total - final["done"]
    duplicates = final["predictions"] - final["done"]
    assert (lost, duplicates, final["stuck"], final["failed"]) == (0, 0, 0, 0), final
    assert final["most_predictions_per_image"] == 1
    with stack.client() as client:
        assert client.batch(batch_id)["status"] == "completed"


def test_worker_sigkilled_three_times_mid_batch(fault_stack: FaultStack) -> None:
    batch_id = submit(fault_stack, fault_stack.images)  # 300 images
    for kill in range(3):
        target = 40 * (kill + 1)
        wait_for(
            lambda t=target: counts(fault_stack, batch_id)["done"] >= t,
            timeout=120,
            what=f"{target} images done before kill {kill + 1}",
        )
        kill_service(fault_stack.dir, "worker", signal.SIGKILL)
        killed = time.monotonic()
        assert counts(fault_stack, batch_id)["done"] < 300, "batch finished before the kill"
        held = running_attempts(fault_stack)  # what the dead worker held
        start_service_again(fault_stack.dir, "worker")
        # Its images are screened again once their short lease (6 s here) runs out: loosely,
        # within a minute of the kill (with the old 300 s lease they waited five).
        wait_for(
            partial(claimed_again, fault_stack, held),
            timeout=60 - (time.monotonic() - killed),
            what=f"the {len(held)} images the killed worker held to be claimed again",
        )
    assert_exactly_once(fault_stack, batch_id, total=300)


def test_redis_stopped_and_restarted_mid_batch(fault_stack: FaultStack) -> None:
    paths = fault_stack.images[:120]
    batch_id = submit(fault_stack, paths)
    wait_for(
        lambda: counts(fault_stack, batch_id)["done"] >= 8, timeout=120, what="screening to start"
    )
    stop_server(fault_stack.servers["redis"])
    time.sleep(2)
    fault_stack.restart("redis")
    assert_exactly_once(fault_stack, batch_id, total=len(paths))


def test_object_storage_outage_during_upload_and_inference(fault_stack: FaultStack) -> None:
    paths = fault_stack.images[:40]
    kill_service(fault_stack.dir, "worker", signal.SIGTERM)  # graceful: nothing in flight
    batch_id = submit(fault_stack, paths)
    assert counts(fault_stack, batch_id)["done"] == 0
    stop_server(fault_stack.servers["s3"])

    # Upload while storage is down: 503 with Retry-After, and no row written (the answer
    # itself is the point: the client's retries would only wait out Retry-After five times).
    with fault_stack.client(retries=0) as client:
        other = client.create_batch("during-outage")["id"]
        with pytest.raises(ApiClientError) as caught:
            client.upload(other, paths[:2])
    assert (caught.value.status, caught.value.code) == (503, "storage_unavailable")
    assert counts(fault_stack, other) == {
        "done": 0,
        "failed": 0,
        "stuck": 0,
        "predictions": 0,
        "most_predictions_per_image": 0,
    }

    # Inference while storage is down: transient failures are retried, not failed.
    start_service_again(fault_stack.dir, "worker")
    worker_log = fault_stack.dir / "logs" / "worker.log"
    wait_for(
        lambda: "transient failure" in worker_log.read_text(errors="replace"),
        timeout=60,
        what="the worker to meet the outage",
    )
    assert counts(fault_stack, batch_id)["failed"] == 0
    fault_stack.restart("s3")
    assert_exactly_once(fault_stack, batch_id, total=len(paths))


def test_services_reconnect_after_a_postgres_restart(fault_stack: FaultStack) -> None:
    results_url = fault_stack.state.env["SCREENING_RESULTS_URL"]
    headers = {"Authorization": f"Bearer {fault_stack.state.env['SCREENING_API_KEY']}"}
    assert httpx.get(f"{results_url}/v1/batches", headers=headers).status_code == 200

    store = ObjectStore(settings_from_environ(fault_stack.state.env))
    # Uploads only: workers may still be writing earlier batches' heatmaps and DICOM results.
    objects_before = len(list(store.list_keys(Keys.UPLOADS)))
    stop_server(fault_stack.servers["postgres"])
    during = httpx.get(f"{results_url}/v1/batches", headers=headers)
    assert during.status_code == 503
    assert during.json()["error"]["code"] == "database_unavailable"
    assert int(during.headers["Retry-After"]) > 0
    with fault_stack.client(retries=0) as client, pytest.raises(ApiClientError) as caught:
        client.upload(str(uuid.uuid4()), fault_stack.images[:2])
    assert (caught.value.status, caught.value.code) == (503, "database_unavailable")
    assert len(list(store.list_keys(Keys.UPLOADS))) == objects_before
    fault_stack.restart("postgres")
    get_engine(fault_stack.database_url).dispose()  # this test process's own pool

    wait_for(
        lambda: httpx.get(f"{results_url}/v1/batches", headers=headers).status_code == 200,
        timeout=30,
        what="the results service to reconnect",
    )
    paths = fault_stack.images[:8]
    batch_id = submit(fault_stack, paths)  # ingest and the worker reconnected too
    assert_exactly_once(fault_stack, batch_id, total=len(paths))


def test_sigterm_lets_the_worker_finish_its_chunk(fault_stack: FaultStack) -> None:
    paths = fault_stack.images[:120]
    batch_id = submit(fault_stack, paths)
    wait_for(
        lambda: counts(fault_stack, batch_id)["done"] >= 16, timeout=120, what="screening to start"
    )
    kill_service(fault_stack.dir, "worker", signal.SIGTERM)  # returns once the worker exited
    with session_factory(fault_stack.database_url)() as session:
        running = session.scalar(
            select(func.count()).where(
                Image.batch_id == uuid.UUID(batch_id), Image.status == ImageStatus.RUNNING
            )
        )
    assert running == 0, "a warm shutdown must finish (or hand back) the chunk in flight"
    assert counts(fault_stack, batch_id)["done"] < len(paths), "stopped too late to tell"
    start_service_again(fault_stack.dir, "worker")
    assert_exactly_once(fault_stack, batch_id, total=len(paths))


# -- the DICOM gateway ----------------------------------------------------------------------


def _register_pacs(stack: FaultStack, ae_title: str) -> None:
    """Let `ae_title` send studies for the stack's demo tenant (the one its API key is of)."""
    with session_factory(stack.database_url)() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == "demo")).one()
        add_node(session=session, tenant_id=tenant_id, ae_title=ae_title)
        session.commit()


def _storescu(stack: FaultStack, ae_title: str, folder: Path) -> list[str]:
    assert shutil.which("storescu"), "storescu is missing: `make dicom-tools` installs dcmtk"
    env = stack.state.env
    return [
        "storescu", "-aet", ae_title, "-aec", env["SCREENING_DICOM_AE_TITLE"], "-nh",
        "+sd", "+sp", "*.dcm", "127.0.0.1", env["SCREENING_DICOM_PORT"], str(folder),
    ]  # fmt: skip


def _dicom_counts(stack: FaultStack) -> dict[str, int]:
    """Images that came by DICOM, with their predictions, from Postgres."""
    with session_factory(stack.database_url)() as session:
        dicom = select(Batch.id).where(Batch.source == BatchSource.DICOM)
        images = session.scalar(
            select(func.count()).select_from(Image).where(Image.batch_id.in_(dicom))
        )
        done = session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.batch_id.in_(dicom), Image.status == ImageStatus.DONE)
        )
        predictions = session.scalar(
            select(func.count())
            .select_from(Prediction)
            .join(Image, Image.id == Prediction.image_id)
            .where(Image.batch_id.in_(dicom))
        )
        open_batches = session.scalar(
            select(func.count())
            .select_from(Batch)
            .where(Batch.source == BatchSource.DICOM, Batch.status != "completed")
        )
    return {
        "images": int(images or 0),
        "done": int(done or 0),
        "predictions": int(predictions or 0),
        "unfinished_batches": int(open_batches or 0),
    }


def test_gateway_sigkilled_mid_association_and_the_sender_resends(
    fault_stack: FaultStack, tmp_path: Path
) -> None:
    _register_pacs(fault_stack, "FAULTPACS")
    folder = tmp_path / "studies"
    # Full-size images, so the send is still going when the gateway is killed.
    sent = generate_exams(folder, exams=8, seed=41)
    sender = subprocess.Popen(
        _storescu(fault_stack, "FAULTPACS", folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(
        lambda: _dicom_counts(fault_stack)["images"] >= 6, timeout=120, what="instances to arrive"
    )
    kill_service(fault_stack.dir, "gateway")
    output, _ = sender.communicate(timeout=60)
    assert sender.returncode != 0, output  # the association broke off mid-send
    received = _dicom_counts(fault_stack)["images"]
    assert received < len(sent), "the kill came too late to break the send"

    start_service_again(fault_stack.dir, "gateway")
    again = subprocess.run(
        _storescu(fault_stack, "FAULTPACS", folder), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr

    wait_for(
        lambda: (
            (c := _dicom_counts(fault_stack))["done"] == len(sent) and c["unfinished_batches"] == 0
        ),
        timeout=240,
        what="every sent instance to be screened",
    )
    final = _dicom_counts(fault_stack)
    # 0 lost, 0 duplicated: one image and one prediction per sent instance.
    assert final == {
        "images": len(sent),
        "done": len(sent),
        "predictions": len(sent),
        "unfinished_batches": 0,
    }


def test_postgres_stopped_mid_association_gets_retry_statuses_and_keeps_nothing(
    fault_stack: FaultStack, tmp_path: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

    _register_pacs(fault_stack, "OUTAGEPACS")
    exam = generate_exams(tmp_path / "exam", exams=1, seed=43, options=SMALL_FAULT_IMAGES)
    store = ObjectStore(settings_from_environ(fault_stack.state.env))
    env = fault_stack.state.env
    scu = AE(ae_title="OUTAGEPACS")
    scu.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
    association = scu.associate(
        "127.0.0.1", int(env["SCREENING_DICOM_PORT"]), ae_title=env["SCREENING_DICOM_AE_TITLE"]
    )
    assert association.is_established
    try:
        first = association.send_c_store(str(exam[0].path))
        assert first.Status == 0x0000
        before = _dicom_counts(fault_stack)["images"]
        objects_before = sum(1 for _ in store.list_keys("tenants/"))

        stop_server(fault_stack.servers["postgres"])
        during = association.send_c_store(str(exam[1].path))
        assert during.Status == 0xA700  # out of resources: the sender retries later
        assert sum(1 for _ in store.list_keys("tenants/")) == objects_before

        fault_stack.restart("postgres")
        get_engine(fault_stack.database_url).dispose()
        wait_for(
            lambda: association.send_c_store(str(exam[1].path)).Status == 0x0000,
            timeout=60,
            what="the gateway to store again once Postgres is back",
        )
    finally:
        association.release()
    assert _dicom_counts(fault_stack)["images"] == before + 1  # the retried one, once

"""`make bench`: the pipeline's throughput against the model's own speed, in one run.

Everything is measured on this machine, with the same model and input size, in this order
(so no phase leaves work behind that a later one would count):

1. model_images_per_s: the bare forward pass on preloaded tensors, at the worker's batch
   size, in this process while the stack is idle: the limit the pipeline is compared with.
2. pipeline_images_per_s: the real stack (ingest, S3, Postgres, Redis, a Celery worker),
   from the first upload of a bulk batch to its last prediction row in Postgres.
3. naive_images_per_s: the same, with the worker restarted at batch size 1.
4. idle_latency_s / urgent_latency_s: one urgent four-view exam on an idle stack, then the
   same exam submitted behind a bulk batch of `--bulk` uploaded images and `--bulk-queued`
   (10,000) more queued behind them, once the worker has screened its first bulk chunk.
   Then recovery_s (the worker SIGKILLed mid-batch) and redis_recovery_s (Redis SIGKILLed
   and restarted): from the kill until screening goes on.
5. upload_mb_per_s / s3_put_mb_per_s: the same files through the ingest API, and straight
   into the object store, with the same client concurrency (worker stopped), alternated in
   three rounds (`upload_to_s3_put_rounds`: each round's ratio).
6. dicom_store_mb_per_s: the same files sent to the DICOM gateway by storescu (C-STORE, four
   associations at once, as a PACS sends), beside the HTTP upload of them (worker stopped);
   then dicom_idle_association_cores, the gateway's CPU per association left open and idle.

7. For the CPU accounting only: the same files read back from the object store, and decoded
   and preprocessed in this process.

8. Results at scale (bench/results_scale.py): a 100,000-image batch filled in SQL, 50
   pollers, an export, 200 idle long polls: results_p99_ms, status_p99_ms,
   export_rows_per_s, longpoll_idle_db_cpu_fraction (and the query plans beside --out).

Around phases 1, 2, 5 and 6 it records the CPU-seconds the whole machine spent, and each
stack process's share (bench/cpu.py): the CPU cost per image of each, and from them
`pipeline_to_model_ceiling`, the most the pipeline could reach on these cores if its own code
cost nothing (see _cpu_figures). The model runs with the worker's thread count
(`inference_cpu_threads`); on the CPU its speed with every thread is recorded beside it.

`--local` measures what can be measured without the servers (model, and the worker's
loader/batching pipeline over files held in memory: `local_pipeline_images_per_s`, and with
the heatmaps and the PNGs the worker renders, `local_worker_images_per_s`), and the cost of
preparing an image (bench/prepare.py): for machines where the stack's servers cannot be
installed, such as a lent GPU machine (bench/gpu_local.sh).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import case, func, select

from bench import results_scale
from bench.cpu import CpuMeter, CpuUsage, process_cpu_s
from bench.prepare import device_stage, host_stage, prepare_costs
from bench.report import write_and_print
from devstack.synth import SynthOptions, generate_exams
from services.worker.models import inference_cpu_threads
from services.worker.pipeline import BatchPolicy, Predictor, Prefetcher
from shared.config import Settings, settings_from_environ
from shared.imaging.decode import StoredPixels
from shared.imaging.preprocess import InputGeometry, Preprocess, heatmap_on_image
from shared.imaging.renders import PREVIEW_SHRINK, grey_png, heatmap_pngs
from shared.ml.model import ScreeningNet, ScreeningNetConfig

MIB = 1024 * 1024
# Phases measured over the pipeline's images (the model's over its own count).
PER_IMAGE_PHASES = ("pipeline", "upload", "dicom_store", "s3_put", "s3_get", "prepare")
# A PACS sends a study over a few associations at once.
DICOM_ASSOCIATIONS = 4
# What any pipeline must do per image; their CPU bounds its speed (see _cpu_figures).
ESSENTIAL_PHASES = ("model", "s3_put", "s3_get", "prepare")
FILES_PER_REQUEST = 8
# Upload and straight put, alternated (see _upload_and_put_rounds).
UPLOAD_ROUNDS = 3
CLIENT_THREADS = 2
MEDIA_TYPE = "application/dicom"
# Small images hold the queued bulk images' objects (never screened while measured).
QUEUED_SAMPLE = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU: {platform.processor()} ({os.cpu_count()} cores)"


def model_images_per_s(
    model: ScreeningNet, device: torch.device, batch_size: int, seconds: float
) -> tuple[float, int]:
    """The forward pass alone, on tensors already prepared, as the worker runs it."""
    predictor = Predictor(model, device, compile_model=False)
    config = model.config
    rng = np.random.default_rng(0)
    inputs = [
        rng.standard_normal((config.input_height, config.input_width)).astype(np.float32)
        for _ in range(batch_size)
    ]
    for _ in range(2):
        predictor(inputs)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 3 * batch_size:
        predictor(inputs)
        done += batch_size
    return done / (time.perf_counter() - started), done


def local_pipeline_images_per_s(
    paths: Sequence[Path],
    model: ScreeningNet,
    device: torch.device,
    policy: BatchPolicy,
    threads: int,
    *,
    renders: bool = False,
) -> float:
    """The worker's loaders and dynamic batches over files held in memory (no servers): the
    host's stage in the loader threads, the device's stage (with the input statistics and
    the previews) and the forward pass in this thread, as `ScreeningRun` runs them. With
    `renders`, also the heatmaps and the PNGs the worker writes per image (preview, heatmap,
    overlay), encoded by four writer threads as the worker's, and not stored."""
    config = model.config
    preprocess = Preprocess(config.input_height, config.input_width)
    predictor = Predictor(model, device, compile_model=False)
    files = {path: path.read_bytes() for path in paths}
    writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bench-writer")

    def prepare(path: Path) -> tuple[StoredPixels, InputGeometry]:
        return host_stage([files[path]], preprocess)[0]

    def forward(prepared: list[tuple[StoredPixels, InputGeometry]]) -> None:
        batch = preprocess.make_inputs(
            prepared, device, statistics=True, preview_shrink=PREVIEW_SHRINK
        )
        if not renders:
            predictor(batch.inputs)
            return
        _, maps = predictor.with_heatmaps(batch.inputs)

        def render(index: int) -> int:
            grey, overlay = heatmap_pngs(heatmap_on_image(maps[index], prepared[index][1]))
            return len(grey_png(batch.previews[index])) + len(grey) + len(overlay)

        list(writers.map(render, range(len(prepared))))

    forward([prepare(paths[0])])  # warm-up
    loaders: Prefetcher[Path, tuple[StoredPixels, InputGeometry]] = Prefetcher(
        prepare, threads=threads
    )
    started = time.perf_counter()
    loaders.submit(paths)
    while loaders.pending:
        forward([p for _, p in loaders.next_batch(policy) if isinstance(p, tuple)])
    elapsed = time.perf_counter() - started
    loaders.close()
    writers.shutdown()
    return len(paths) / elapsed


def _prepare_file(job: tuple[Path, int, int]) -> tuple[StoredPixels, InputGeometry]:
    path, height, width = job
    return host_stage([path.read_bytes()], Preprocess(height, width))[0]


def process_pool_pipeline_images_per_s(
    paths: Sequence[Path],
    model: ScreeningNet,
    device: torch.device,
    batch_size: int,
    processes: int,
) -> float:
    """An experiment for GPU workers: the host's stage in processes (no shared GIL; the
    stored values are pickled back), the device's stage and the forward pass in this one."""
    import multiprocessing

    config = model.config
    preprocess = Preprocess(config.input_height, config.input_width)
    predictor = Predictor(model, device, compile_model=False)
    jobs = [(p, config.input_height, config.input_width) for p in paths]

    def forward(prepared: list[tuple[StoredPixels, InputGeometry]]) -> None:
        if prepared:
            batch = preprocess.make_inputs(
                prepared, device, statistics=True, preview_shrink=PREVIEW_SHRINK
            )
            predictor(batch.inputs)

    forward([_prepare_file(jobs[0])])
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        pool.map(_prepare_file, jobs[:processes])  # start-up and imports, not timed
        started = time.perf_counter()
        batch: list[tuple[StoredPixels, InputGeometry]] = []
        for prepared in pool.imap_unordered(_prepare_file, jobs, chunksize=2):
            batch.append(prepared)
            if len(batch) == batch_size:
                forward(batch)
                batch = []
        forward(batch)
        return len(paths) / (time.perf_counter() - started)


def _synth(out: Path, images: int, seed: int, options: SynthOptions) -> list[Path]:
    exams = max(1, images // 4)
    return [i.path for i in generate_exams(out, exams=exams, seed=seed, options=options)]


def _chunks(paths: Sequence[Path], size: int) -> list[list[Path]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def _upload_all(client: Any, batch_id: str, paths: Sequence[Path]) -> None:
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for result in pool.map(
            lambda chunk: client.upload(batch_id, chunk), _chunks(paths, FILES_PER_REQUEST)
        ):
            if result["rejected"]:
                raise RuntimeError(f"benchmark images were rejected: {result['rejected']}")


def _last_prediction_at(
    settings: Settings, batch_id: str, expected: int, timeout: float
) -> datetime:
    """Wait until every image of the batch has its prediction row; the newest row's time."""
    from sqlalchemy import func, select

    from shared.db.base import session_scope
    from shared.db.models import Image, Prediction

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings.database_url) as session:
            count, newest = session.execute(
                select(func.count(Prediction.id), func.max(Prediction.created_at))
                .join(Image, Image.id == Prediction.image_id)
                .where(Image.batch_id == batch_id)
            ).one()
        if count >= expected and newest is not None:
            return newest
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} of {expected} predictions after {timeout:.0f}s")
        time.sleep(0.05)


def _screened_in(
    client: Any, settings: Settings, paths: Sequence[Path], *, priority: str = "normal", name: str
) -> float:
    """Seconds from the first upload to the last prediction row of a new batch of `paths`."""
    started = datetime.now().astimezone()
    batch = client.create_batch(name, priority=priority)
    _upload_all(client, batch["id"], paths)
    client.close_batch(batch["id"])
    finished = _last_prediction_at(settings, batch["id"], len(paths), timeout=3600)
    return (finished - started).total_seconds()


def _queue_behind(settings: Settings, batch_id: str, count: int, sample: Path) -> None:
    """`count` more bulk images queued in `batch_id` behind those uploaded: rows in the shape
    the ingest service writes (four views an exam, each its own object, holding `sample`'s
    bytes), sent to the bulk lane as ingest sends them. Written straight into Postgres and
    the store: 10,000 real uploads of full-size files would take the benchmark's whole
    budget, and the urgent exam only has to find them queued, never screened."""
    from sqlalchemy import insert

    from shared.db.base import new_id, session_scope
    from shared.db.models import Batch, Image, Laterality, Study, View
    from shared.lifecycle import mark_enqueued
    from shared.queue import enqueue_screening, producer
    from shared.storage import Keys, ObjectStore

    data = sample.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    batch = uuid.UUID(batch_id)
    with session_scope(settings.database_url) as session:
        tenant = session.get_one(Batch, batch).tenant_id
        studies = [new_id() for _ in range((count + 3) // 4)]
        session.execute(
            insert(Study),
            [
                {
                    "id": study,
                    "tenant_id": tenant,
                    "batch_id": batch,
                    "patient_key": study.hex,
                    "study_key": f"2.25.{study.int}",
                }
                for study in studies
            ],
        )
        ids = [new_id() for _ in range(count)]
        keys = [Keys.image(tenant, batch, image_id) for image_id in ids]
        store = ObjectStore(settings)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: store.put_bytes(key, data, content_type=MEDIA_TYPE), keys))
        session.execute(
            insert(Image),
            [
                {
                    "id": image_id,
                    "tenant_id": tenant,
                    "batch_id": batch,
                    "study_id": studies[n // 4],
                    "filename": f"queued-{n}.dcm",
                    "object_key": key,
                    "sha256": digest,
                    "size_bytes": len(data),
                    "media_type": MEDIA_TYPE,
                    "laterality": (Laterality.LEFT, Laterality.RIGHT)[n % 4 // 2],
                    "view": (View.CC, View.MLO)[n % 2],
                }
                for n, (image_id, key) in enumerate(zip(ids, keys, strict=True))
            ],
        )
    enqueue_screening(producer(settings), ids, chunk_size=settings.inference_chunk_size)
    with session_scope(settings.database_url) as session:
        mark_enqueued(session=session, image_ids=ids)


def _wait_screened(client: Any, batch_id: str, images: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while client.batch(batch_id)["counts"]["done"] < images:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {images} images of batch {batch_id} screened")
        time.sleep(0.1)


def _running_attempts(settings: Settings) -> dict[uuid.UUID, int]:
    """Every running image (any batch) with how many times it has been claimed."""
    from shared.db.base import session_scope
    from shared.db.models import Image, ImageStatus

    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Image.id, Image.attempts).where(Image.status == ImageStatus.RUNNING)
        ).all()
    return {image_id: attempts for image_id, attempts in rows}


def _recovery_s(stack_dir: Path, client: Any, settings: Settings, paths: Sequence[Path]) -> float:
    """Seconds from SIGKILLing the worker mid-batch to the moment every image it held is being
    screened again (claimed once more, by the worker started again at once)."""
    from devstack.stack import kill_service, start_service_again
    from shared.db.base import session_scope
    from shared.db.models import Image

    batch = client.create_batch("recovery", priority="urgent")  # ahead of any bulk work
    _upload_all(client, batch["id"], paths)
    client.close_batch(batch["id"])
    deadline = time.monotonic() + 600
    while not _running_attempts(settings):
        if time.monotonic() > deadline:
            raise TimeoutError("no image was being screened to kill the worker under")
        time.sleep(0.01)
    killed = time.monotonic()
    kill_service(stack_dir, "worker", signal.SIGKILL)
    held = _running_attempts(settings)  # no worker now: exactly what the dead one held
    start_service_again(stack_dir, "worker")
    while True:
        with session_scope(settings.database_url) as session:
            claimed_again = session.scalar(
                select(func.count()).where(
                    Image.id.in_(list(held)),
                    Image.attempts > case(held, value=Image.id, else_=0),
                )
            )
        if claimed_again == len(held):
            return time.monotonic() - killed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{claimed_again} of {len(held)} held images claimed again")
        time.sleep(0.05)


def _redis_recovery_s(stack_dir: Path, settings: Settings) -> float:
    """Seconds from a Redis SIGKILL mid-batch (what it had not yet appended to its file is
    lost; the worker's connection and the tasks it was running go with it) and its restart
    on the same port and data, to the moment screening goes on: every image claimed when it
    died is done or claimed again, and one of those queued then has been claimed (where the
    worker held them all, as in the smoke test's small batches, the first alone)."""
    from devstack.servers import restart_server, stop_pid
    from devstack.stack import StackState
    from shared.db.base import session_scope
    from shared.db.models import Image, ImageStatus

    state_path = stack_dir.resolve() / "state.json"
    state = StackState.load(state_path)
    assert state is not None, "no stack running"
    (redis,) = [server for server in state.servers if server.name == "redis"]
    deadline = time.monotonic() + 600
    while not (held := _running_attempts(settings)):
        if time.monotonic() > deadline:
            raise TimeoutError("no image was being screened to restart Redis under")
        time.sleep(0.01)
    with session_scope(settings.database_url) as session:
        waiting = session.scalars(
            select(Image.id).where(Image.status == ImageStatus.QUEUED).limit(1000)
        ).all()
    killed = time.monotonic()
    stop_pid(redis.pid, first=signal.SIGKILL)
    state.servers[state.servers.index(redis)] = restart_server(redis)
    state.save(state_path)
    while True:
        with session_scope(settings.database_url) as session:
            held_on = session.scalar(
                select(func.count()).where(
                    Image.id.in_(list(held)),
                    Image.status != ImageStatus.DONE,
                    Image.attempts <= case(held, value=Image.id, else_=0),
                )
            )
            claimed_since = session.scalar(
                select(func.count()).where(
                    Image.id.in_(list(waiting)), Image.status != ImageStatus.QUEUED
                )
            )
        if held_on == 0 and (claimed_since or not waiting):
            return time.monotonic() - killed
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{held_on} of {len(held)} held images neither done nor claimed again, "
                f"{claimed_since} of {len(waiting)} queued ones claimed"
            )
        time.sleep(0.05)


def _upload_and_put_rounds(
    client: Any,
    settings: Settings,
    stack_dir: Path,
    cpu: dict[str, CpuUsage],
    paths: Sequence[Path],
    results: dict[str, Any],
) -> tuple[float, float]:
    """The files through the ingest API, then straight into the object store, alternated
    `UPLOAD_ROUNDS` times (each upload into a batch of its own): seconds of each in all.

    One round of each is a few seconds, and these machines' speed drifts within minutes:
    a single pair gave ratios from 0.62 to 0.84 for the same code. Alternated rounds share
    the drift; the figure is the ratio of the totals, each round's beside it."""
    upload_s = put_s = 0.0
    rounds = []
    for round_number in range(1, UPLOAD_ROUNDS + 1):
        batch = client.create_batch(f"upload speed {round_number}")
        with _measured(stack_dir, cpu, "upload"):
            started = time.perf_counter()
            _upload_all(client, batch["id"], paths)
            upload = time.perf_counter() - started
        with _measured(stack_dir, cpu, "s3_put"):
            put = _s3_put_s(settings, paths)
        upload_s, put_s = upload_s + upload, put_s + put
        rounds.append(round(put / upload, 3))
    results["upload_to_s3_put_rounds"] = rounds
    return upload_s, put_s


def _s3_put_s(settings: Settings, paths: Sequence[Path]) -> float:
    """Seconds to put `paths` straight into the object store, with the upload's concurrency."""
    from shared.storage import ObjectStore

    store = ObjectStore(settings)

    def put(chunk: list[Path]) -> None:
        for path in chunk:
            with open(path, "rb") as handle:
                store.put_stream(
                    f"bench/{path.name}", handle, content_type="application/dicom", limit=1 << 31
                )

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(put, _chunks(paths, FILES_PER_REQUEST)))
    return time.perf_counter() - started


def _s3_get_all(settings: Settings, paths: Sequence[Path]) -> None:
    """Read back what _s3_put_s stored, as the worker's loaders read their images."""
    from shared.storage import ObjectStore

    store = ObjectStore(settings)
    with ThreadPoolExecutor(settings.worker_loader_threads) as pool:
        list(pool.map(lambda path: store.get_bytes(f"bench/{path.name}"), paths))


def _prepare_all(paths: Sequence[Path], config: ScreeningNetConfig, threads: int) -> None:
    """Prepare every file as the worker does after the read: the host's stage on loader
    threads, the device's (on this machine's CPU) in batches."""
    preprocess = Preprocess(config.input_height, config.input_width)
    data = [path.read_bytes() for path in paths]
    with ThreadPoolExecutor(threads) as pool:
        prepared = [
            p for many in pool.map(lambda raw: host_stage([raw], preprocess), data) for p in many
        ]
    device_stage(prepared, preprocess, torch.device("cpu"), Settings().inference_batch_size)


def _dicom_store_all(env: dict[str, str], settings: Settings, paths: Sequence[Path]) -> None:
    """Send `paths` to the stack's DICOM gateway with dcmtk's storescu, as a PACS does: a
    registered node, `DICOM_ASSOCIATIONS` associations side by side, each file in its own
    transfer syntax."""
    from shared.db.base import session_scope
    from shared.db.models import Tenant
    from shared.dicom_nodes import add_node, node_for

    if shutil.which("storescu") is None:
        raise RuntimeError("storescu is missing: `make dicom-tools` installs Debian's dcmtk")
    with session_scope(settings.database_url) as session:
        if node_for(session=session, ae_title="BENCHPACS", host="127.0.0.1") is None:
            tenant = session.scalars(select(Tenant).where(Tenant.name == "demo")).one()
            add_node(session=session, tenant_id=tenant.id, ae_title="BENCHPACS")
    senders = [
        subprocess.Popen(
            [
                *("storescu", "-aet", "BENCHPACS", "-aec", env["SCREENING_DICOM_AE_TITLE"]),
                *(
                    "127.0.0.1",
                    env["SCREENING_DICOM_PORT"],
                    *map(str, paths[i::DICOM_ASSOCIATIONS]),
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(DICOM_ASSOCIATIONS)
        if paths[i::DICOM_ASSOCIATIONS]
    ]
    for sender in senders:
        output, _ = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {output[-2000:]}")


def _idle_association_cores(env: dict[str, str], stack_dir: Path, seconds: float = 5) -> float:
    """The gateway's CPU (in cores) per association that is open and idle, as a PACS that
    keeps its associations open leaves them (the BENCHPACS node _dicom_store_all added)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    requestor = AE(ae_title="BENCHPACS")
    requestor.add_requested_context(Verification)
    associations = [
        requestor.associate(
            "127.0.0.1",
            int(env["SCREENING_DICOM_PORT"]),
            ae_title=env["SCREENING_DICOM_AE_TITLE"],
        )
        for _ in range(DICOM_ASSOCIATIONS)
    ]
    try:
        if not all(a.is_established for a in associations):
            raise RuntimeError("the gateway refused the benchmark's idle associations")
        gateway = {"gateway": _stack_processes(stack_dir)["gateway"]}
        before = process_cpu_s(gateway, alone={})["gateway"]
        time.sleep(seconds)
        spent = process_cpu_s(gateway, alone={})["gateway"] - before
    finally:
        for association in associations:
            association.release()
    return spent / seconds / len(associations)


def _stack_processes(stack_dir: Path) -> dict[str, int]:
    """The stack's processes by name (read afresh: a restarted worker has a new pid)."""
    from devstack.stack import StackState

    state = StackState.load(stack_dir.resolve() / "state.json")
    assert state is not None, "no stack running"
    return {**state.services, **{s.name: s.pid for s in state.servers}}


@contextmanager
def _measured(stack_dir: Path, cpu: dict[str, CpuUsage], phase: str) -> Iterator[None]:
    """The machine's and each process's CPU over one phase, into `cpu[phase]` (added to what
    is there: a phase run in rounds)."""
    meter = CpuMeter(_stack_processes(stack_dir), alone={"bench": os.getpid()})
    start = meter.mark()
    yield
    usage = meter.since(start)
    cpu[phase] = cpu[phase] + usage if phase in cpu else usage


def run_stack(args: argparse.Namespace, data: Path, options: SynthOptions) -> dict[str, Any]:
    from devstack.stack import down, kill_service, start_service_again, up
    from mammoscreen_client import Client

    pipeline_paths = _synth(data / "pipeline", args.images, 101, options)
    urgent_paths = _synth(data / "urgent", 4, 202, options)
    bulk_paths = _synth(data / "bulk", args.bulk, 303, options)
    gateway_warm_up_paths = _synth(data / "gateway-warm-up", 8, 404, options)
    queued_sample = _synth(data / "queued", 1, 505, QUEUED_SAMPLE)[0]
    stack_dir = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    environ = {**os.environ, "SCREENING_INFERENCE_BATCH_SIZE": str(args.batch_size)}
    state = up(stack_dir, environ=environ)
    cpu: dict[str, CpuUsage] = {}
    try:
        settings = settings_from_environ(state.service_env)
        results: dict[str, Any] = {}
        with Client.from_env(state.env, timeout=600) as client:
            _screened_in(client, settings, urgent_paths, name="warm-up")  # loads the model

            from shared.db.base import session_scope
            from shared.ml.checkpoint import load_checkpoint
            from shared.ml.registry import ensure_active_model, shipped_model_dir
            from shared.storage import ObjectStore

            with session_scope(settings.database_url) as session:
                version = ensure_active_model(
                    session=session,
                    store=ObjectStore(settings),
                    shipped=shipped_model_dir(settings),
                )
                checkpoint = ObjectStore(settings).get_bytes(version.checkpoint_key)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = load_checkpoint(checkpoint, device=device)
            model_config = model.config
            all_threads = torch.get_num_threads()
            if device.type == "cpu":
                torch.set_num_threads(inference_cpu_threads(settings))  # as the worker runs it
            with _measured(stack_dir, cpu, "model"):
                results["model_images_per_s"], model_images = model_images_per_s(
                    model, device, args.batch_size, args.model_seconds
                )
            results["torch_threads"] = torch.get_num_threads()
            if device.type == "cpu" and all_threads != results["torch_threads"]:
                # For the record: the same forward pass with torch's own default, every core.
                torch.set_num_threads(all_threads)
                results["model_images_per_s_all_threads"] = model_images_per_s(
                    model, device, args.batch_size, args.model_seconds
                )[0]
                torch.set_num_threads(results["torch_threads"])
            results["device"] = device_name(device)
            del model

            with _measured(stack_dir, cpu, "pipeline"):
                seconds = _screened_in(client, settings, pipeline_paths, name="pipeline")
            results["pipeline_images_per_s"] = len(pipeline_paths) / seconds

            kill_service(stack_dir, "worker", signal.SIGTERM)
            start_service_again(
                stack_dir, "worker", overrides={"SCREENING_INFERENCE_BATCH_SIZE": "1"}
            )
            _screened_in(client, settings, urgent_paths, name="warm-up naive")
            seconds = _screened_in(client, settings, pipeline_paths, name="naive")
            results["naive_images_per_s"] = len(pipeline_paths) / seconds
            kill_service(stack_dir, "worker", signal.SIGTERM)
            start_service_again(stack_dir, "worker")
            _screened_in(client, settings, urgent_paths, name="warm-up again")

            results["idle_latency_s"] = _screened_in(
                client, settings, urgent_paths, priority="urgent", name="urgent, idle"
            )
            # The bulk work is queued while the worker is stopped (so it is all ahead of
            # the urgent exam, real-size images first), then the worker starts and, once it
            # has screened a first chunk (warm again), the urgent exam comes.
            kill_service(stack_dir, "worker", signal.SIGTERM)
            bulk = client.create_batch("bulk")
            _upload_all(client, bulk["id"], bulk_paths)
            _queue_behind(settings, bulk["id"], args.bulk_queued, queued_sample)
            client.close_batch(bulk["id"])
            start_service_again(stack_dir, "worker")
            _wait_screened(client, bulk["id"], settings.inference_chunk_size)
            results["urgent_latency_s"] = _screened_in(
                client, settings, urgent_paths, priority="urgent", name="urgent, behind bulk"
            )
            results["urgent_queued_behind"] = client.batch(bulk["id"])["counts"]["queued"]
            results["recovery_s"] = _recovery_s(stack_dir, client, settings, bulk_paths)
            results["redis_recovery_s"] = _redis_recovery_s(stack_dir, settings)

            kill_service(stack_dir, "worker", signal.SIGTERM)
            # The sweeper (in the trainer's process) is still rendering the DICOM results of
            # the exams screened above (measured: 2.8 of the upload phase's 10.4 CPU-seconds,
            # 4.7 of the C-STORE phase's, none of the straight put's, which comes later): it
            # stops too, so the upload, C-STORE and put phases each measure their path alone.
            kill_service(stack_dir, "trainer", signal.SIGTERM)
            upload_s, put_s = _upload_and_put_rounds(
                client, settings, stack_dir, cpu, pipeline_paths, results
            )
            # Earlier phases warmed the ingest service; warm the gateway as much (its imports,
            # its connection pools) so both figures are steady-state ones.
            _dicom_store_all(state.env, settings, gateway_warm_up_paths)
            with _measured(stack_dir, cpu, "dicom_store"):
                started = time.perf_counter()
                _dicom_store_all(state.env, settings, pipeline_paths)
                dicom_s = time.perf_counter() - started
            results["dicom_idle_association_cores"] = _idle_association_cores(state.env, stack_dir)
        megabytes = sum(p.stat().st_size for p in pipeline_paths) / MIB
        results["upload_mb_per_s"] = UPLOAD_ROUNDS * megabytes / upload_s
        results["s3_put_mb_per_s"] = UPLOAD_ROUNDS * megabytes / put_s
        results["dicom_store_mb_per_s"] = megabytes / dicom_s
        results["dicom_store_to_upload"] = (
            results["dicom_store_mb_per_s"] / results["upload_mb_per_s"]
        )
        with _measured(stack_dir, cpu, "s3_get"):
            _s3_get_all(settings, pipeline_paths)
        with _measured(stack_dir, cpu, "prepare"):
            _prepare_all(pipeline_paths, model_config, settings.worker_loader_threads)
        results.update(
            prepare_costs(
                data / "prepare",
                options,
                Preprocess(model_config.input_height, model_config.input_width),
                torch.device("cpu"),
            )
        )
        results["upload_to_s3_put"] = results["upload_mb_per_s"] / results["s3_put_mb_per_s"]
        results["pipeline_to_model"] = (
            results["pipeline_images_per_s"] / results["model_images_per_s"]
        )
        results["batched_to_naive"] = (
            results["pipeline_images_per_s"] / results["naive_images_per_s"]
        )
        results["urgent_to_idle"] = results["urgent_latency_s"] / results["idle_latency_s"]
        images = {
            phase: len(pipeline_paths) * (UPLOAD_ROUNDS if phase in ("upload", "s3_put") else 1)
            for phase in PER_IMAGE_PHASES
        }
        results.update(_cpu_figures(cpu, model_images, images, results))
        results["images"] = len(pipeline_paths)
        results["bulk_images"] = len(bulk_paths)
        results["bulk_images_queued"] = args.bulk_queued
        results["image_size"] = [options.height, options.width]
        if args.scale_images:
            kill_service(stack_dir, "worker", signal.SIGTERM)  # nothing left for it to do
            results.update(
                results_scale.measure(
                    settings,
                    lambda: _stack_processes(stack_dir),
                    results_scale.ScaleOptions(
                        images=args.scale_images,
                        pollers=args.scale_pollers,
                        seconds=args.scale_seconds,
                        warmup_s=args.scale_warmup_s,
                        long_pollers=args.scale_long_pollers,
                        long_poll_seconds=args.scale_long_poll_seconds,
                    ),
                    args.out.with_name("results_query_plans.txt"),
                )
            )
        return results
    finally:
        down(stack_dir)


def _cpu_figures(
    cpu: dict[str, CpuUsage],
    model_images: int,
    images: Mapping[str, int],
    results: dict[str, Any],
) -> dict[str, Any]:
    """CPU cost per image of each phase, and the best pipeline_to_model these cores allow.

    Whatever else it does, the pipeline must put each image's bytes into the object store,
    read them back, decode and preprocess them, and run the model on them: four phases this
    benchmark measures alone. On cores that all four share, even a pipeline whose own code
    (API, queue, database, heatmaps) cost nothing and that kept every core busy all the time
    could not beat cores / (their CPU per image summed), nor the model's own speed.
    """
    cores = os.cpu_count() or 1
    per_image = {
        "model": cpu["model"].ms_per_image(model_images),
        **{phase: cpu[phase].ms_per_image(images[phase]) for phase in PER_IMAGE_PHASES},
    }
    essential_ms = sum(per_image[p] for p in ESSENTIAL_PHASES)
    best_pipeline = min(1000 * cores / essential_ms, results["model_images_per_s"])
    return {
        "cpu_ms_per_image": {phase: round(ms, 2) for phase, ms in per_image.items()},
        "cpu_by_phase": {phase: usage.to_json() for phase, usage in cpu.items()},
        "pipeline_to_model_ceiling": best_pipeline / results["model_images_per_s"],
    }


def run_local(args: argparse.Namespace, data: Path, options: SynthOptions) -> dict[str, Any]:
    settings = Settings()
    paths = _synth(data / "pipeline", args.images, 101, options) * args.repeat
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ScreeningNet(ScreeningNetConfig()).to(device).eval()
    if device.type == "cpu":
        torch.set_num_threads(inference_cpu_threads(settings))  # as the worker runs it
    policy = BatchPolicy(args.batch_size, settings.inference_max_wait_s)
    threads = args.loader_threads or settings.worker_loader_threads
    results: dict[str, Any] = {
        "mode": "local (no servers: the worker's loaders and batches over files held in memory)",
        "device": device_name(device),
        "model_images_per_s": model_images_per_s(
            model, device, args.batch_size, args.model_seconds
        )[0],
        "local_pipeline_images_per_s": local_pipeline_images_per_s(
            paths, model, device, policy, threads
        ),
        "naive_local_images_per_s": local_pipeline_images_per_s(
            paths, model, device, BatchPolicy(1, 0.0), threads
        ),
        "local_worker_images_per_s": local_pipeline_images_per_s(
            paths, model, device, policy, threads, renders=True
        ),
        "loader_threads": threads,
        "images": len(paths),
        "image_size": [options.height, options.width],
    }
    if args.loader_processes:
        results["loader_processes"] = args.loader_processes
        results["process_pool_pipeline_images_per_s"] = process_pool_pipeline_images_per_s(
            paths, model, device, args.batch_size, args.loader_processes
        )
    results.update(prepare_costs(data / "prepare", options, Preprocess(512, 416), device))
    results["local_pipeline_to_model"] = (
        results["local_pipeline_images_per_s"] / results["model_images_per_s"]
    )
    results["local_worker_to_model"] = (
        results["local_worker_images_per_s"] / results["model_images_per_s"]
    )
    results["batched_to_naive"] = (
        results["local_pipeline_images_per_s"] / results["naive_local_images_per_s"]
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="bulk batch for the pipeline")
    parser.add_argument("--bulk", type=int, default=512, help="bulk batch ahead of the urgent exam")
    parser.add_argument(
        "--bulk-queued",
        type=int,
        default=10_000,
        help="further bulk images queued behind it (rows and objects written directly)",
    )
    parser.add_argument("--batch-size", type=int, default=Settings().inference_batch_size)
    parser.add_argument("--loader-threads", type=int, default=0, help="--local only; 0: setting")
    parser.add_argument(
        "--loader-processes", type=int, default=0, help="--local only: also try process loaders"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="--local only: pass over the images this often"
    )
    parser.add_argument("--model-seconds", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=SynthOptions().height)
    parser.add_argument("--width", type=int, default=SynthOptions().width)
    parser.add_argument("--local", action="store_true", help="no servers (see the docstring)")
    scale = results_scale.ScaleOptions()
    parser.add_argument(
        "--scale-images", type=int, default=scale.images, help="results at scale; 0: skip it"
    )
    parser.add_argument("--scale-pollers", type=int, default=scale.pollers)
    parser.add_argument("--scale-seconds", type=float, default=scale.seconds)
    parser.add_argument("--scale-warmup-s", type=float, default=scale.warmup_s)
    parser.add_argument("--scale-long-pollers", type=int, default=scale.long_pollers)
    parser.add_argument("--scale-long-poll-seconds", type=float, default=scale.long_poll_seconds)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    options = SynthOptions(height=args.height, width=args.width)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        run: Callable[..., dict[str, Any]] = run_local if args.local else run_stack
        results = run(args, Path(data), options)
    results.update(
        {
            "torch_version": torch.__version__,
            "batch_size": args.batch_size,
            "cpu_threads": torch.get_num_threads(),
            "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    )
    write_and_print(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dynamic batching, prefetching and the urgent lane of the inference worker."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from services.worker.inference import WorkerContext, run_screening
from services.worker.models import ModelCache, inference_cpu_threads
from services.worker.pipeline import BatchPolicy, Prefetcher
from shared.config import Settings
from shared.db.models import Batch, BatchPriority, Image, ImageStatus
from shared.storage import ObjectStore
from tests.factories import make_batch, make_stored_image, make_tenant


def test_batches_fill_up_to_the_maximum_when_items_are_ready() -> None:
    loaders: Prefetcher[int, np.ndarray] = Prefetcher(lambda i: np.full((2, 2), i), threads=2)
    loaders.submit(range(10))
    sizes = []
    while loaders.pending:
        batch = loaders.next_batch(BatchPolicy(max_batch=4, max_wait_s=5.0))
        sizes.append(len(batch))
    loaders.close()
    assert sizes == [4, 4, 2]


def test_a_batch_does_not_wait_longer_than_the_maximum_wait() -> None:
    release = threading.Event()

    def prepare(i: int) -> np.ndarray:
        if i > 0:
            release.wait(10)  # the others are slow
        return np.zeros((2, 2))

    loaders: Prefetcher[int, np.ndarray] = Prefetcher(prepare, threads=4)
    loaders.submit(range(4))
    started = time.monotonic()
    first = loaders.next_batch(BatchPolicy(max_batch=4, max_wait_s=0.2))
    waited = time.monotonic() - started
    release.set()
    rest = loaders.next_batch(BatchPolicy(max_batch=4, max_wait_s=5.0))
    loaders.close()
    assert [item for item, _ in first] == [0]  # went alone instead of waiting for the rest
    assert waited < 5.0
    assert sorted(item for item, _ in rest) == [1, 2, 3]


def test_loader_errors_come_back_as_outcomes_not_crashes() -> None:
    def prepare(i: int) -> np.ndarray:
        if i == 1:
            raise ValueError("bad pixels")
        return np.zeros((2, 2))

    loaders: Prefetcher[int, np.ndarray] = Prefetcher(prepare, threads=2)
    loaders.submit([0, 1])
    outcomes = dict(loaders.next_batch(BatchPolicy(max_batch=2, max_wait_s=5.0)))
    loaders.close()
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[0], np.ndarray)


@pytest.fixture
def small_batches(settings: Settings) -> Settings:
    return settings.model_copy(update={"inference_batch_size": 4, "worker_loader_threads": 2})


def _stored(session: Session, store: ObjectStore, batch: Batch, data: bytes, n: int) -> list[Image]:
    return [make_stored_image(session, store, batch, data) for _ in range(n)]


def test_urgent_images_queued_behind_bulk_work_are_screened_first(
    small_batches: Settings, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, _ = make_tenant(session)
    data = exam[0].path.read_bytes()
    bulk = _stored(session, store, make_batch(session, tenant, name="bulk"), data, 40)
    urgent_batch = make_batch(session, tenant, name="urgent", priority=BatchPriority.URGENT)
    urgent = _stored(session, store, urgent_batch, data, 4)
    ctx = WorkerContext(small_batches, store, ModelCache(small_batches, store))

    # The first bulk task runs; everything else is still in the queue behind it.
    outcome = run_screening([i.id for i in bulk[:8]], ctx)

    assert outcome == {"done": 44, "failed": 0}  # it went on to claim the queued rest
    session.expire_all()
    finished = {i.id: i.finished_at for i in session.scalars(select(Image))}
    assert all(finished.values())
    last_urgent = max(finished[i.id] for i in urgent)  # type: ignore[type-var]
    later_bulk = [finished[i.id] for i in bulk[8:]]
    # Urgent images were claimed ahead of the 32 bulk images queued before them.
    assert sum(t > last_urgent for t in later_bulk) >= 28  # type: ignore[operator]


def test_a_task_screens_only_its_own_images_when_claiming_is_off(
    settings: Settings, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    own_only = settings.model_copy(update={"worker_claim_queued": False})
    tenant, _ = make_tenant(session)
    images = _stored(session, store, make_batch(session, tenant), exam[0].path.read_bytes(), 6)
    ctx = WorkerContext(own_only, store, ModelCache(own_only, store))
    assert run_screening([i.id for i in images[:2]], ctx) == {"done": 2, "failed": 0}
    session.expire_all()
    statuses = [session.get(Image, i.id).status for i in images]  # type: ignore[union-attr]
    assert statuses == [ImageStatus.DONE] * 2 + [ImageStatus.QUEUED] * 4


def test_urgent_items_jump_the_loaders_queue() -> None:
    gate = threading.Event()

    def prepare(i: int) -> np.ndarray:
        gate.wait(10)  # hold the loader until everything is submitted
        return np.zeros((2, 2))

    loaders: Prefetcher[int, np.ndarray] = Prefetcher(prepare, threads=1)
    loaders.submit(range(6))
    loaders.submit([99], urgent=True)
    gate.set()
    order = []
    while loaders.pending:
        order += [item for item, _ in loaders.next_batch(BatchPolicy(max_batch=1, max_wait_s=0))]
    loaders.close()
    # Item 0 was already being prepared; the urgent one is prepared next, ahead of 1-5, and
    # handed out as soon as it is ready (it may even overtake 0 in the ready queue).
    assert order.index(99) <= 1
    assert [i for i in order if i != 99] == [0, 1, 2, 3, 4, 5]


def test_an_urgent_batch_holds_no_bulk_images_even_when_they_are_ready() -> None:
    loaders: Prefetcher[int, np.ndarray] = Prefetcher(lambda i: np.zeros((2, 2)), threads=2)
    loaders.submit(range(8))
    while loaders.ready < 8:  # every bulk image prepared and waiting
        time.sleep(0.01)
    loaders.submit([100, 101], urgent=True)
    first = loaders.next_batch(BatchPolicy(max_batch=8, max_wait_s=1.0))
    second = loaders.next_batch(BatchPolicy(max_batch=8, max_wait_s=1.0))
    loaders.close()
    assert sorted(item for item, _ in first) == [100, 101]
    assert sorted(item for item, _ in second) == list(range(8))


def test_the_next_batch_waits_for_urgent_images_still_being_prepared() -> None:
    urgent_may_finish = threading.Event()

    def prepare(i: int) -> np.ndarray:
        if i >= 100:
            urgent_may_finish.wait(10)
        return np.zeros((2, 2))

    loaders: Prefetcher[int, np.ndarray] = Prefetcher(prepare, threads=2)
    loaders.submit(range(4))
    while loaders.ready < 4:
        time.sleep(0.01)
    loaders.submit([100], urgent=True)
    threading.Timer(0.3, urgent_may_finish.set).start()
    started = time.monotonic()
    first = loaders.next_batch(BatchPolicy(max_batch=8, max_wait_s=0.0))
    waited = time.monotonic() - started
    rest = loaders.next_batch(BatchPolicy(max_batch=8, max_wait_s=0.0))
    loaders.close()
    # Bulk images were ready all along; the forward pass went to the urgent one first.
    assert [item for item, _ in first] == [100]
    assert 0.2 < waited < 5.0
    assert sorted(item for item, _ in rest) == [0, 1, 2, 3]


def test_the_forward_pass_leaves_a_core_to_the_loaders_unless_told(settings: Settings) -> None:
    cores = os.cpu_count() or 1
    assert inference_cpu_threads(settings.model_copy(update={"worker_torch_threads": 0})) == max(
        1, cores - 1
    )
    assert inference_cpu_threads(settings.model_copy(update={"worker_torch_threads": 3})) == 3

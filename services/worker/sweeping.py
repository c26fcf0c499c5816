"""Runs the sweeper (`sweeper.py`) in a thread of each worker's main process, the DICOM
results' rendering and delivery in another, and the periodic jobs (`periodic.py`: drift
figures, retention) in threads of their own."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutdown

from services.worker.periodic import PeriodicThread, periodic_threads
from services.worker.shadow import ShadowThread
from services.worker.sweeper import export_dicom_results, sweep_once
from shared.config import Settings, get_settings
from shared.db.base import forget_engines_after_fork
from shared.logs import configure_logging
from shared.queue import Queue, producer
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


class SweeperThread(threading.Thread):
    """Leases, the outbox, stalled runs, quiet studies, webhooks and orphans, every
    `sweep_interval_s`: a dead worker's images are queued again within about
    lease_s + sweep_interval_s, whatever else is pending."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        store = ObjectStore(self.settings)
        sweeps = 0
        while not self.stopping.wait(self.settings.sweep_interval_s):
            sweeps += 1
            try:
                sweep_once(
                    self.settings,
                    store=store,
                    producer=producer(self.settings),
                    orphans=sweeps % self.settings.orphan_sweep_every == 0,
                    exports=False,
                )
            except Exception:  # an outage must not end the sweeper; it tries again next round
                log.exception("sweep failed; retrying in %.0fs", self.settings.sweep_interval_s)


class ExporterThread(threading.Thread):
    """Renders and delivers DICOM results on a loop of its own: a backlog of exams to render
    (up to `export_sweep_budget_s` a round) or a slow destination never holds up the
    sweeper's leases (measured in `make bench`: a sweep that rendered for its budget first
    stretched recovery after a Redis restart from 16 to 34 s)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="exporter", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        store = ObjectStore(self.settings)
        busy = False  # a round that did something goes on at once: there may be more
        while not self.stopping.wait(0 if busy else self.settings.sweep_interval_s):
            try:
                rendered, delivered = export_dicom_results(self.settings, store)
            except Exception:  # as the sweeper: an outage must not end the loop
                log.exception("DICOM results round failed; retrying")
                busy = False
                continue
            busy = bool(rendered or delivered)
            if busy:
                log.info("DICOM results: %d exams rendered, %d delivered", rendered, delivered)


_threads: list[SweeperThread | ExporterThread | ShadowThread | PeriodicThread] = []


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    _threads[:] = [SweeperThread(settings), ExporterThread(settings), *periodic_threads(settings)]
    # The shadow version scores in the trainer's process only: never beside screening.
    consumed = set(sender.app.amqp.queues.consume_from) if sender is not None else set()
    if Queue.TRAINING.value in consumed:
        _threads.append(ShadowThread(settings))
    for thread in _threads:
        thread.start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    for thread in _threads:
        thread.stopping.set()
    for thread in _threads:
        thread.join(timeout=10)


@worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not share the parent's database sockets.
    forget_engines_after_fork()


@setup_logging.connect
def _structured_logs(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: the same JSON lines as the web services.
    configure_logging("worker")

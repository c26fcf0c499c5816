"""Runs the sweeper (`sweeper.py`) in a thread of each worker's main process."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutdown

from services.worker.sweeper import sweep_once
from shared.config import Settings, get_settings
from shared.db.base import forget_engines_after_fork
from shared.logs import configure_logging
from shared.queue import producer
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


class SweeperThread(threading.Thread):
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
                )
            except Exception:  # an outage must not end the sweeper; it tries again next round
                log.exception("sweep failed; retrying in %.0fs", self.settings.sweep_interval_s)


_sweeper: SweeperThread | None = None


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    _sweeper = SweeperThread(get_settings())
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stopping.set()
        _sweeper.join(timeout=10)


@worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not share the parent's database sockets.
    forget_engines_after_fork()


@setup_logging.connect
def _structured_logs(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: the same JSON lines as the web services.
    configure_logging("worker")

"""The worker's Celery app: `celery -A services.worker.celery_app worker -Q inference`.

The app object exists at import (Celery's CLI needs it), but settings are read only when
Celery first configures it, in the worker process.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.worker import metrics
from shared.config import get_settings
from shared.queue import celery_config

app = Celery(
    "mammoscreen-worker",
    include=[
        "services.worker.inference",
        "services.worker.training",
        "services.worker.evaluation",
        "services.worker.sweeping",
    ],
)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


metrics.install(app)

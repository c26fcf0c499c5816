"""Queues, task names and the Celery app configuration shared by producers and workers.

Producers (the ingest service) send tasks by name, so they never import worker code or torch.
Postgres, not a Celery result backend, is the source of truth for job state.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu.entity import Exchange
from kombu.entity import Queue as KombuQueue

from shared.config import Settings


class Queue(enum.StrEnum):
    # Declared first: a worker serving both inference queues empties this one first (Redis
    # transport, queue_order_strategy "priority" below).
    INFERENCE_URGENT = "inference-urgent"
    INFERENCE = "inference"
    TRAINING = "training"


# What an inference worker consumes, in the order it serves them (its `-Q` option).
INFERENCE_QUEUES = f"{Queue.INFERENCE_URGENT.value},{Queue.INFERENCE.value}"


class TaskName(enum.StrEnum):
    SCREEN_IMAGES = "worker.inference.screen_images"
    TRAIN_MODEL = "worker.training.train_model"
    EVALUATE_MODELS = "worker.evaluation.evaluate_models"


TASK_QUEUES: dict[TaskName, Queue] = {
    TaskName.SCREEN_IMAGES: Queue.INFERENCE,
    TaskName.TRAIN_MODEL: Queue.TRAINING,
    TaskName.EVALUATE_MODELS: Queue.TRAINING,
}

# Longest an inference task may run before the broker hands it to another worker. Chosen far
# above a chunk's forward pass (seconds on a CPU) so a slow task is never delivered twice.
VISIBILITY_TIMEOUT_S = 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for producers and workers alike."""
    return {
        "broker_url": settings.redis_url,
        # Each queue its own direct exchange and routing key; without them kombu binds every
        # declared queue to the default queue's exchange and key, and routing by queue breaks.
        "task_queues": [
            KombuQueue(q.value, Exchange(q.value, type="direct"), routing_key=q.value)
            for q in Queue
        ],
        "task_default_queue": Queue.INFERENCE.value,
        "task_routes": {task.value: {"queue": queue.value} for task, queue in TASK_QUEUES.items()},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # A task is acknowledged only after it ran, and handed back if its process dies, so a
        # crashed worker's chunk runs again (tasks are idempotent per image and model version).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            # Poll a worker's queues in their declared order every time, rather than rotating
            # them after each message: urgent tasks go before any bulk task queued earlier.
            "queue_order_strategy": "priority",
        },
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings, *, name: str = "mammoscreen") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


@lru_cache(maxsize=4)
def producer(settings: Settings) -> Celery:
    """A Celery app used only to send tasks, one per process."""
    return make_celery(settings, name="mammoscreen-producer")


def chunked(ids: Sequence[uuid.UUID], size: int) -> Iterable[list[str]]:
    for start in range(0, len(ids), size):
        yield [str(i) for i in ids[start : start + size]]


def enqueue_screening(
    app: Celery, image_ids: Sequence[uuid.UUID], *, chunk_size: int, urgent: bool = False
) -> int:
    """Queue inference for committed image rows, `chunk_size` ids per task, on the urgent
    lane's queue or the bulk one; returns tasks sent."""
    queue = Queue.INFERENCE_URGENT if urgent else Queue.INFERENCE
    sent = 0
    for chunk in chunked(image_ids, chunk_size):
        app.send_task(TaskName.SCREEN_IMAGES.value, args=[chunk], queue=queue.value)
        sent += 1
    return sent

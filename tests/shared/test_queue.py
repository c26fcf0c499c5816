from __future__ import annotations

import uuid

import redis

from shared.config import Settings
from shared.queue import Queue, TaskName, enqueue_screening, make_celery


def _lengths(settings: Settings) -> dict[str, int]:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return {q.value: int(client.llen(q.value)) for q in Queue}
    finally:
        client.close()


def test_each_task_lands_in_its_own_queue(settings: Settings) -> None:
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        for queue in app.amqp.queues.values():  # as a worker declares them at start-up
            queue.bind(connection.default_channel).declare()
    app.send_task(TaskName.TRAIN_MODEL.value, args=["run-id"])
    assert _lengths(settings) == {"inference-urgent": 0, "inference": 0, "training": 1}
    app.send_task(TaskName.SCREEN_IMAGES.value, args=[["image-id"]])
    assert _lengths(settings) == {"inference-urgent": 0, "inference": 1, "training": 1}


def test_images_are_queued_in_chunks_on_their_lane(settings: Settings) -> None:
    ids = [uuid.uuid4() for _ in range(10)]
    assert enqueue_screening(make_celery(settings), ids, chunk_size=4) == 3
    assert enqueue_screening(make_celery(settings), ids[:2], chunk_size=4, urgent=True) == 1
    assert _lengths(settings) == {"inference-urgent": 1, "inference": 3, "training": 0}


def test_every_queue_has_its_own_exchange_and_routing_key(settings: Settings) -> None:
    # Queues sharing a binding would let the Redis transport deliver a task to either of them.
    queues = make_celery(settings).amqp.queues
    assert {name: (q.exchange.name, q.routing_key) for name, q in queues.items()} == {
        q.value: (q.value, q.value) for q in Queue
    }

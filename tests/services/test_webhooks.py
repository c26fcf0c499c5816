"""Webhooks: one signed POST per completed batch, to a real HTTP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import DeliveryStatus, WebhookDelivery
from shared.storage import ObjectStore
from shared.webhooks import SIGNATURE_HEADER, deliver_due, verify_signature
from tests.factories import make_tenant
from tests.helpers import auth, files_field, screen_everything


class Receiver(ThreadingHTTPServer):
    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        super().__init__(("127.0.0.1", 0), ReceiverHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/mammoscreen"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers), body))
        failing = len(self.server.received) <= self.server.fail_first
        self.send_response(503 if failing else 204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(fail_first=getattr(request, "param", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _complete_batch_with_callback(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
    url: str,
) -> tuple[str, str]:
    _, key = make_tenant(session)
    created = ingest.post(
        "/v1/batches", json={"name": "notify me", "callback_url": url}, headers=auth(key)
    )
    assert created.status_code == 201, created.text
    batch_id = created.json()["id"]
    assert created.json()["callback_url"] == url
    ingest.post(
        f"/v1/batches/{batch_id}/images", files=files_field([exam[0].path]), headers=auth(key)
    )
    ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    screen_everything(session, settings, store)
    return batch_id, key


def _deliver(settings: Settings) -> int:
    with session_scope(settings.database_url) as session, httpx.Client(timeout=5) as http:
        return deliver_due(session, http)


def test_one_signed_post_per_completed_batch_and_tampering_is_detected(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
    receiver: Receiver,
) -> None:
    batch_id, key = _complete_batch_with_callback(
        ingest, session, settings, store, exam, receiver.url
    )
    assert _deliver(settings) == 1
    assert _deliver(settings) == 0  # delivered: never sent again
    ((headers, body),) = receiver.received
    summary = json.loads(body)
    assert summary["event"] == "batch.completed"
    assert summary["batch_id"] == batch_id
    assert summary["counts"]["done"] == 1

    secret = ingest.get("/v1/webhook-secret", headers=auth(key)).json()["secret"]
    signature = headers[SIGNATURE_HEADER]
    assert verify_signature(secret, signature, body)
    assert not verify_signature(secret, signature, body.replace(b'"done":1', b'"done":9'))
    assert not verify_signature("another tenant's secret", signature, body)
    assert not verify_signature(secret, signature, body, now=10**10)  # a replay, much later
    # The snippet the README documents, run as written, agrees.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    webhooks = readme.split("## Webhooks", 1)[1]
    snippet = webhooks.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(snippet, namespace)  # noqa: S102 - our own documentation
    documented_verify = namespace["verify"]
    assert documented_verify(secret, signature, body)  # type: ignore[operator]
    assert not documented_verify(secret, signature, body + b" ")  # type: ignore[operator]

    with session_scope(settings.database_url) as check:
        (delivery,) = check.scalars(select(WebhookDelivery)).all()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
            DeliveryStatus.DELIVERED,
            1,
            204,
        )


@pytest.mark.parametrize("receiver", [2], indirect=True)
def test_a_failing_receiver_is_retried_with_backoff_and_recorded(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
    receiver: Receiver,
) -> None:
    _complete_batch_with_callback(ingest, session, settings, store, exam, receiver.url)
    assert _deliver(settings) == 0  # 503
    assert _deliver(settings) == 0  # not due yet: backing off
    with session_scope(settings.database_url) as check:
        (delivery,) = check.scalars(select(WebhookDelivery)).all()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
            DeliveryStatus.PENDING,
            1,
            503,
        )
        assert delivery.next_attempt_at > delivery.created_at
    for _ in range(2):  # make it due now, twice: one more 503, then success
        with session_scope(settings.database_url) as change:
            for row in change.scalars(select(WebhookDelivery)):
                row.next_attempt_at = row.created_at
        _deliver(settings)
    assert len(receiver.received) == 3
    with session_scope(settings.database_url) as check:
        (delivery,) = check.scalars(select(WebhookDelivery)).all()
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 3)


def test_callback_url_must_be_http(ingest: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    for bad in ("ftp://example.org/x", "not a url", "javascript:alert(1)"):
        response = ingest.post(
            "/v1/batches", json={"name": "b", "callback_url": bad}, headers=auth(key)
        )
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_request"

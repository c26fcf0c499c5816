"""The DICOM Application Entity: C-ECHO, and C-STORE into the one intake.

Associations are accepted only from a registered node: the calling AE title, from a host
the node allows (`shared/dicom_nodes.py`); anything else is refused at association time,
logged and counted. Mammography instances are accepted in every transfer syntax the decoder
reads; other storage classes are accepted too, so a PACS sending a whole study is not
stalled, and answered with a warning and recorded as refusals. Each instance is received
into a temporary file (not memory), and acknowledged only once stored and committed:

- 0x0000 stored (or stored before: a retry of the same SOP instance);
- 0xB000 warning: received, not screened (the refusal code in Error Comment, the reason in
  the batch's rejections);
- 0xC000 failure: not a DICOM object we can read;
- 0xA700 out of resources: Postgres or the object store is unavailable; retry later.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from minio.error import S3Error
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as MetricCounter
from pydicom import Dataset
from pydicom.uid import (
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError
from urllib3.exceptions import HTTPError as StorageConnectionError

from services.gateway.reactors import Listener, WaitingRequestHandler
from shared import audit
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import AuditAction, BatchSource
from shared.dicom_nodes import node_for, titles_allowed_from
from shared.dicom_studies import Outcome, Receipt, Sender, queue_received, receive_instance
from shared.imaging.dicom import transfer_syntax_decodable
from shared.imaging.formats import RejectCode
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

# Instances are written to a temporary file as their fragments arrive: an association's
# memory stays at about one PDU whatever the image's size.
_config.STORE_RECV_CHUNKED_DATASET = True


MAMMOGRAPHY_CLASSES = (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
)
# Exactly the transfer syntaxes the intake accepts (the decoder's own rule), so nothing is
# negotiated that the quality gate would then refuse, and nothing it reads is refused here.
DECODABLE_SYNTAXES = [uid for uid in AllTransferSyntaxes if transfer_syntax_decodable(uid)]
# Objects we never screen (a CR scout, a presentation state) are received uncompressed.
UNCOMPRESSED_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# A calling AE title can never be this (AE titles have no backslash): refuses everyone.
NOBODY = "\\"
SUCCESS, WARNING_NOT_SCREENED, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xB000, 0xC000, 0xA700
# Refusals of objects that are not DICOM we can read; the rest are valid objects we do not
# screen (a CR scout, a presentation state, a FOR PROCESSING image), which get a warning.
UNREADABLE = {RejectCode.INVALID_DICOM, RejectCode.EMPTY_FILE, RejectCode.UNSUPPORTED_MEDIA_TYPE}
TRANSIENT_ERRORS = (SQLAlchemyError, S3Error, StorageConnectionError, ConnectionError, TimeoutError)


# How long the dispatcher gathers more received images before it queues what it has.
DISPATCH_LINGER_S = 0.25


class Dispatcher(threading.Thread):
    """Queues received images for screening off the C-STORE path: what the associations
    committed within `DISPATCH_LINGER_S` of each other goes as one task (up to the chunk
    size), so a busy gateway does not pay a broker round trip and a transaction per instance.
    The rows are the outbox: what a crash leaves unsent, the sweeper sends."""

    def __init__(self, settings: Settings, producer: Celery) -> None:
        super().__init__(name="dispatcher", daemon=True)
        self.settings, self.producer = settings, producer
        self._pending: queue.SimpleQueue[uuid.UUID | None] = queue.SimpleQueue()

    def put(self, image_id: uuid.UUID) -> None:
        self._pending.put(image_id)

    def stop(self) -> None:
        self._pending.put(None)
        self.join(timeout=30)

    def run(self) -> None:
        stopping = False
        while not stopping:
            ids: list[uuid.UUID] = []
            item: uuid.UUID | None = self._pending.get()
            deadline = time.monotonic() + DISPATCH_LINGER_S
            while True:
                if item is None:
                    stopping = True
                else:
                    ids.append(item)
                if stopping or len(ids) >= self.settings.inference_chunk_size:
                    break
                try:
                    item = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            queue_received(self.settings, self.producer, ids)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = MetricCounter(
            "dicom_associations",
            "Associations requested of the DICOM gateway, by calling AE title and result",
            ["calling_ae", "result"],
            registry=registry,
        )
        self.instances = MetricCounter(
            "dicom_instances",
            "Instances received by C-STORE, by calling AE title and outcome",
            ["calling_ae", "outcome"],
            registry=registry,
        )


class RegisteredNodesAE(AE):
    """An AE whose allowed calling AE titles are the registered nodes', per peer host.

    pynetdicom checks `require_calling_aet` while negotiating, in the association's own
    thread; answering it from the registry there refuses an unknown node at association
    time, with the standard "calling AE title not recognised" rejection.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(ae_title=settings.dicom_ae_title)
        self._database_url = settings.database_url

    @property  # type: ignore[misc]
    def require_calling_aet(self) -> list[str]:
        association = threading.current_thread()
        if not isinstance(association, Association):
            return [NOBODY]
        try:
            with session_scope(self._database_url) as session:
                titles = titles_allowed_from(session=session, host=association.requestor.address)
        except SQLAlchemyError:
            log.exception("cannot read the registered DICOM nodes; refusing the association")
            return [NOBODY]
        return sorted(titles) or [NOBODY]


@dataclass
class AssociationRecord:
    tenant_id: uuid.UUID
    node_id: uuid.UUID
    calling_ae: str
    host: str
    outcomes: Counter[str] = field(default_factory=Counter)


class Gateway:
    """The AE with its handlers; `start` listens, `stop` ends every association."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ObjectStore,
        producer: Celery,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.metrics = GatewayMetrics(registry)
        self.ae = RegisteredNodesAE(settings)
        self.ae.maximum_associations = settings.dicom_max_associations
        self.ae.maximum_pdu_size = settings.dicom_max_pdu_bytes
        self.ae.acse_timeout = settings.dicom_acse_timeout_s
        self.ae.dimse_timeout = settings.dicom_dimse_timeout_s
        self.ae.network_timeout = settings.dicom_network_timeout_s
        self.ae.add_supported_context(Verification)
        for sop_class in MAMMOGRAPHY_CLASSES:
            self.ae.add_supported_context(sop_class, DECODABLE_SYNTAXES)
        for context in AllStoragePresentationContexts:
            other = context.abstract_syntax
            if other is not None and other not in MAMMOGRAPHY_CLASSES:
                self.ae.add_supported_context(other, UNCOMPRESSED_SYNTAXES)
        self.dispatcher = Dispatcher(settings, producer)
        self._associations: dict[int, AssociationRecord] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
        ]

    def start(self, host: str, port: int) -> int:
        """Listen without blocking; returns the port (an ephemeral one when `port` is 0)."""
        self.dispatcher.start()
        self._server = self.ae.make_server(
            (host, port),
            evt_handlers=self.handlers(),
            server_class=Listener,
            request_handler=WaitingRequestHandler,
        )
        threading.Thread(target=self._server.serve_forever, name="listener", daemon=True).start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.dispatcher.stop()

    # -- associations -------------------------------------------------------------------------

    def on_accepted(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title
        host = event.assoc.requestor.address
        with session_scope(self.settings.database_url) as session:
            node = node_for(session=session, ae_title=calling, host=host)
            if node is None:  # removed between the check and now
                event.assoc.abort()
                return
            record = AssociationRecord(node.tenant_id, node.id, calling, host)
        with self._lock:
            self._associations[id(event.assoc)] = record
        self.metrics.associations.labels(calling, "accepted").inc()
        log.info("association from %s at %s accepted", calling, host)

    def on_rejected(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title
        host = event.assoc.requestor.address
        self.metrics.associations.labels(calling, "rejected").inc()
        # No tenant owns an unknown node, so this is a log line, not a tenant's audit row.
        log.warning(
            "association refused: calling AE title %r at %s is not a registered DICOM node",
            calling,
            host,
            extra={"audit": "dicom_association_refused", "calling_ae": calling, "peer": host},
        )

    def on_ended(self, event: Event) -> None:
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        if record is None:
            return
        try:
            with session_scope(self.settings.database_url) as session:
                audit.record(
                    session=session,
                    tenant_id=record.tenant_id,
                    key_prefix=f"dicom:{record.calling_ae}"[:32],
                    action=AuditAction.UPLOAD,
                    resource_type="dicom_association",
                    resource_id=record.node_id,
                    detail={"peer": record.host, "instances": dict(record.outcomes)},
                )
        except SQLAlchemyError:
            log.exception("could not audit the association from %s", record.calling_ae)

    # -- C-STORE ------------------------------------------------------------------------------

    def handle_store(self, event: Event) -> Dataset:
        with self._lock:
            record = self._associations.get(id(event.assoc))
        if record is None:
            return _status(OUT_OF_RESOURCES, "association not registered; retry")
        sender = Sender(
            tenant_id=record.tenant_id,
            source=BatchSource.DICOM,
            label=record.calling_ae,
            node_id=record.node_id,
        )
        try:
            with open(event.dataset_path, "rb") as stream:
                receipt = receive_instance(
                    stream, sender=sender, settings=self.settings, store=self.store
                )
        except TRANSIENT_ERRORS as err:
            log.warning("instance from %s not stored; the sender retries: %s", sender.label, err)
            self._count(record, "retry")
            return _status(OUT_OF_RESOURCES, "storage or database unavailable; retry")
        self._count(record, receipt.outcome.value)
        if receipt.outcome == Outcome.STORED and receipt.image_id is not None:
            self.dispatcher.put(receipt.image_id)
        return _answer(receipt)

    def _count(self, record: AssociationRecord, outcome: str) -> None:
        record.outcomes[outcome] += 1
        self.metrics.instances.labels(record.calling_ae, outcome).inc()


def _answer(receipt: Receipt) -> Dataset:
    if receipt.outcome in (Outcome.STORED, Outcome.DUPLICATE):
        return _status(SUCCESS)
    assert receipt.rejection is not None
    code = receipt.rejection.code
    return _status(CANNOT_UNDERSTAND if code in UNREADABLE else WARNING_NOT_SCREENED, code.value)


def _status(status: int, comment: str | None = None) -> Dataset:
    answer = Dataset()
    answer.Status = status
    if comment:
        answer.ErrorComment = comment[:64]
    return answer

"""The gateway's waiting reactors (services/gateway/reactors.py) against dcmtk's echoscu and
storescu: the acceptor's associations are ours, and everything pynetdicom's polling reactors
did still happens (echo, a store over many PDUs, release, abort)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalMammographyXRayImageStorageForPresentation,
    Verification,
)

from devstack.synth import generate_exams
from services.gateway import reactors
from services.gateway.reactors import (
    BulkReadSocket,
    Listener,
    WaitingAssociation,
    WaitingRequestHandler,
)
from tests.factories import SMALL_SYNTH
from tests.helpers import dcmtk, wait_for

AE_TITLE = "REACTORS"
# dcmtk gives up on an answer after this; far below the DUL's patched wait (see `acceptor`).
DCMTK_TIMEOUTS = ("-to", "20", "-ta", "20", "-td", "20")


@dataclass
class Seen:
    events: list[str] = field(default_factory=list)
    classes: set[tuple[type, type]] = field(default_factory=set)
    stored: list[bytes] = field(default_factory=list)

    def note(self, name: str, event: Event) -> None:
        self.events.append(name)
        self.classes.add((type(event.assoc), type(event.assoc.dul.socket)))


@pytest.fixture
def acceptor(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Seen]]:
    # A DUL that waited out its wait before sending would answer each request that late:
    # with a wait far longer than dcmtk's timeouts, only the wake-up on send lets the
    # tools finish.
    monkeypatch.setattr(reactors, "SOCKET_WAIT_S", 600.0)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)  # as the gateway sets it
    seen = Seen()

    def on_store(event: Event) -> int:
        seen.note("store", event)
        seen.stored.append(Path(event.dataset_path).read_bytes())
        return 0x0000

    def on_echo(event: Event) -> int:
        seen.note("echo", event)
        return 0x0000

    handlers: list[Any] = [
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_RELEASED, lambda event: seen.note("released", event)),
        (evt.EVT_ABORTED, lambda event: seen.note("aborted", event)),
    ]
    ae = AE(ae_title=AE_TITLE)
    ae.maximum_pdu_size = 16_384  # many PDUs per image, each read in pieces
    ae.add_supported_context(Verification)
    ae.add_supported_context(
        DigitalMammographyXRayImageStorageForPresentation,
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    )
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=handlers,
        server_class=Listener,
        request_handler=WaitingRequestHandler,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1]), seen
    server.shutdown()


def test_echo_answered_and_released_by_waiting_threads(acceptor: tuple[int, Seen]) -> None:
    port, seen = acceptor
    echoed = dcmtk("echoscu", *DCMTK_TIMEOUTS, "-aec", AE_TITLE, "127.0.0.1", port)
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    wait_for(lambda: "released" in seen.events, timeout=10, what="the association's release")
    assert seen.events == ["echo", "released"]
    assert seen.classes == {(WaitingAssociation, BulkReadSocket)}


def test_images_over_many_pdus_arrive_intact_then_an_abort_is_heard(
    acceptor: tuple[int, Seen], tmp_path: Path
) -> None:
    port, seen = acceptor
    exam = generate_exams(tmp_path, exams=1, seed=5, options=SMALL_SYNTH)
    paths = [image.path for image in exam]
    sent = dcmtk("storescu", *DCMTK_TIMEOUTS, "-aec", AE_TITLE, "127.0.0.1", port, *paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(seen.stored) == len(paths)
    for path, received in zip(paths, seen.stored, strict=True):
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(received))
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert copy.PixelData == original.PixelData
        assert len(original.PixelData) > 4 * 16_384

    assert "aborted" not in seen.events
    aborted = dcmtk(
        "storescu", *DCMTK_TIMEOUTS, "--abort", "-aec", AE_TITLE, "127.0.0.1", port, paths[0]
    )
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    wait_for(lambda: "aborted" in seen.events, timeout=10, what="the peer's abort")

"""Acceptor associations whose threads wait for work instead of polling for it.

pynetdicom 3.0 runs two threads per association that poll every millisecond: the DUL
reactor sleeps 1 ms whenever it had nothing to do, and the association reactor sleeps 1 ms
before every look at its DIMSE message queue. On the 2-core machines four idle associations
cost the gateway 0.37 of a core, and under load those wake-ups compete for the GIL with the
threads receiving and storing images (`make bench`, dicom_store_mb_per_s).

Here both threads block instead. The DUL waits on its socket and on a wake-up channel that
every outgoing primitive (and a kill) signals; the association waits on its message queue.
Each wakes at once when there is work, and at least every `SOCKET_WAIT_S` or `QUEUE_WAIT_S`
to look at its timers and at the release and abort flags, which is the most a release or an
expired timer is noticed late. Reads take a PDU in one buffer rather than 4 KiB at a time.
Nothing else in pynetdicom's state machine changes. This follows pynetdicom 3.0's internals
(pyproject pins the minor version); tests/services/gateway/test_reactors.py fails if a
release breaks them.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import time
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

# The most each thread waits before it looks at its timers and flags again.
SOCKET_WAIT_S = 0.05  # the DUL, between reads (a send or a kill wakes it at once)
QUEUE_WAIT_S = 0.05  # the association, between DIMSE messages (a release is seen this late)
# What pynetdicom sleeps when its socket cannot be watched (closed under it).
POLL_DELAY_S = 0.001


class WaitingDUL(DULServiceProvider):
    """The upper layer reactor, waiting in `select` on its socket and a wake-up channel."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0  # it waits in _is_transport_event instead
        self._wake_receiver, self._wake_sender = socket.socketpair()
        self._wake_receiver.setblocking(False)
        self._wake_sender.setblocking(False)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_receiver.close()
            self._wake_sender.close()

    def _is_transport_event(self) -> bool:
        idle = self.to_provider_queue.empty() and self.event_queue.empty()
        if idle and not self._kill_thread:
            self._wait_for_input()
        return bool(super()._is_transport_event())

    def _wake(self) -> None:
        # OSError: full (a wake-up is pending anyway) or closed (the reactor has ended).
        with contextlib.suppress(OSError):
            self._wake_sender.send(b"\0")

    def _wait_for_input(self) -> None:
        watched: list[Any] = [self._wake_receiver]
        transport = self.socket
        peer = transport.socket if transport is not None and transport._is_connected else None
        if isinstance(peer, ssl.SSLSocket) and peer.pending():
            return  # decrypted bytes that select cannot see
        if peer is not None:
            watched.append(peer)
        try:
            readable, _, _ = select.select(watched, [], [], SOCKET_WAIT_S)
        except (OSError, ValueError):  # closed under us: the state machine hears it next
            time.sleep(POLL_DELAY_S)
            return
        if self._wake_receiver in readable:
            with contextlib.suppress(OSError):  # drained
                while self._wake_receiver.recv(4096):
                    pass


class WaitingDIMSE(DIMSEServiceProvider):
    """The association reactor's only non-blocking read of its message queue becomes a wait
    of up to `QUEUE_WAIT_S` (blocking reads, as the SCU calls make, are unchanged)."""

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=QUEUE_WAIT_S)
        except queue.Empty:
            return None, None


class WaitingAssociation(Association):
    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = WaitingDUL(self)
        self.dimse = WaitingDIMSE(self)
        # The timeouts were handed to the DUL just replaced; hand them to this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class BulkReadSocket(AssociationSocket):
    """Reads a PDU with as few system calls as the kernel allows: pynetdicom reads it 4 KiB
    at a time (about 420 `recv` calls and copies per 1.7 MB image, a third of the gateway's
    system time), this into one buffer of the PDU's size."""

    def recv(self, nr_bytes: int) -> bytearray:
        peer = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            received = peer.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not received:  # the connection broke: what arrived, as pynetdicom returns it
                del view
                return buffer[:nr_read]
            nr_read += received
        return buffer


class WaitingRequestHandler(RequestHandler):
    """pynetdicom's acceptor set-up (`RequestHandler._create_association`, 3.0), with
    `WaitingAssociation` in place of `Association`."""

    def _create_association(self) -> Association:
        assoc = WaitingAssociation(self.ae, "acceptor")
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BulkReadSocket(assoc, client_socket=self.request))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


class Listener(ThreadedAssociationServer):
    """pynetdicom's threaded server (made with `WaitingRequestHandler`), without its periodic
    full garbage collection: every 30 s it stopped the whole gateway (all associations
    and their GIL) for a `gc.collect()` of the process. An ended association's objects
    form reference cycles that Python's own generational collector frees like any others."""

    def __init__(self, ae: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(ae, *args, **kwargs)
        ae._servers.append(self)  # pynetdicom's shutdown() takes it out of this list

    def service_actions(self) -> None:
        pass

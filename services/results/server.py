"""How the results service listens (see services/results/__main__.py)."""

from __future__ import annotations

import socket

import uvicorn


class NoDelayConfig(uvicorn.Config):
    """Binds a listening socket whose connections send small writes at once.

    With several workers uvicorn binds the socket itself, without the protocol number that
    asyncio checks before it disables Nagle's algorithm on each connection; a response's
    body then waits behind its headers for the client's delayed ACK: 40 ms on every small
    answer (a batch status). Accepted connections inherit TCP_NODELAY from the listener.
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

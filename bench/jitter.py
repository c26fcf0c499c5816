"""How late this machine wakes a process that waits: a baseline beside latency figures.

A service's p99 is made of its own work and of the time the operating system (and, on a
virtual machine, the hypervisor) takes to run a process that became runnable. The probe
measures the second alone: two processes answer each other one byte over a socket pair,
`interval_s` apart, for as long as the measured phase runs; a round trip costs microseconds
of work, so what it takes beyond that is waiting to be run. Run it during the phase it
explains: it costs the machine about a thousandth of a core.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from types import TracebackType
from typing import Any


def _echo(sock: socket.socket) -> None:
    while (byte := sock.recv(1)) not in (b"", b"q"):
        sock.sendall(byte)


def _probe(stop: Event, results: Connection, interval_s: float) -> None:
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        ours.close()
        _echo(theirs)
        os._exit(0)
    theirs.close()
    round_trips: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        ours.sendall(b"x")
        ours.recv(1)
        round_trips.append(time.perf_counter() - started)
        time.sleep(interval_s)
    ours.sendall(b"q")
    os.waitpid(child, 0)
    results.send(round_trips)


def summary_us(round_trips: list[float]) -> dict[str, Any]:
    ordered = sorted(round_trips)
    if not ordered:
        return {"round_trips": 0}

    def at(q: float) -> float:
        return round(1e6 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "round_trips": len(ordered),
        "p50": at(0.5),
        "p99": at(0.99),
        "max": round(1e6 * ordered[-1], 1),
        "over_1ms": sum(1 for t in ordered if t > 1e-3),
    }


class WakeupProbe:
    """`with WakeupProbe() as probe: ...`, then `probe.result` (microseconds)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.result: dict[str, Any] = {}
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe, args=(self._stop, send, interval_s), daemon=True
        )

    def __enter__(self) -> WakeupProbe:
        self._process.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._receive.poll(30):
            self.result = summary_us(self._receive.recv())
        self._process.join(timeout=10)

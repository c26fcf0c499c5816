"""`python -m services.gateway`: listen for DICOM associations until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.process_collector import ProcessCollector

from services.gateway.node import Gateway
from shared.config import get_settings
from shared.logs import configure_logging
from shared.queue import producer
from shared.storage import ObjectStore
from shared.vault import check_vault_settings

log = logging.getLogger("services.gateway")


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    check_vault_settings(settings)
    parser = argparse.ArgumentParser(prog="python -m services.gateway")
    parser.add_argument("--host", default=settings.dicom_host)
    parser.add_argument("--port", type=int, default=settings.dicom_port)
    parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics (0: off)")
    args = parser.parse_args(argv)
    configure_logging("gateway")
    # pynetdicom logs several INFO lines per message; the gateway logs what matters itself
    # (associations accepted and refused, failures), and each line costs CPU per instance.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    gateway = Gateway(
        settings, store=ObjectStore(settings), producer=producer(settings), registry=registry
    )
    if args.metrics_port:
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    port = gateway.start(args.host, args.port)
    log.info("gateway %s listening on %s:%d ready.", settings.dicom_ae_title, args.host, port)
    stopping.wait()
    gateway.stop()
    log.info("gateway stopped")


if __name__ == "__main__":
    main()

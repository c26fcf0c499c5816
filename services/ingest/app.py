"""Ingest service: `uvicorn --factory services.ingest.app:create_app`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from starlette.formparsers import MultiPartParser

from services.ingest.deliveries import router as deliveries_router
from services.ingest.dicomweb import router as dicomweb_router
from services.ingest.erasure import router as erasure_router
from services.ingest.evaluations import router as evaluations_router
from services.ingest.operating_points import router as operating_points_router
from services.ingest.outcomes import router as outcomes_router
from services.ingest.routes import router
from services.ingest.training import router as training_router
from shared.api.errors import install_error_handlers
from shared.api.health import router as health_router
from shared.api.limits import BodySizeLimit
from shared.api.metrics import install_metrics
from shared.api.ratelimit import WALL_CLOCK, rate_limit_client
from shared.api.requests import install_request_logging
from shared.config import Settings, get_settings
from shared.logs import configure_logging
from shared.queue import producer
from shared.storage import ObjectStore
from shared.vault import check_vault_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging("ingest")
    check_vault_settings(settings)
    app = FastAPI(
        title="mammoscreen ingest",
        version="0.1.0",
        description="Submit mammograms for asynchronous screening.",
    )
    bind(app, settings)
    install_error_handlers(app)
    install_metrics(app, "ingest", settings)
    install_request_logging(app)
    app.add_middleware(BodySizeLimit)
    app.include_router(health_router)
    app.include_router(router)
    app.include_router(training_router)
    app.include_router(dicomweb_router)
    app.include_router(deliveries_router)
    app.include_router(outcomes_router)
    app.include_router(evaluations_router)
    app.include_router(operating_points_router)
    app.include_router(erasure_router)
    return app


def bind(app: FastAPI, settings: Settings) -> None:
    """Point the app at the servers `settings` names (no connection is opened here)."""
    app.state.settings = settings
    app.state.store = ObjectStore(settings)
    app.state.producer = producer(settings)
    app.state.redis = rate_limit_client(settings)
    app.state.clock = WALL_CLOCK  # the rate limit's windows
    app.state.storers = ThreadPoolExecutor(
        max_workers=settings.ingest_store_threads, thread_name_prefix="store-upload"
    )
    # Uploaded files stay in memory up to this size while the form is parsed, instead of
    # spilling to a temporary file whose every write is a hop to another thread.
    MultiPartParser.spool_max_size = settings.upload_spool_bytes

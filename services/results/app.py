"""Results service: `python -m services.results` (several processes; see __main__.py), or
`uvicorn --factory services.results.app:create_app`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.results.changes import BatchChanges
from services.results.dicom import router as dicom_router
from services.results.routes import audit_router, router
from services.results.training import router as training_router
from services.results.viewer import LoginRequired, login_redirect
from services.results.viewer import router as viewer_router
from shared.api.errors import install_error_handlers
from shared.api.health import router as health_router
from shared.api.keycache import KeyCache
from shared.api.metrics import install_metrics
from shared.api.ratelimit import WALL_CLOCK, async_rate_limit_client, rate_limit_client
from shared.api.requests import install_request_logging
from shared.config import Settings, get_settings
from shared.db.base import get_engine
from shared.logs import configure_logging
from shared.storage import ObjectStore
from shared.vault import check_vault_settings


def create_server_app() -> FastAPI:
    """The app of a results server process (`python -m services.results`)."""
    app = create_app()
    app.state.freeze_start_up = True
    return app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging("results")
    check_vault_settings(settings)
    app = FastAPI(
        lifespan=_lifespan,
        title="mammoscreen results",
        version="0.1.0",
        description="Batches, exams, per-image scores and heatmaps, training runs, models.",
    )
    bind(app, settings)
    install_error_handlers(app)
    install_metrics(app, "results", settings)
    install_request_logging(app)
    app.include_router(health_router)
    app.include_router(router)
    app.include_router(audit_router)
    app.include_router(dicom_router)
    app.include_router(training_router)
    app.include_router(viewer_router)
    app.add_exception_handler(LoginRequired, login_redirect)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app serves: the batch-change listener, the loop's Redis client."""
    changes: BatchChanges = app.state.batch_changes
    changes.start()
    # Made here, in the loop that serves requests (an asyncio client belongs to one loop).
    app.state.loop_redis = async_rate_limit_client(app.state.settings)
    if app.state.freeze_start_up:
        # What start-up built (routes, schemas, mappers) lives as long as the process: out of
        # the collector's way, a full collection no longer walks it in the middle of a page
        # (it added 20 ms to one page of 100 exams in three). Only in a server process: in a
        # process that makes many apps (tests) it would keep their garbage forever.
        gc.freeze()
    try:
        yield
    finally:
        await changes.stop()
        await app.state.loop_redis.aclose()
        app.state.loop_redis = None


def bind(app: FastAPI, settings: Settings) -> None:
    """Point the app at the servers `settings` names (no connection is opened here)."""
    app.state.settings = settings
    get_engine(settings.database_url, pool_size=settings.results_database_pool_size)
    app.state.redis = rate_limit_client(settings)
    app.state.loop_redis = None  # the lifespan's (see _lifespan)
    app.state.clock = WALL_CLOCK  # the rate limit's windows
    app.state.store = ObjectStore(settings)  # heatmaps
    app.state.freeze_start_up = False
    # Requests skip the key lookup while the listener would hear of a revocation.
    app.state.key_cache = KeyCache()
    # Long polls sleep on it (it listens once the app has started).
    app.state.batch_changes = BatchChanges(settings.database_url, app.state.key_cache)

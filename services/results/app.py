"""Results service: `uvicorn --factory services.results.app:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.results.routes import router
from shared.api.errors import install_error_handlers
from shared.api.health import router as health_router
from shared.api.ratelimit import rate_limit_client
from shared.config import Settings, get_settings
from shared.logs import configure_logging


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging("results")
    app = FastAPI(
        title="mammoscreen results",
        version="0.1.0",
        description="Batches, per-image scores and their status.",
    )
    bind(app, settings)
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(router)
    return app


def bind(app: FastAPI, settings: Settings) -> None:
    """Point the app at the servers `settings` names (no connection is opened here)."""
    app.state.settings = settings
    app.state.redis = rate_limit_client(settings)

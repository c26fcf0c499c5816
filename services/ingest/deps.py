"""Typed dependencies of the ingest service."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from shared.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep, TenantDep


def get_producer(request: Request) -> Celery:
    producer: Celery = request.app.state.producer
    return producer


ProducerDep = Annotated[Celery, Depends(get_producer)]

__all__ = ["CallerDep", "ProducerDep", "SessionDep", "SettingsDep", "StoreDep", "TenantDep"]

"""Typed dependencies of the ingest service."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from shared.api.deps import CallerDep, SessionDep, SettingsDep, TenantDep
from shared.storage import ObjectStore


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


def get_producer(request: Request) -> Celery:
    producer: Celery = request.app.state.producer
    return producer


StoreDep = Annotated[ObjectStore, Depends(get_store)]
ProducerDep = Annotated[Celery, Depends(get_producer)]

__all__ = ["CallerDep", "ProducerDep", "SessionDep", "SettingsDep", "StoreDep", "TenantDep"]

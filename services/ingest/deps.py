"""Typed dependencies of the ingest service."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from shared.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep, TenantDep


def get_producer(request: Request) -> Celery:
    producer: Celery = request.app.state.producer
    return producer


ProducerDep = Annotated[Celery, Depends(get_producer)]


def get_storers(request: Request) -> ThreadPoolExecutor:
    """Threads that take uploaded files into object storage, shared by every request."""
    storers: ThreadPoolExecutor = request.app.state.storers
    return storers


StorersDep = Annotated[ThreadPoolExecutor, Depends(get_storers)]

__all__ = [
    "CallerDep",
    "ProducerDep",
    "SessionDep",
    "SettingsDep",
    "StoreDep",
    "StorersDep",
    "TenantDep",
]

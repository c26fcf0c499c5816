"""Declarative base, id generation and engine/session factories."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import DateTime, MetaData, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Deterministic constraint names, so Alembic revisions name the same thing the models do.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


_last_id = 0
_last_id_lock = threading.Lock()


def new_id() -> uuid.UUID:
    """A UUIDv7: time-ordered, so keyset pagination by id follows creation order.

    Within a process also for ids made in the same millisecond (RFC 9562's monotonic
    random): an id that would not sort after the previous one is the previous one plus one,
    so images uploaded in one request list in the order they came."""
    global _last_id
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64  # 12 random bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)
    with _last_id_lock:
        if value <= _last_id:
            value = _last_id + 1
        _last_id = value
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    return datetime.now(UTC)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


DEFAULT_POOL_SIZE = 5
MAX_OVERFLOW = 10


def get_engine(database_url: str, *, pool_size: int | None = None) -> Engine:
    """One pooled engine per database URL per process; pre-ping survives database restarts.

    `pool_size` connections stay open (the first call for a URL sets it). A request beyond
    them opens one of MAX_OVERFLOW more and closes it after use: a new Postgres backend per
    request, so a process that answers many requests at once (the results service) keeps a
    pool that covers them.

    The pool hands out the connection used last (LIFO), not the one idle longest: a few
    connections then serve a steady load and stay warm (their statements prepared by
    psycopg after five runs each, their backends' catalog caches filled), where a FIFO pool
    of 25 rotated every request through all of them and a results process took most of a
    minute to warm up (p50 of an exams page 11-14 ms against 10-11 with LIFO)."""
    with _engines_lock:
        engine = _engines.get(database_url)
        if engine is None:
            engine = create_engine(
                database_url,
                pool_pre_ping=True,
                pool_size=pool_size or DEFAULT_POOL_SIZE,
                max_overflow=MAX_OVERFLOW,
                pool_use_lifo=True,
            )
            _engines[database_url] = engine
        return engine


def forget_engines_after_fork() -> None:
    """In a forked child: drop the parent's pooled connections without closing them."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _read_sessions.clear()


def session_factory(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(database_url), expire_on_commit=False)


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with session_factory(database_url)() as session, session.begin():
        yield session


_read_sessions: dict[str, sessionmaker[Session]] = {}


def read_session_factory(database_url: str) -> sessionmaker[Session]:
    """Sessions whose every statement commits on its own (autocommit), for requests that
    read and write nothing but their audit row: no BEGIN and no COMMIT, two round trips
    fewer (a third of a batch status answer's). Nothing they read needs one snapshot.
    Made once per URL: an engine with options of its own costs a request to make."""
    with _engines_lock:
        factory = _read_sessions.get(database_url)
    if factory is None:
        engine = get_engine(database_url).execution_options(isolation_level="AUTOCOMMIT")
        factory = sessionmaker(bind=engine, expire_on_commit=False)
        with _engines_lock:
            factory = _read_sessions.setdefault(database_url, factory)
    return factory


@contextmanager
def read_session_scope(database_url: str) -> Iterator[Session]:
    """A `read_session_factory` session, closed at the end."""
    with read_session_factory(database_url)() as session:
        yield session

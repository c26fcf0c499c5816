"""Database: declarative base, models and session factories."""

from shared.db.base import Base, get_engine, new_id, session_factory, session_scope, utcnow

__all__ = ["Base", "get_engine", "new_id", "session_factory", "session_scope", "utcnow"]

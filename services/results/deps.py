"""Typed dependencies of the results service."""

from shared.api.deps import (
    CallerDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
)

__all__ = ["CallerDep", "ReadSessionDep", "SessionDep", "SettingsDep", "StoreDep", "TenantDep"]

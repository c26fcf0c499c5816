"""Typed dependencies of the results service."""

from shared.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep, TenantDep

__all__ = ["CallerDep", "SessionDep", "SettingsDep", "StoreDep", "TenantDep"]

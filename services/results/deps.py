"""Typed dependencies of the results service."""

from shared.api.deps import SessionDep, SettingsDep, TenantDep

__all__ = ["SessionDep", "SettingsDep", "TenantDep"]

"""Typed dependencies of the results service."""

from shared.api.deps import CallerDep, SessionDep, SettingsDep, TenantDep

__all__ = ["CallerDep", "SessionDep", "SettingsDep", "TenantDep"]

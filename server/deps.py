"""Dependency aliases for routes: the services and settings the app's lifespan created."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from server.errors import RoleNotServed
from server.service import AdapterService, GenerationService
from server.settings import Role, Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tenant(request: Request, authorization: str | None = Header(None)) -> str:
    """The caller's tenant from its API key (a 401 without a valid one, when keys are set),
    within its request rate (a 429)."""
    tenant: str = request.app.state.api_keys.tenant(authorization)
    request.app.state.limits.request(tenant)
    return tenant


def check_role(request: Request, work: Role) -> None:
    """A server of role `adapt` runs no engine, one of role `generate` no generator."""
    role = request.app.state.settings.role
    if role not in ("all", work):
        raise RoleNotServed(
            f"{request.method} {request.url.path} is not served here: this server's role is "
            f"{role!r} (GENADAPTER_ROLE); send it to a server of role {work!r} or 'all'"
        )


def get_adapter_service(request: Request) -> AdapterService:
    return request.app.state.adapters


def get_adapting_service(request: Request) -> AdapterService:
    check_role(request, "adapt")
    return request.app.state.adapters


def get_generation_service(request: Request) -> GenerationService:
    check_role(request, "generate")
    return request.app.state.generation


SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
AdapterServiceDep = Annotated[AdapterService, Depends(get_adapter_service)]
AdaptingServiceDep = Annotated[AdapterService, Depends(get_adapting_service)]
GenerationServiceDep = Annotated[GenerationService, Depends(get_generation_service)]

"""Adapters: make one from a context, read its metadata, delete it."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import AdapterServiceDep, AdaptingServiceDep, TenantDep
from server.protocol import AdapterInfo, AdaptRequest, AdaptResponse, DeleteResponse
from server.routers import ERRORS, post_with_alias

router = APIRouter(tags=["adapters"], responses=ERRORS)


async def adapt(
    request: AdaptRequest, service: AdaptingServiceDep, tenant: TenantDep
) -> AdaptResponse:
    """Turn a context into an adapter, or return the cached one; `parent` extends an adapter."""
    return await service.adapt(request, tenant)


post_with_alias(router, "/v1/adapt", adapt, AdaptResponse)


@router.get("/v1/adapters/{adapter_id}")
async def get_adapter(
    adapter_id: str, service: AdapterServiceDep, tenant: TenantDep
) -> AdapterInfo:
    """An adapter's metadata (this also extends its time to live)."""
    return await service.info(adapter_id, tenant)


@router.delete("/v1/adapters/{adapter_id}")
async def delete_adapter(
    adapter_id: str, service: AdapterServiceDep, tenant: TenantDep
) -> DeleteResponse:
    """Delete an adapter from the store; later requests naming it get 404."""
    return DeleteResponse(id=adapter_id, deleted=await service.delete(adapter_id, tenant))

"""Dependency aliases for routes: the services and settings the app's lifespan created."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.service import AdapterService, GenerationService
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_adapter_service(request: Request) -> AdapterService:
    return request.app.state.adapters


def get_generation_service(request: Request) -> GenerationService:
    return request.app.state.generation


SettingsDep = Annotated[Settings, Depends(get_settings)]
AdapterServiceDep = Annotated[AdapterService, Depends(get_adapter_service)]
GenerationServiceDep = Annotated[GenerationService, Depends(get_generation_service)]

"""OpenAI's wire format: chat completions and completions (vLLM's OpenAI layer), the model list.

`model` is the base model's name or an adapter id; the service makes the adapter ready, then the
request goes to vLLM's own handlers, so it means here what it means to vLLM's OpenAI server.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from server.deps import AdapterServiceDep, GenerationServiceDep, TenantDep
from server.protocol import ModelCard, ModelList
from server.routers import ERRORS
from server.vllm_openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAIResult,
    with_cancellation,
)

router = APIRouter(tags=["openai"], responses=ERRORS)
STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or events if stream"}
}


@router.post("/v1/chat/completions", responses=STREAM)
@with_cancellation
async def chat_completions(
    request: ChatCompletionRequest,
    raw_request: Request,
    service: GenerationServiceDep,
    tenant: TenantDep,
) -> Response:
    """OpenAI chat completion with the base model or an adapter (`model`)."""
    await service.use_model(request.model, tenant)
    return respond(await service.engine.openai.chat(request, raw_request))


@router.post("/v1/completions", responses=STREAM)
@with_cancellation
async def completions(
    request: CompletionRequest,
    raw_request: Request,
    service: GenerationServiceDep,
    tenant: TenantDep,
) -> Response:
    """OpenAI text completion of raw prompts (no chat template), base model or adapter."""
    await service.use_model(request.model, tenant)
    return respond(await service.engine.openai.complete(request, raw_request))


def respond(result: OpenAIResult) -> Response:
    """A handler's result as HTTP, as vLLM's server sends it."""
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream")


@router.get("/v1/models")
async def models(service: AdapterServiceDep, tenant: TenantDep) -> ModelList:
    """The base model and every adapter in the store (each usable as `model`)."""
    base = service.base_name
    cards = [ModelCard(id=base, parent=None)]
    cards += [
        ModelCard(id=a.id, created=a.created_at, parent=base) for a in await service.list(tenant)
    ]
    return ModelList(data=cards)

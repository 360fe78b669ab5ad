"""Generate: a prompt answered with an adapter (or the base model), streamed on request."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.deps import GenerationServiceDep, TenantDep
from server.protocol import (
    GenerateRequest,
    GenerateResponse,
    GenerateStreamResponse,
    UsageInfo,
    new_id,
)
from server.routers import ERRORS, post_with_alias
from server.streaming import sse_response
from server.vllm_openai import with_cancellation

router = APIRouter(tags=["generate"], responses=ERRORS)


@with_cancellation
async def generate(
    request: GenerateRequest,
    raw_request: Request,
    service: GenerationServiceDep,
    tenant: TenantDep,
) -> GenerateResponse | StreamingResponse:
    """Answer `prompt` (one user turn) with the adapter; server-sent events if `stream`."""
    lora = await service.lora(request.adapter_id, tenant)
    ids = service.user_prompt(request.prompt)
    options = service.options(request, len(ids))
    rid = new_id("gen")
    if request.stream:
        deltas = await service.stream(ids, options, lora)
        return sse_response(
            GenerateStreamResponse(
                id=rid, adapter_id=request.adapter_id, text=d.text, finish_reason=d.finish_reason
            )
            async for d in deltas
        )
    c = await service.complete(ids, options, lora)
    return GenerateResponse(
        id=rid,
        adapter_id=request.adapter_id,
        text=c.text,
        token_ids=c.token_ids,
        finish_reason=c.finish_reason,
        usage=usage(c.prompt_tokens, len(c.token_ids)),
    )


post_with_alias(router, "/v1/generate", generate, GenerateResponse)


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )

"""OpenAI's wire format: chat completions, completions and the model list.

`model` is the base model's name or an adapter id; the official `openai` client works as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.deps import GenerationServiceDep
from server.engine import Delta
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from server.routers import ERRORS
from server.routers.generate import usage
from server.streaming import sse_response

router = APIRouter(tags=["openai"], responses=ERRORS)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    request: ChatCompletionRequest, service: GenerationServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI chat completion with the base model or an adapter (`model`)."""
    lora = await service.lora(service.adapter_for_model(request.model))
    ids = service.chat_prompt(request.messages)
    options = service.options(request, len(ids), request.max_completion_tokens)
    if request.stream:
        deltas = await service.stream(ids, options, lora)
        return sse_response(chat_chunks(deltas, request.model))
    c = await service.complete(ids, options, lora)
    choice = ChatCompletionResponseChoice(
        message=ChatMessage(role="assistant", content=c.text), finish_reason=c.finish_reason
    )
    return ChatCompletionResponse(
        model=request.model, choices=[choice], usage=usage(c.prompt_tokens, len(c.token_ids))
    )


async def chat_chunks(
    deltas: AsyncIterator[Delta], model: str
) -> AsyncIterator[ChatCompletionStreamResponse]:
    """OpenAI's chunks: the role first, then content deltas, the finish reason on the last."""
    rid, created = new_id("chatcmpl"), now()

    def chunk(delta: DeltaMessage, finish: FinishReason = None) -> ChatCompletionStreamResponse:
        choice = ChatCompletionResponseStreamChoice(delta=delta, finish_reason=finish)
        return ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[choice])

    yield chunk(DeltaMessage(role="assistant", content=""))
    async for d in deltas:
        yield chunk(DeltaMessage(content=d.text), d.finish_reason)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(
    request: CompletionRequest, service: GenerationServiceDep
) -> CompletionResponse | StreamingResponse:
    """OpenAI text completion of a raw prompt (no chat template)."""
    lora = await service.lora(service.adapter_for_model(request.model))
    ids = service.maker.tokenize(request.prompt)
    options = service.options(request, len(ids))
    if request.stream:
        deltas = await service.stream(ids, options, lora)
        rid, created = new_id("cmpl"), now()
        return sse_response(
            CompletionStreamResponse(
                id=rid,
                created=created,
                model=request.model,
                choices=[CompletionResponseChoice(text=d.text, finish_reason=d.finish_reason)],
            )
            async for d in deltas
        )
    c = await service.complete(ids, options, lora)
    choice = CompletionResponseChoice(text=c.text, finish_reason=c.finish_reason)
    return CompletionResponse(
        model=request.model, choices=[choice], usage=usage(c.prompt_tokens, len(c.token_ids))
    )


@router.get("/v1/models")
async def models(service: GenerationServiceDep) -> ModelList:
    """The base model and every adapter in the store (each usable as `model`)."""
    base = service.adapters.base_name
    cards = [ModelCard(id=base)]
    cards += [
        ModelCard(id=a.id, created=a.created_at, parent=base)
        for a in sorted(await service.adapters.list(), key=lambda a: a.created_at)
    ]
    return ModelList(data=cards)

"""Server-sent events as OpenAI streams them: `data: <json>` lines, an error line if the stream
fails after it started, and `data: [DONE]` at the end either way."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.errors import ServerError, error_response, internal_error

log = logging.getLogger(__name__)


async def sse_lines(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {event.model_dump_json(exclude_none=False)}\n\n"
    except ServerError as e:
        yield f"data: {error_response(e).model_dump_json()}\n\n"
    except Exception:
        log.exception("stream failed")
        yield f"data: {internal_error().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(sse_lines(events), media_type="text/event-stream")

"""OpenAI's chat completions and completions, answered by vLLM's own OpenAI layer.

The clients people use (the `openai` package, LangChain, guidellm) are built against vLLM's
OpenAI server: its protocol, sampling options, logprobs, structured outputs and streaming.
Reusing that layer gives them all of it, with no second wire format of ours to keep in step.
Our part: the `model` of a request may be an adapter id, which the service resolves from the
store into a LoRA folder that this layer then knows by that name.

It depends on vLLM's entrypoint modules, so vLLM is pinned (pyproject.toml); the integration
tests drive it with the real clients.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import BaseModel, ModelWrapValidatorHandler, model_validator
from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
from vllm.entrypoints.openai.completion import protocol as completion_protocol
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import VLLMClientError

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.engine import LoRA

# with_cancellation: a route so decorated is cancelled when its client goes away, so a request
# nobody waits for stops generating (vLLM's own routes use it; so do ours).
__all__ = [
    "with_cancellation",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ErrorResponse",
    "OpenAIResult",
    "VllmOpenAI",
]


class RefusalsInvalid(BaseModel):
    """vLLM's request classes check a body in validators that run before its fields' types are
    checked, and refuse it with vLLM's own errors or fail on a field of the wrong type with a
    TypeError; pydantic takes neither for a validation error (they would pass it as 500s). They
    are functions of the body alone, so whatever they raise, the body is why: a 422."""

    @model_validator(mode="wrap")
    @classmethod
    def _refusals_invalid(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except (ValueError, AssertionError):  # what pydantic reports as a validation error
            raise
        except Exception as e:
            what = type(e).__name__
            message = str(e) if isinstance(e, VLLMClientError) else f"vLLM cannot read it ({what})"
            raise ValueError(message) from e


class ChatCompletionRequest(chat_protocol.ChatCompletionRequest, RefusalsInvalid):
    """OpenAI's chat completion request, as vLLM's OpenAI server takes it."""


class CompletionRequest(completion_protocol.CompletionRequest, RefusalsInvalid):
    """OpenAI's completion request, as vLLM's OpenAI server takes it."""


# What a handler returns: an error, a whole response, or the lines of an event stream.
OpenAIResult = ErrorResponse | BaseModel | AsyncGenerator[str, None]


class VllmOpenAI:
    """vLLM's chat and completion handlers on a running engine, plus the LoRAs they may use."""

    def __init__(self, state: Any) -> None:
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._models = state.openai_serving_models

    @classmethod
    async def start(cls, llm: AsyncLLM, model_path: Path, served_name: str) -> VllmOpenAI:
        """vLLM's OpenAI server state with `vllm serve`'s defaults."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        flags = ["--model", str(model_path), "--served-model-name", served_name]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(flags)
        state = State()
        await init_app_state(llm, state, args, supported_tasks=("generate",))
        return cls(state)

    async def chat(
        self, request: ChatCompletionRequest, raw: Request | None = None
    ) -> OpenAIResult:
        return await answered(self._chat.create_chat_completion(request, raw))

    async def complete(
        self, request: CompletionRequest, raw: Request | None = None
    ) -> OpenAIResult:
        return await answered(self._completion.create_completion(request, raw))

    def add(self, lora: LoRA) -> None:
        """Requests naming `lora.name` as their model run with it."""
        from vllm.lora.request import LoRARequest

        self._models.lora_requests[lora.name] = LoRARequest(lora.name, lora.int_id, str(lora.path))

    def remove(self, name: str) -> None:
        self._models.lora_requests.pop(name, None)


async def answered(call: Awaitable[OpenAIResult]) -> OpenAIResult:
    """A handler's result, or its failure as vLLM's server reports it: a request vLLM refuses
    (e.g. `n` > 1 with greedy sampling) is a 400 with vLLM's message."""
    try:
        return await call
    except Exception as e:
        return create_error_response(e)

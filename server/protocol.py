"""The wire format, typed once; the server and `clients/` both import it.

OpenAI's chat completions and completions are served by vLLM's OpenAI layer with vLLM's own
request classes (server/vllm_openai.py); the OpenAI classes here are the errors, the model list,
and the typed client's view of a chat completion. Our own additions (adapt, generate, adapter
metadata) follow.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

ADAPTER_ID_PATTERN = r"^ga-[0-9a-f]{32}$"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    """Unknown request fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


# --- OpenAI: errors, models -------------------------------------------------------------------


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "genadapter"
    parent: str | None = Field(None, description="for an adapter: the base model it adapts")


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _encodable(text: str) -> str:
    """JSON can carry a lone surrogate (\\ud800) that no tokenizer can encode: refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode at character {e.start}: a lone surrogate") from e
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # any text a tokenizer will read


def _no_empty_stop(stop: str | list[str] | None) -> str | list[str] | None:
    if stop == "" or (isinstance(stop, list) and "" in stop):
        raise ValueError("a stop string must not be empty")
    return stop


# "abort": the engine stopped the request (as vLLM's own OpenAI server passes it through).
FinishReason = Literal["stop", "length", "abort"] | None


class SamplingFields(OpenAIModel):
    """Sampling options shared by chat, completions and generate (OpenAI's names)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Annotated[str | list[str] | None, AfterValidator(_no_empty_stop)] = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="a 64-bit integer")
    ignore_eos: bool = Field(False, description="go on past the end of text (as vLLM's)")
    stream: bool = False


# --- OpenAI: chat completions -----------------------------------------------------------------


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class ChatCompletionResponseChoice(OpenAIModel):
    index: int = 0
    message: ChatMessage
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


# --- Our additions: adapters ------------------------------------------------------------------


AdapterId = Annotated[str, Field(pattern=ADAPTER_ID_PATTERN)]
INPUTS = ("context", "messages", "documents", "compose")


class AdaptRequest(BaseModel):
    """Exactly one of `context`, `messages`, `documents`, `compose`; `parent` extends an
    adapter with a context."""

    model_config = ConfigDict(extra="forbid")

    context: Text | None = Field(None, description="a text to adapt to")
    messages: list[ChatMessage] | None = Field(None, description="a chat history")
    documents: list[Text] | None = Field(None, description="documents, read in order")
    compose: list[AdapterId] | None = Field(
        None,
        min_length=2,
        description="adapters of one generator to add up, in any order, without re-reading text",
    )
    parent: AdapterId | None = Field(None, description="adapter to extend with this context")

    @model_validator(mode="after")
    def exactly_one_input(self) -> AdaptRequest:
        given = [k for k in INPUTS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(INPUTS)} (got {given or 'none'})")
        if self.compose is not None:
            if self.parent is not None:
                raise ValueError("compose takes no parent: list the parent among the adapters")
            if len(set(self.compose)) != len(self.compose):
                raise ValueError("compose lists an adapter twice")
        return self


class AdapterInfo(BaseModel):
    """What the store keeps beside an adapter's bytes (also GET /v1/adapters/{id})."""

    id: str
    object: Literal["adapter"] = "adapter"
    created_at: int
    tokens: int = Field(description="context tokens read, parents included")
    base_model: str
    fingerprint: str = Field(description="generator + base model that made it")
    lora_rank: int
    parent: str | None = None
    composed: list[str] | None = Field(None, description="the adapters it adds up, if composed")
    tenant: str = Field("", description="whose it is (the API key's tenant); only they see it")
    sha256: str = Field("", description="checksum of its stored bytes, checked on every read")


class AdaptResponse(BaseModel):
    adapter_id: str
    tokens: int
    cached: bool = Field(description="true: an existing adapter, the generator did not run")
    created_at: int
    base_model: str
    parent: str | None = None
    composed: list[str] | None = Field(None, description="the adapters it adds up, if composed")
    seconds: float = Field(description="server-side time for this request")


class DeleteResponse(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


class GenerateRequest(SamplingFields):
    """The prompt is sent as one user turn through the base model's chat template."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(None, description="None: the base model alone")
    prompt: Text


class GenerateResponse(BaseModel):
    id: str
    adapter_id: str | None
    text: str
    token_ids: list[int] = Field(description="the generated tokens (as vLLM's return_token_ids)")
    finish_reason: FinishReason = None
    usage: UsageInfo


class GenerateStreamResponse(BaseModel):
    id: str
    adapter_id: str | None
    text: str = Field(description="new text since the previous event")
    finish_reason: FinishReason = None


class HealthResponse(BaseModel):
    ready: bool
    role: str = Field(  # a default, so a client still reads a server from before roles
        "all", description="all, adapt (generator only) or generate (engine only)"
    )
    engine: str = Field(description="'ok' or why not")
    store: str = Field(description="'ok' or why not")

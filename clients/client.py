"""A small typed client: the server's own protocol models, over httpx.

client = GenerativeAdapterClient("http://127.0.0.1:8000")
adapter = client.adapt(context=open("doc.txt").read())
print(client.generate(adapter.adapter_id, "What is the capital?").text)
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from server.protocol import (
    AdapterInfo,
    AdaptRequest,
    AdaptResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeleteResponse,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelList,
)

T = TypeVar("T", bound=BaseModel)


class ApiError(Exception):
    """The server answered with an error; `error` is its OpenAI-shaped body."""

    def __init__(self, status: int, error: ErrorInfo) -> None:
        super().__init__(f"{status} {error.type}: {error.message}")
        self.status = status
        self.error = error


class GenerativeAdapterClient:
    """Blocking client; thread-safe (one httpx.Client), usable as a context manager."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> GenerativeAdapterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, out: type[T], body: BaseModel | None = None) -> T:
        json = None if body is None else body.model_dump(exclude_none=True)
        r = self.http.request(method, path, json=json)
        if r.status_code >= 400:
            try:
                error = ErrorResponse.model_validate(r.json()).error
            except (ValueError, ValidationError):
                error = ErrorInfo(message=r.text, type="http_error", code=r.status_code)
            raise ApiError(r.status_code, error)
        return out.model_validate(r.json())

    def adapt(
        self,
        context: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        documents: list[str] | None = None,
        compose: list[str] | None = None,
        parent: str | None = None,
    ) -> AdaptResponse:
        """Make (or find) the adapter of one of: a text, a chat history, documents, or
        adapters to compose."""
        msgs = None if messages is None else [ChatMessage.model_validate(m) for m in messages]
        request = AdaptRequest(
            context=context, messages=msgs, documents=documents, compose=compose, parent=parent
        )
        return self._call("POST", "/v1/adapt", AdaptResponse, request)

    def generate(self, adapter_id: str | None, prompt: str, **sampling: Any) -> GenerateResponse:
        """Answer `prompt` with an adapter (None: the base model); sampling as OpenAI's."""
        request = GenerateRequest(adapter_id=adapter_id, prompt=prompt, **sampling)
        return self._call("POST", "/v1/generate", GenerateResponse, request)

    def chat(
        self, model: str, messages: list[dict[str, str]], **sampling: Any
    ) -> ChatCompletionResponse:
        """OpenAI chat completion; `model` is an adapter id or the base model's name."""
        request = ChatCompletionRequest(
            model=model,
            messages=[ChatMessage.model_validate(m) for m in messages],
            **sampling,
        )
        return self._call("POST", "/v1/chat/completions", ChatCompletionResponse, request)

    def adapter(self, adapter_id: str) -> AdapterInfo:
        return self._call("GET", f"/v1/adapters/{adapter_id}", AdapterInfo)

    def delete(self, adapter_id: str) -> DeleteResponse:
        return self._call("DELETE", f"/v1/adapters/{adapter_id}", DeleteResponse)

    def models(self) -> ModelList:
        return self._call("GET", "/v1/models", ModelList)

    def health(self) -> HealthResponse:
        """Readiness; a server that is up but not ready answers 503 with the same body."""
        return HealthResponse.model_validate(self.http.get("/health").json())

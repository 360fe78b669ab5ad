"""One router per resource; each route only translates between HTTP and the services."""

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from server.protocol import ErrorResponse

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "unknown adapter or model",
        409: "stored adapter made for another setup",
        413: "context over the token limit",
        422: "invalid input",
        503: "adapter store or engine unavailable",
    }.items()
}


def post_with_alias(
    router: APIRouter, path: str, endpoint: Callable[..., Any], response_model: type
) -> None:
    """POST `path` (/v1/...) and the product's unversioned alias of it, one handler."""
    router.add_api_route(path, endpoint, methods=["POST"], response_model=response_model)
    alias = path.removeprefix("/v1")
    router.add_api_route(
        alias,
        endpoint,
        methods=["POST"],
        response_model=response_model,
        operation_id=f"{endpoint.__name__}_alias",
        summary=f"{endpoint.__name__.capitalize()} (alias of {path})",
    )

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
        501: "not served by this server's role (GENADAPTER_ROLE)",
        503: "adapter store or engine unavailable",
    }.items()
}


def post_with_alias(
    router: APIRouter, path: str, endpoint: Callable[..., Any], response_model: type
) -> None:
    """POST `path` (/v1/...) and the product's unversioned alias of it, one handler. The model
    documents the answer; it is not enforced, as a handler cancelled by its client's going away
    returns nothing."""
    for route, suffix in ((path, ""), (path.removeprefix("/v1"), "_alias")):
        router.add_api_route(
            route,
            endpoint,
            methods=["POST"],
            response_model=None,
            responses={200: {"model": response_model}},
            operation_id=f"{endpoint.__name__}{suffix}",
            summary=f"{endpoint.__name__.capitalize()}{f' (alias of {path})' if suffix else ''}",
        )

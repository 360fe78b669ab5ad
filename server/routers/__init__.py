"""One router per resource; each route only translates between HTTP and the services."""

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

"""The request body size limit, enforced before anything reads the body (a 413)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ServerError, http_response


class BodyTooLarge(ServerError):
    status, type = 413, "invalid_request_error"


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused from its Content-Length at once,
    or, sent without one, as soon as the bytes received pass the limit: the 413 goes out and the
    app sees its client leave (what it would then send is dropped)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self.refuse(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await self.refuse(scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading: its client is gone
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    def error(self) -> BodyTooLarge:
        return BodyTooLarge(
            f"request body over {self.limit} bytes (GENADAPTER_MAX_BODY_BYTES)", param="body"
        )

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await http_response(self.error())(scope, receive, send)

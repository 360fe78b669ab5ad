"""API keys: each maps to a tenant, and a tenant sees only its own adapters.

Keys come from `GENADAPTER_API_KEYS` (comma-separated `tenant:key` pairs) and/or a keys file
(one `tenant key` pair per line, `#` comments). With no key configured the server runs in a
single-tenant development mode: every caller is the tenant "", as without tenancy.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ServerError, http_response


class Unauthorized(ServerError):
    status, type = 401, "authentication_error"


class ApiKeys:
    """The configured keys; `tenant(authorization)` is the caller's tenant or a 401."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        for tenant, key in pairs:
            if not tenant or not key:
                raise ValueError("API keys: each entry needs a tenant and a key")
        self._pairs = [(tenant, key.encode()) for tenant, key in pairs]

    @classmethod
    def load(cls, keys: str | None, keys_file: Path | None) -> ApiKeys:
        pairs = [tuple(p.strip().split(":", 1)) for p in (keys or "").split(",") if p.strip()]
        if keys_file is not None:
            for line in keys_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    pairs.append(tuple(line.split(None, 1)))
        if any(len(p) != 2 for p in pairs):
            raise ValueError("API keys: write each as tenant:key (file: tenant key per line)")
        return cls([(t.strip(), k.strip()) for t, k in pairs])

    @property
    def enabled(self) -> bool:
        return bool(self._pairs)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of `Authorization: Bearer <key>`; every key is compared in constant time."""
        if not self.enabled:
            return ""
        scheme, _, key = (authorization or "").partition(" ")
        given = key.strip().encode()
        found = None
        for tenant, expected in self._pairs:
            if hmac.compare_digest(given, expected) and scheme.lower() == "bearer":
                found = tenant
        if found is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        return found


class KeyRequired:
    """ASGI middleware: the paths the app serves outside its routes' dependencies (FastAPI's
    /docs, /redoc and /openapi.json) or in a router shared with /health (/metrics) need a key
    too; every other route checks its own (deps.get_tenant)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, paths: set[str]) -> None:
        self.app = app
        self.keys = keys
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            try:
                self.keys.tenant(Headers(scope=scope).get("authorization"))
            except Unauthorized as e:
                await http_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)

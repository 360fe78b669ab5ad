"""Per-tenant limits: adapts running at once, and requests per minute (a token bucket).

Counted in this process: replicas behind a load balancer each enforce them.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator

from server.errors import TooManyRequests


class TenantLimits:
    def __init__(self, adapts: int, requests_per_minute: int) -> None:
        self.adapts = adapts  # adapts of one tenant running at once
        self.rate = requests_per_minute / 60  # tokens per second; 0: no rate limit
        self._running: defaultdict[str, int] = defaultdict(int)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)

    def request(self, tenant: str) -> None:
        """Spend one of the tenant's requests, or refuse with when the next one is allowed."""
        if not self.rate:
            return
        capacity = self.rate * 60
        now = time.monotonic()
        tokens, then = self._buckets.get(tenant, (capacity, now))
        tokens = min(capacity, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[tenant] = (tokens, now)
            raise TooManyRequests(
                f"over {capacity:g} requests a minute (GENADAPTER_TENANT_REQUESTS_PER_MINUTE)",
                retry_after_s=(1 - tokens) / self.rate,
            )
        self._buckets[tenant] = (tokens - 1, now)

    @contextlib.asynccontextmanager
    async def adapting(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of the tenant's adapt slots for the duration, or refuse at once."""
        if self._running[tenant] >= self.adapts:
            raise TooManyRequests(
                f"{self.adapts} adapts of yours are already running (GENADAPTER_TENANT_ADAPTS)",
                retry_after_s=1,
            )
        self._running[tenant] += 1
        try:
            yield
        finally:
            self._running[tenant] -= 1

"""Per-tenant limits: adapts running at once, requests per minute (a token bucket), adapters
stored.

The first two are counted in this process: replicas behind a load balancer each enforce them.
Adapters stored are counted in the store, which replicas share.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator

from server.errors import TooManyRequests
from server.settings import Settings
from server.store import AdapterStore


class TenantLimits:
    def __init__(self, settings: Settings) -> None:
        self.adapts = settings.tenant_adapts  # adapts of one tenant running at once
        self.rate = settings.tenant_requests_per_minute / 60  # tokens per second; 0: no limit
        self.adapters = settings.tenant_adapters  # adapters one tenant stores; 0: no limit
        self.ttl_s = settings.adapter_ttl_s
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

    async def new_adapter(self, tenant: str, store: AdapterStore) -> None:
        """Refuse a new adapter to a tenant that stores `adapters` already (cache hits never
        get here). Counted as the new one starts, so adapts of the tenant running at that
        moment may each pass it by one."""
        if not self.adapters:
            return
        stored = await store.list(tenant)  # oldest first
        if len(stored) >= self.adapters:
            raise TooManyRequests(
                f"you store {len(stored)} adapters, the limit is {self.adapters} "
                "(GENADAPTER_TENANT_ADAPTERS): delete one (DELETE /v1/adapters/{id}) to adapt "
                "a new context",
                # TTLs slide with every use, so no listing tells when one lapses; the oldest's
                # creation plus the TTL is the earliest any can lapse by itself.
                retry_after_s=max(1, stored[0].created_at + self.ttl_s - time.time()),
            )

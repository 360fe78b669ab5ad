"""Where adapters live between requests: Redis (shared by server processes) or process memory.

An entry is three values: the PEFT safetensors bytes (what vLLM loads), the raw generator state
(what extending needs) and the metadata. All are written together after the generator succeeded,
read together, and an entry missing any of them reads as missing (Redis may evict one key under
`maxmemory-policy allkeys-lru`). TTLs slide: every read extends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError

from server.errors import StoreUnavailable
from server.protocol import AdapterInfo
from server.settings import Settings

PARTS = ("peft", "state", "meta")


@dataclass(frozen=True)
class StoredAdapter:
    info: AdapterInfo
    peft: bytes  # adapter_model.safetensors
    state: bytes  # Adapter.state_bytes(): raw S and token count, to extend

    @property
    def nbytes(self) -> int:
        return len(self.peft) + len(self.state) + len(self.info.model_dump_json())


Factory = Callable[[], Awaitable[StoredAdapter]]


class AdapterStore(ABC):
    """The interface both stores implement (and the tests exercise identically)."""

    @abstractmethod
    async def get(self, adapter_id: str) -> StoredAdapter | None:
        """The whole entry, or None; slides its TTL."""

    @abstractmethod
    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        """The metadata, or None if any part is missing; slides the TTL of the whole entry."""

    @abstractmethod
    async def put(self, adapter: StoredAdapter) -> None: ...

    @abstractmethod
    async def delete(self, adapter_id: str) -> bool:
        """True if something was deleted."""

    @abstractmethod
    async def list(self) -> list[AdapterInfo]: ...

    @abstractmethod
    def lock(self, adapter_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Mutual exclusion for one adapter id (across processes for a shared store)."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be used now."""

    async def close(self) -> None:
        return None

    async def get_or_create(self, adapter_id: str, factory: Factory) -> tuple[StoredAdapter, bool]:
        """The stored entry, else `factory()`'s result, stored; True if this call created it.

        Single flight: concurrent callers for one id wait on the lock and then find the entry,
        so the factory runs once. A failing factory stores nothing.
        """
        if (hit := await self.get(adapter_id)) is not None:
            return hit, False
        async with self.lock(adapter_id):
            if (hit := await self.get(adapter_id)) is not None:
                return hit, False
            adapter = await factory()
            await self.put(adapter)
            return adapter, True


class MemoryStore(AdapterStore):
    """In-process store with a byte budget: least recently used entries go first."""

    def __init__(self, budget_bytes: int, ttl_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[StoredAdapter, float]] = OrderedDict()
        self._mutex = threading.Lock()  # the dict is also read from worker threads
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _live(self, adapter_id: str) -> StoredAdapter | None:
        """Under the mutex: the entry if present and not expired; slides its TTL."""
        item = self._entries.get(adapter_id)
        if item is None:
            return None
        adapter, expires = item
        now = time.monotonic()
        if expires <= now:
            self._drop(adapter_id)
            return None
        self._entries[adapter_id] = (adapter, now + self.ttl_s)
        self._entries.move_to_end(adapter_id)
        return adapter

    def _drop(self, adapter_id: str) -> bool:
        item = self._entries.pop(adapter_id, None)
        if item is not None:
            self.nbytes -= item[0].nbytes
        return item is not None

    async def get(self, adapter_id: str) -> StoredAdapter | None:
        with self._mutex:
            return self._live(adapter_id)

    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        adapter = await self.get(adapter_id)
        return None if adapter is None else adapter.info

    async def put(self, adapter: StoredAdapter) -> None:
        with self._mutex:
            self._drop(adapter.info.id)
            self._entries[adapter.info.id] = (adapter, time.monotonic() + self.ttl_s)
            self.nbytes += adapter.nbytes
            while self.nbytes > self.budget_bytes and len(self._entries) > 1:
                self._drop(next(iter(self._entries)))

    async def delete(self, adapter_id: str) -> bool:
        with self._mutex:
            return self._drop(adapter_id)

    async def list(self) -> list[AdapterInfo]:
        now = time.monotonic()
        with self._mutex:
            return [a.info for a, expires in self._entries.values() if expires > now]

    @contextlib.asynccontextmanager
    async def lock(self, adapter_id: str) -> AsyncIterator[None]:
        lock = self._locks.get(adapter_id)
        if lock is None:
            lock = self._locks[adapter_id] = asyncio.Lock()
        async with lock:
            yield

    async def ping(self) -> None:
        return None


class RedisStore(AdapterStore):
    """Redis store shared by server processes; binary values, sliding TTL, a lock per new id."""

    def __init__(
        self, url: str, ttl_s: float, prefix: str = "genadapter", lock_timeout_s: float = 300
    ) -> None:
        self.url = url
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self.lock_timeout_s = lock_timeout_s
        # Binary-safe (no decode_responses); fail fast so a request gets 503 instead of hanging.
        self.redis = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=2,
            socket_timeout=10,
            retry=Retry(NoBackoff(), retries=1),
        )

    def _key(self, adapter_id: str, part: str) -> str:
        return f"{self.prefix}:adapter:{adapter_id}:{part}"

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except RedisError as e:
            raise StoreUnavailable(f"adapter store (Redis at {self.url}) unavailable: {e}") from e

    async def get(self, adapter_id: str) -> StoredAdapter | None:
        with self._reachable():
            async with self.redis.pipeline(transaction=False) as p:
                for part in PARTS:
                    p.getex(self._key(adapter_id, part), px=self.ttl_ms)
                peft, state, meta = await p.execute()
            if peft is None or state is None or meta is None:
                await self._forget_partial(adapter_id, (peft, state, meta))
                return None
        return StoredAdapter(AdapterInfo.model_validate_json(meta), peft, state)

    async def _forget_partial(self, adapter_id: str, values: tuple[object, ...]) -> None:
        """An entry with an evicted part is useless: drop the rest too."""
        if any(v is not None for v in values):
            await self.redis.delete(*(self._key(adapter_id, part) for part in PARTS))

    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        with self._reachable():
            async with self.redis.pipeline(transaction=False) as p:
                p.pexpire(self._key(adapter_id, "peft"), self.ttl_ms)
                p.pexpire(self._key(adapter_id, "state"), self.ttl_ms)
                p.getex(self._key(adapter_id, "meta"), px=self.ttl_ms)
                peft, state, meta = await p.execute()
            if not (peft and state and meta):
                await self._forget_partial(adapter_id, (peft or None, state or None, meta))
                return None
        return AdapterInfo.model_validate_json(meta)

    async def put(self, adapter: StoredAdapter) -> None:
        meta = adapter.info.model_dump_json()
        values = {"peft": adapter.peft, "state": adapter.state, "meta": meta}
        with self._reachable():
            async with self.redis.pipeline(transaction=True) as p:  # MULTI/EXEC: all or nothing
                for part in PARTS:
                    p.set(self._key(adapter.info.id, part), values[part], px=self.ttl_ms)
                await p.execute()

    async def delete(self, adapter_id: str) -> bool:
        with self._reachable():
            return bool(await self.redis.delete(*(self._key(adapter_id, p) for p in PARTS)))

    async def list(self) -> list[AdapterInfo]:
        with self._reachable():
            keys = [k async for k in self.redis.scan_iter(match=self._key("*", "meta"))]
            metas = await self.redis.mget(keys) if keys else []
        return [AdapterInfo.model_validate_json(m) for m in metas if m is not None]

    @contextlib.asynccontextmanager
    async def lock(self, adapter_id: str) -> AsyncIterator[None]:
        # redis-py's Lock: SET NX PX with a random token, polled; released only by its owner.
        lock = self.redis.lock(
            self._key(adapter_id, "lock"),
            timeout=self.lock_timeout_s,
            sleep=0.05,
            blocking_timeout=self.lock_timeout_s,
            thread_local=False,
        )
        with self._reachable():
            acquired = await lock.acquire()
        if not acquired:
            raise StoreUnavailable(f"timed out waiting for another server to create {adapter_id}")
        try:
            yield
        finally:
            with contextlib.suppress(LockError, RedisError):  # expired or Redis gone: it lapses
                await lock.release()

    async def ping(self) -> None:
        with self._reachable():
            await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(settings: Settings) -> AdapterStore:
    """RedisStore for a URL, else the in-process MemoryStore (the embedded default)."""
    if settings.redis_url:
        return RedisStore(
            settings.redis_url, settings.adapter_ttl_s, settings.redis_prefix,
            settings.lock_timeout_s,
        )
    return MemoryStore(settings.memory_store_bytes, settings.adapter_ttl_s)

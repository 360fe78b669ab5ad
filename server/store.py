"""Where adapters live between requests: Redis (shared by server processes) or process memory.

An entry is four values: the PEFT weights and config (what vLLM loads), the raw generator state
(what extending needs) and the metadata. All are written together after the generator succeeded,
read together, and an entry missing any of them reads as missing (Redis may evict one key under
`maxmemory-policy allkeys-lru`). TTLs slide: every read extends them.

On Redis Cluster the keys of one adapter (its parts and its lock) carry the adapter id as a hash
tag, so they live in one slot: one transaction writes them, one node holds its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from generator.maker import MadeAdapter
from server.errors import StoreUnavailable
from server.protocol import AdapterInfo
from server.settings import Settings

log = logging.getLogger(__name__)

PARTS = ("peft", "config", "state", "meta")
PROBE_TTL_MS = 10_000  # the health probe's key outlives no check by much
PROBE_TIMEOUT_S = 2  # a Redis paused by CLIENT PAUSE blocks writes rather than refusing them
FAILED_PUT_SHOWN_S = 60  # how long /health reports an adapter the store could not take
PIPELINE_ERROR = " of pipeline caused error: "  # how redis-py annotates a pipeline's errors


def digest(adapter: MadeAdapter) -> str:
    """SHA-256 of an adapter's three byte parts: stored in its metadata, checked on every read."""
    h = hashlib.sha256()
    for part in (adapter.peft, adapter.peft_config.encode(), adapter.state):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredAdapter:
    info: AdapterInfo
    adapter: MadeAdapter

    def intact(self) -> bool:
        """Its bytes are the ones its metadata vouches for (entries without a checksum pass)."""
        return not self.info.sha256 or self.info.sha256 == digest(self.adapter)

    @property
    def nbytes(self) -> int:
        a = self.adapter
        return len(a.peft) + len(a.peft_config) + len(a.state) + len(self.info.model_dump_json())


class Listed(NamedTuple):
    """What the model list shows of an adapter."""

    id: str
    created_at: int


Factory = Callable[[], Awaitable[StoredAdapter]]


class AdapterStore(ABC):
    """The interface both stores implement (and the tests exercise identically)."""

    async def get(self, adapter_id: str) -> StoredAdapter | None:
        """The whole entry, or None; slides its TTL. An entry whose bytes do not match its
        checksum is removed and reported, never handed on."""
        entry = await self._read(adapter_id)
        if entry is not None and not entry.intact():
            log.error(
                "adapter %s: its stored bytes do not match their checksum; removed", adapter_id
            )
            await self.delete(adapter_id)
            return None
        return entry

    @abstractmethod
    async def _read(self, adapter_id: str) -> StoredAdapter | None:
        """The whole entry as stored, or None; slides its TTL."""

    @abstractmethod
    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        """The metadata, or None if any part is missing; slides the TTL of the whole entry."""

    @abstractmethod
    async def put(self, adapter: StoredAdapter) -> None: ...

    @abstractmethod
    async def delete(self, adapter_id: str) -> bool:
        """True if something was deleted."""

    @abstractmethod
    async def list(self, tenant: str) -> list[Listed]:
        """Every live adapter of `tenant`, oldest first."""

    @abstractmethod
    def lock(self, adapter_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Mutual exclusion for one adapter id (across processes for a shared store)."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be used now."""

    async def close(self) -> None:
        return None

    async def get_or_create(self, adapter_id: str, factory: Factory) -> tuple[AdapterInfo, bool]:
        """The entry's metadata, else `factory()`'s result, stored; True if this call created it.

        A hit reads the metadata only (`touch`: its weights stay where they are, so a cached
        adapt costs the same for any adapter size); the checksum is checked when the weights
        are read to be used. Single flight: concurrent callers for one id wait on the lock and
        then find the entry, so the factory runs once. A failing factory stores nothing.
        """
        if (hit := await self.touch(adapter_id)) is not None:
            return hit, False
        async with self.lock(adapter_id):
            if (hit := await self.touch(adapter_id)) is not None:
                return hit, False
            adapter = await factory()
            await self.put(adapter)
            return adapter.info, True


class MemoryStore(AdapterStore):
    """In-process store with a byte budget: least recently used entries go first."""

    def __init__(self, budget_bytes: int, ttl_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[StoredAdapter, float]] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _live(self, adapter_id: str) -> StoredAdapter | None:
        """The entry if present and not expired; slides its TTL."""
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

    async def _read(self, adapter_id: str) -> StoredAdapter | None:
        return self._live(adapter_id)

    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        adapter = self._live(adapter_id)
        return None if adapter is None else adapter.info

    async def put(self, adapter: StoredAdapter) -> None:
        self._drop(adapter.info.id)
        self._entries[adapter.info.id] = (adapter, time.monotonic() + self.ttl_s)
        self.nbytes += adapter.nbytes
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            self._drop(next(iter(self._entries)))

    async def delete(self, adapter_id: str) -> bool:
        return self._drop(adapter_id)

    async def list(self, tenant: str) -> list[Listed]:
        now = time.monotonic()
        entries = self._entries.values()
        live = [a.info for a, expires in entries if expires > now and a.info.tenant == tenant]
        return sorted((Listed(i.id, i.created_at) for i in live), key=lambda x: x.created_at)

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
    """Redis (or Redis Cluster) store shared by server processes; binary values, sliding TTL, a
    lock per new id.

    A sorted set per tenant (score: creation time) indexes its adapters, so listing reads that
    one key and the entries it names, never the keyspace (on a cluster: never every node's).
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        prefix: str = "genadapter",
        lock_timeout_s: float = 30,
        cluster: bool = False,
    ) -> None:
        self.url = redacted(url)  # for messages: never the password
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self.lock_timeout_s = lock_timeout_s
        self._probe_key = f"{prefix}:health"
        self._failed_put: tuple[float, str] | None = None  # when and why the last put failed
        # PING goes to one node of a cluster unless told otherwise
        self._every_node = {"target_nodes": RedisCluster.ALL_NODES} if cluster else {}
        # Binary-safe (no decode_responses); fail fast so a request gets 503 instead of hanging.
        client = RedisCluster if cluster else aioredis.Redis
        self.redis: aioredis.Redis | RedisCluster = client.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=2,
            socket_timeout=10,
            retry=Retry(NoBackoff(), retries=1),
        )

    def _key(self, adapter_id: str, part: str) -> str:
        return f"{self.prefix}:adapter:{{{adapter_id}}}:{part}"

    def _index_key(self, tenant: str) -> str:
        """Tagged with the tenant, so a per-tenant key added later shares its slot."""
        return f"{self.prefix}:tenant:{{{tenant}}}:adapters"

    @contextlib.contextmanager
    def _reachable(self, failure: str = "unavailable") -> Iterator[None]:
        try:
            yield
        except RedisError as e:
            message = f"adapter store (Redis at {self.url}) {failure}: {reason(e)}"
            raise StoreUnavailable(message) from e

    async def _read(self, adapter_id: str) -> StoredAdapter | None:
        with self._reachable():
            async with self.redis.pipeline(transaction=False) as p:
                for part in PARTS:
                    p.getex(self._key(adapter_id, part), px=self.ttl_ms)
                peft, config, state, meta = await p.execute()
            if peft is None or config is None or state is None or meta is None:
                await self._forget_partial(adapter_id, (peft, config, state, meta))
                return None
        info = AdapterInfo.model_validate_json(meta)
        return StoredAdapter(info, MadeAdapter(peft, config.decode(), state, info.tokens))

    async def _forget_partial(self, adapter_id: str, values: tuple[object, ...]) -> None:
        """An entry with an evicted part is useless: drop the rest too."""
        if any(v is not None for v in values):
            await self.delete(adapter_id)

    async def touch(self, adapter_id: str) -> AdapterInfo | None:
        with self._reachable():
            async with self.redis.pipeline(transaction=False) as p:
                for part in PARTS[:-1]:
                    p.pexpire(self._key(adapter_id, part), self.ttl_ms)
                p.getex(self._key(adapter_id, "meta"), px=self.ttl_ms)
                *alive, meta = await p.execute()
            if not all(alive) or meta is None:
                await self._forget_partial(adapter_id, (*(a or None for a in alive), meta))
                return None
        return AdapterInfo.model_validate_json(meta)

    async def put(self, adapter: StoredAdapter) -> None:
        """The entry in one transaction (one slot), then its tenant's index: an entry written
        but not indexed is only unlisted, an indexed one not written is dropped by listing."""
        a, aid = adapter.adapter, adapter.info.id
        values: dict[str, bytes | str] = {
            "peft": a.peft,
            "config": a.peft_config,
            "state": a.state,
            "meta": adapter.info.model_dump_json(),
        }
        try:
            with self._reachable("could not store the adapter"):
                async with self.redis.pipeline(transaction=True) as p:  # MULTI/EXEC: all or none
                    for part in PARTS:
                        p.set(self._key(aid, part), values[part], px=self.ttl_ms)
                    await p.execute()
                await self.redis.zadd(
                    self._index_key(adapter.info.tenant), {aid: adapter.info.created_at}
                )
        except StoreUnavailable as e:
            self._failed_put = (time.monotonic(), e.message)
            raise
        self._failed_put = None

    async def delete(self, adapter_id: str) -> bool:
        """Its parts go; its tenant's listing drops it from the index next time."""
        with self._reachable():
            deleted = await self.redis.delete(*(self._key(adapter_id, p) for p in PARTS))
        return bool(deleted)

    async def list(self, tenant: str) -> list[Listed]:
        """The tenant's index, each entry checked whole: one whose TTL lapsed, that was deleted
        or that lost a part to eviction is dropped from the index (its remains deleted)."""
        index = self._index_key(tenant)
        with self._reachable():
            rows = await self.redis.zrange(index, 0, -1, withscores=True)
            # redis-py types every zrange alike; withscores=True gives (member, float score)
            # tuples, members bytes since this client does not decode.
            pairs = [(a.decode(), int(c)) for a, c in cast(list[tuple[bytes, float]], rows)]
            async with self.redis.pipeline(transaction=False) as p:
                for aid, _ in pairs:
                    p.exists(*(self._key(aid, part) for part in PARTS))
                found = await p.execute()
            broken = {aid for (aid, _), n in zip(pairs, found, strict=True) if n != len(PARTS)}
            if broken:
                async with self.redis.pipeline(transaction=False) as p:
                    p.zrem(index, *broken)
                    for aid in broken:
                        p.delete(*(self._key(aid, part) for part in PARTS))
                    await p.execute()
        return [Listed(aid, created) for aid, created in pairs if aid not in broken]

    @contextlib.asynccontextmanager
    async def lock(self, adapter_id: str) -> AsyncIterator[None]:
        """redis-py's Lock (SET NX PX with a random token, released only by its owner), renewed
        while held: an adapt may take longer than `lock_timeout_s`, which only bounds how long
        the lock of a server that died outlives it. Waiters wait as long as the holder works.
        On a cluster the lock is one key in the adapter's slot, so every server contends for
        it on the same node."""
        lock = self.redis.lock(
            self._key(adapter_id, "lock"),
            timeout=self.lock_timeout_s,
            sleep=0.05,
            thread_local=False,
        )
        with self._reachable():
            await lock.acquire()
        renewing = asyncio.create_task(self._renew(lock))
        try:
            yield
        finally:
            renewing.cancel()
            with contextlib.suppress(LockError, RedisError, asyncio.CancelledError):
                await renewing
            with contextlib.suppress(LockError, RedisError):  # expired or Redis gone: it lapses
                await lock.release()

    async def _renew(self, lock: Lock) -> None:
        while True:
            await asyncio.sleep(self.lock_timeout_s / 3)
            await lock.reacquire()

    async def ping(self) -> None:
        """Reachable and taking writes: a Redis out of memory (OOM under `noeviction`), failing
        to persist (MISCONF), a read-only replica (READONLY) or a paused one still answers PING
        but refuses (or holds) every adapt's write, so a small key with a short expiry is
        written too. One with room for that key but not for an adapter passes it: a put that
        failed in the last FAILED_PUT_SHOWN_S counts too. On a cluster, PING reaches every
        node and the key one of them."""
        checks: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
            ("unavailable", lambda: self.redis.ping(**self._every_node)),
            ("refuses writes", lambda: self.redis.set(self._probe_key, b"1", px=PROBE_TTL_MS)),
        )
        for failure, command in checks:
            with self._reachable(failure):
                try:
                    await asyncio.wait_for(command(), PROBE_TIMEOUT_S)
                except asyncio.TimeoutError as e:
                    raise RedisTimeoutError(f"no answer in {PROBE_TIMEOUT_S} s (paused?)") from e
        if self._failed_put is not None:
            age = time.monotonic() - self._failed_put[0]
            if age < FAILED_PUT_SHOWN_S:
                raise StoreUnavailable(f"{self._failed_put[1]} ({age:.0f} s ago)")

    async def close(self) -> None:
        await self.redis.aclose()


def reason(e: RedisError) -> str:
    """Redis's own words (`OOM command not allowed ...`), without the command that redis-py's
    pipelines put before them: a key and the start of the bytes stored under it."""
    _, annotated, words = str(e).rpartition(PIPELINE_ERROR)
    if annotated:  # the async pipeline quotes the error's arguments as a tuple
        words = words.strip("(),'\"")
    return f"{e.status_code} {words}" if e.status_code else words


def redacted(url: str) -> str:
    """The URL without its password (redis://:secret@host -> redis://:***@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(settings: Settings) -> AdapterStore:
    """RedisStore for a URL, else the in-process MemoryStore (the embedded default)."""
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            settings.adapter_ttl_s,
            settings.redis_prefix,
            settings.lock_timeout_s,
            settings.redis_cluster,
        )
    return MemoryStore(settings.memory_store_bytes, settings.adapter_ttl_s)

"""Both adapter stores pass the same tests; Redis ones run against the real server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from redis.crc import key_slot

from generator.maker import MadeAdapter
from server.errors import StoreUnavailable
from server.launch import free_port
from server.protocol import AdapterInfo
from server.store import (
    PARTS,
    AdapterStore,
    Listed,
    MemoryStore,
    RedisStore,
    StoredAdapter,
    digest,
)
from tests.conftest import REDIS_URL
from tests.redis_servers import redis_cluster, redis_server

MakeStore = Callable[..., AdapterStore]


def entry(n: int, size: int = 100) -> StoredAdapter:
    aid = f"ga-{n:032x}"
    info = AdapterInfo(
        id=aid,
        created_at=int(time.time()),
        tokens=n,
        base_model="m",
        fingerprint="f",
        lora_rank=8,
    )
    adapter = MadeAdapter(bytes([n % 256]) * size, '{"r": 8}', b"s" * size, n)
    return StoredAdapter(info, adapter)


REDIS_KINDS = [
    pytest.param("redis", marks=pytest.mark.slow),
    pytest.param("cluster", marks=pytest.mark.slow),
]
redis_kinds = pytest.mark.parametrize("make_store", REDIS_KINDS, indirect=True)


@pytest.fixture(params=["memory", *REDIS_KINDS])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Stores of one kind: in memory, on Redis, on a Redis Cluster. Redis ones share a key
    prefix; on the cluster each store connects through another node, as servers would."""
    urls, cluster, prefix = [REDIS_URL], False, ""
    if request.param == "redis":
        prefix = request.getfixturevalue("prefix")
    elif request.param == "cluster":
        urls, cluster = request.getfixturevalue("redis_cluster"), True
        prefix = f"test-{uuid.uuid4().hex}"  # the cluster is this session's alone
    made: list[AdapterStore] = []

    def make(ttl_s: float = 60, budget: int = 1 << 20, lock_timeout_s: float = 30) -> AdapterStore:
        store: AdapterStore
        if request.param == "memory":
            store = MemoryStore(budget, ttl_s)
        else:
            url = urls[len(made) % len(urls)]
            store = RedisStore(url, ttl_s, prefix, lock_timeout_s, cluster=cluster)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def redis_store(make_store: MakeStore, **kwargs: float) -> RedisStore:
    store = make_store(**kwargs)
    assert isinstance(store, RedisStore)
    return store


async def test_put_get_touch_list_delete(make_store: MakeStore) -> None:
    store = make_store()
    a, b = entry(1), entry(2)
    assert await store.get(a.info.id) is None
    await store.put(a)
    await store.put(b)
    assert await store.get(a.info.id) == a
    assert await store.touch(b.info.id) == b.info
    listed = [Listed(a.info.id, a.info.created_at), Listed(b.info.id, b.info.created_at)]
    assert sorted(await store.list("")) == listed
    assert await store.delete(a.info.id) is True
    assert await store.delete(a.info.id) is False
    assert await store.get(a.info.id) is None
    assert await store.touch(a.info.id) is None
    assert [i.id for i in await store.list("")] == [b.info.id]


async def test_ttl_slides_on_every_read(make_store: MakeStore) -> None:
    store = make_store(ttl_s=1.5)
    a = entry(3)
    await store.put(a)
    for _ in range(3):  # 2.7 s in all: alive only because each read slides the TTL
        await asyncio.sleep(0.9)
        assert await store.get(a.info.id) == a
    await asyncio.sleep(2.0)
    assert await store.get(a.info.id) is None


async def test_failed_factory_stores_nothing(make_store: MakeStore) -> None:
    store = make_store()
    a = entry(4)

    async def fail() -> StoredAdapter:
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="generator crashed"):
        await store.get_or_create(a.info.id, fail)
    assert await store.get(a.info.id) is None
    assert await store.list("") == []

    async def ok() -> StoredAdapter:
        return a

    assert await store.get_or_create(a.info.id, ok) == (a.info, True)  # the lock was released
    assert await store.get_or_create(a.info.id, fail) == (a.info, False)


async def test_single_flight_runs_factory_once(make_store: MakeStore) -> None:
    first = make_store()
    # Two RedisStores = two processes sharing Redis; a MemoryStore is shared within a process.
    stores = [first, make_store() if isinstance(first, RedisStore) else first]
    a = entry(5)
    calls = 0

    async def slow_factory() -> StoredAdapter:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return a

    results = await asyncio.gather(
        *(stores[i % 2].get_or_create(a.info.id, slow_factory) for i in range(8))
    )
    assert calls == 1
    assert all(info == a.info for info, _ in results)
    assert sum(created for _, created in results) == 1


async def test_memory_store_evicts_least_recently_used() -> None:
    size = entry(0).nbytes
    store = MemoryStore(budget_bytes=3 * size, ttl_s=60)
    for n in (1, 2, 3):
        await store.put(entry(n))
    assert await store.get(entry(1).info.id) is not None  # 1 is now the most recent
    await store.put(entry(4))
    assert await store.get(entry(2).info.id) is None  # least recently used went first
    assert {i.id for i in await store.list("")} == {entry(n).info.id for n in (1, 3, 4)}
    assert store.nbytes <= store.budget_bytes


@redis_kinds
async def test_redis_entry_missing_a_part_reads_as_missing(make_store: MakeStore) -> None:
    """Under allkeys-lru Redis may evict one key of an entry; the rest is then dropped."""
    store = redis_store(make_store)
    keys = [store._key(entry(6).info.id, p) for p in PARTS]
    for part in PARTS:
        a = entry(6)
        await store.put(a)
        await store.redis.delete(store._key(a.info.id, part))  # as allkeys-lru would
        assert await store.get(a.info.id) is None
        assert await store.touch(a.info.id) is None
        assert await store.redis.exists(*keys) == 0
        assert await store.list("") == []


async def test_unreachable_redis_raises_store_unavailable() -> None:
    """Clear errors that never show the URL's password."""
    store = RedisStore(f"redis://:s3cret@127.0.0.1:{free_port()}/0", ttl_s=60)
    for call in (store.ping(), store.get(entry(7).info.id), store.put(entry(7)), store.list("")):
        with pytest.raises(StoreUnavailable, match="unavailable|could not store") as e:
            await call
        assert "s3cret" not in e.value.message and ":***@127.0.0.1" in e.value.message
    await store.close()


@redis_kinds
async def test_redis_lock_outlives_its_timeout_while_the_adapt_runs(make_store: MakeStore) -> None:
    """An adapt longer than lock_timeout_s keeps its lock (it is renewed): two servers still
    run the generator once. A lock that merely expired let the second server run it again."""
    stores = [make_store(lock_timeout_s=0.3) for _ in range(2)]
    a = entry(8)
    calls = 0

    async def slow_factory() -> StoredAdapter:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1.2)  # four lock timeouts
        return a

    results = await asyncio.gather(*(s.get_or_create(a.info.id, slow_factory) for s in stores))
    assert calls == 1
    assert sorted(created for _, created in results) == [False, True]


@redis_kinds
async def test_redis_list_reads_the_index_not_the_keyspace(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing never SCANs (which walks every key of the database, on a cluster every node's)
    nor reads the entries; an expired entry leaves the index."""
    store = redis_store(make_store, ttl_s=0.5)
    await store.put(entry(9))
    for command in ("scan_iter", "scan", "mget", "get", "keys"):
        monkeypatch.setattr(store.redis, command, None)
    assert [x.id for x in await store.list("")] == [entry(9).info.id]
    await asyncio.sleep(0.7)
    assert await store.list("") == []
    assert await store.redis.zcard(store._index_key("")) == 0


def test_an_adapters_keys_share_a_cluster_slot() -> None:
    """Its parts and its lock hash to one slot (one transaction writes them, one node holds
    the lock); adapters spread over slots; a tenant's index key is tagged with the tenant."""
    store = RedisStore("redis://127.0.0.1:1/0", 60, "p", cluster=True)  # connects on first use
    slots = [
        {key_slot(store._key(entry(n).info.id, p).encode()) for p in (*PARTS, "lock")}
        for n in range(20)
    ]
    assert all(len(s) == 1 for s in slots) and len(set.union(*slots)) > 10
    assert key_slot(store._index_key("alice").encode()) == key_slot(b"alice")


async def test_listing_is_per_tenant(make_store: MakeStore) -> None:
    store = make_store()
    mine, other = entry(10), entry(11)
    mine = StoredAdapter(mine.info.model_copy(update={"tenant": "t"}), mine.adapter)
    await store.put(mine)
    await store.put(other)
    assert [x.id for x in await store.list("t")] == [mine.info.id]
    assert [x.id for x in await store.list("")] == [other.info.id]
    await store.delete(mine.info.id)
    assert await store.list("t") == []


async def test_an_entry_whose_bytes_changed_is_removed_not_returned(make_store: MakeStore) -> None:
    store = make_store()
    made = MadeAdapter(b"weights", '{"r": 8}', b"state", 12)  # entry(12) read 12 tokens
    info = entry(12).info.model_copy(update={"sha256": digest(made)})
    await store.put(StoredAdapter(info, made))
    assert await store.get(info.id) == StoredAdapter(info, made)
    flipped = MadeAdapter(b"weightz", made.peft_config, made.state, made.tokens)
    await store.put(StoredAdapter(info, flipped))  # as a disk or memory fault would leave it
    assert await store.get(info.id) is None
    assert await store.touch(info.id) is None  # removed, not only refused


# --- a Redis that evicts, is full, read-only or paused (private servers: settings change) ---


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
async def test_under_lru_eviction_listing_shows_only_whole_adapters(
    tmp_path: Path, policy: str
) -> None:
    """Entries past `maxmemory` lose keys to eviction; listing names only whole ones and drops
    the others from the index (their remains deleted), and those read as missing. Under
    volatile-lru only keys with a TTL (the entries) go, never an index; under allkeys-lru the
    index itself may go, and the listing then misses adapters that are still whole."""
    with redis_server(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", policy) as url:
        store = RedisStore(url, 60)
        made = [entry(n, size=100_000) for n in range(40)]  # about 8 MB in all
        for a in made:
            await store.put(a)
        index = store._index_key("")
        kept = policy == "volatile-lru"
        assert await store.redis.zcard(index) == len(made) or not kept
        listed = {x.id for x in await store.list("")}
        # every entry's keys counted before any read: a read slides the TTL, a write that may
        # evict another entry's keys after it was listed
        founds = [
            await store.redis.exists(*(store._key(a.info.id, p) for p in PARTS)) for a in made
        ]
        for a, found in zip(made, founds, strict=True):
            if a.info.id in listed:
                # whole when listed; reading it refreshes its TTL, a write that may evict again
                assert found == len(PARTS) and await store.get(a.info.id) in (a, None)
            elif kept:
                assert found == 0 and await store.get(a.info.id) is None
        if kept:
            assert 0 < len(listed) < len(made) and await store.redis.zcard(index) == len(listed)
        await store.close()


@pytest.mark.slow
async def test_a_full_redis_refuses_writes_and_says_so(tmp_path: Path) -> None:
    """Under `noeviction` a Redis without room for an adapter refuses it (OOM) but answers PING
    and may take a small key: the failed put is reported for a while, a Redis with no room at
    all fails the write probe. A refused entry leaves nothing, stored ones still read, and no
    message shows the password."""
    with redis_server(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as url:
        admin = RedisStore(url, 60).redis
        await admin.config_set("requirepass", "s3cret")
        store = RedisStore(url.replace("redis://", "redis://:s3cret@"), 60)
        await store.ping()
        first = entry(1, size=100_000)
        await store.put(first)
        full = "could not store the adapter: OOM command not allowed when used memory"
        with pytest.raises(StoreUnavailable, match=full) as refused:
            for n in range(2, 40):
                await store.put(entry(n, size=100_000))
        with pytest.raises(StoreUnavailable, match=rf"{full} .* \(0 s ago\)") as failed_put:
            await store.ping()
        await admin.config_set("maxmemory", "1")  # no room for anything
        with pytest.raises(StoreUnavailable, match="refuses writes: OOM command") as probe:
            await store.ping()
        for e in (refused, failed_put, probe):
            assert "s3cret" not in e.value.message and ":***@127.0.0.1" in e.value.message
        assert await store.get(first.info.id) == first
        listed = await store.list("")
        assert [x.id for x in listed] == [entry(n).info.id for n in range(1, len(listed) + 1)]
        assert await store.get(entry(len(listed) + 1).info.id) is None  # the refused one
        await admin.config_set("maxmemory", "0")  # room again: the next put clears the report
        await store.put(entry(40))
        await store.ping()
        await store.close()
        await admin.aclose()


@pytest.mark.slow
async def test_a_read_only_replica_refuses_writes_and_says_so(tmp_path: Path) -> None:
    with (
        redis_server(tmp_path / "primary") as primary,
        redis_server(tmp_path / "replica", "--replicaof", "127.0.0.1", port(primary)) as replica,
    ):
        store = RedisStore(replica, 60)
        with pytest.raises(StoreUnavailable, match="refuses writes: READONLY"):
            await store.ping()
        await store.close()


@pytest.mark.slow
async def test_a_paused_redis_is_reported_not_waited_for(tmp_path: Path) -> None:
    """CLIENT PAUSE WRITE holds writes without refusing them: the probe gives up in seconds."""
    with redis_server(tmp_path) as url:
        store, admin = RedisStore(url, 60), RedisStore(url, 60).redis
        await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"refuses writes: no answer in 2 s \(paused"):
            await store.ping()
        assert time.monotonic() - start < 4
        await admin.execute_command("CLIENT", "UNPAUSE")
        await store.ping()  # the same client recovers
        await store.close()
        await admin.aclose()


@pytest.mark.slow
async def test_a_cluster_with_a_node_down_is_unavailable(tmp_path: Path) -> None:
    """PING goes to every node of a cluster, not only the one the client asks by default."""
    with redis_cluster(tmp_path) as urls:
        store = RedisStore(urls[0], 60, cluster=True)
        await store.ping()
        with redis.Redis.from_url(urls[2]) as other:
            other.shutdown(nosave=True)
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.ping()
        await store.close()


def port(url: str) -> str:
    return str(urlsplit(url).port)

"""Continuous batching of adapts: contexts read their windows together, equal to alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from safetensors.torch import load

from generator.base_model import BaseModel
from generator.maker import AdapterMaker, MadeAdapter, Reading
from generator.pipeline import AdapterPipeline
from server.batcher import AdaptBatcher
from tests.conftest import random_generator


@pytest.fixture
def maker(tiny_pipeline: AdapterPipeline) -> AdapterMaker:
    return AdapterMaker(tiny_pipeline)


@pytest.fixture
def batches(maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the generator reads."""
    sizes: list[int] = []
    real = maker.read_next

    def recording(readings: list[Reading]) -> None:
        sizes.append(len(readings))
        real(readings)

    monkeypatch.setattr(maker, "read_next", recording)
    return sizes


def assert_same_adapter(a: MadeAdapter, b: MadeAdapter) -> None:
    """Equal up to float rounding: a batched matmul sums in another order than a single one,
    and the SVD can magnify it (up to 4e-4 relative seen on an AMD EPYC, 1e-4 on a Xeon)."""
    assert a.tokens == b.tokens
    ta, tb = load(a.peft), load(b.peft)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-5)


async def test_contexts_adapted_at_once_share_batches_and_equal_alone(
    maker: AdapterMaker, batches: list[int]
) -> None:
    contexts = [maker.tokenize(f"Context {i}. " + "Velloran. " * (3 * i)) for i in range(5)]
    parent = maker.make(maker.tokenize("A parent context to continue."))
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        made = await asyncio.gather(
            *(batcher.make(ids) for ids in contexts), batcher.make(contexts[2], parent.state)
        )
    finally:
        batcher.close()
    assert max(batches) > 1  # read together, not one after the other
    alone = [maker.make(ids) for ids in contexts] + [maker.make(contexts[2], parent.state)]
    for a, b in zip(made, alone, strict=True):
        assert_same_adapter(a, b)


async def test_contexts_reading_several_windows_at_once_share_batches_and_equal_alone(
    tiny_base: BaseModel,
) -> None:
    generator = random_generator(tiny_base, window=16, rank=8, inner_size=32, windows_at_once=3)
    maker = AdapterMaker(AdapterPipeline(tiny_base, generator))
    contexts = [maker.tokenize(f"Context {i}. " + "Velloran. " * (7 * i)) for i in range(4)]
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        made = await asyncio.gather(*(batcher.make(ids) for ids in contexts))
    finally:
        batcher.close()
    for a, ids in zip(made, contexts, strict=True):
        assert_same_adapter(a, maker.make(ids))


async def test_a_short_context_does_not_wait_for_a_long_one(maker: AdapterMaker) -> None:
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        long = asyncio.create_task(batcher.make(maker.tokenize("A long one. " * 400)))
        await asyncio.sleep(0.05)  # the long context is being read
        short = await batcher.make(maker.tokenize("Short."))
        assert short.tokens == len(maker.tokenize("Short.")) and not long.done()
        assert (await long).tokens == len(maker.tokenize("A long one. " * 400))
    finally:
        batcher.close()


async def test_a_pass_from_idle_waits_for_the_adapts_on_their_way(
    maker: AdapterMaker, batches: list[int]
) -> None:
    batcher = AdaptBatcher(lambda: maker, max_batch=8)

    async def request(text: str, lookup_s: float) -> MadeAdapter:
        with batcher.on_the_way() as arrived:
            await asyncio.sleep(lookup_s)  # tokenizing, looking up the cache
            return await batcher.make(maker.tokenize(text), arrived=arrived)

    try:
        # one short context alone is read in one pass: both in one pass means the first waited
        await asyncio.gather(request("Sent first.", 0), request("Sent 20 ms later.", 0.02))
    finally:
        batcher.close()
    assert batches[0] == 2


async def test_a_pass_from_idle_waits_for_a_burst_to_end(
    maker: AdapterMaker, batches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests queued before a third is on its way: all three are read in one pass."""
    monkeypatch.setattr("server.batcher.GATHER_S", 5.0)
    monkeypatch.setattr("server.batcher.GATHER_QUIET_S", 1.0)
    batcher = AdaptBatcher(lambda: maker, max_batch=8)

    async def request(text: str, start_s: float) -> MadeAdapter:
        await asyncio.sleep(start_s)
        with batcher.on_the_way() as arrived:
            return await batcher.make(maker.tokenize(text), arrived=arrived)

    try:
        await asyncio.gather(request("First.", 0), request("Second.", 0), request("Third.", 0.2))
    finally:
        batcher.close()
    assert batches[0] == 3


async def test_a_pass_that_waited_for_the_engine_takes_the_adapts_sent_once_it_is_done(
    maker: AdapterMaker, batches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapt that came while the engine was busy waits for it, then for the adapts the
    engine's callers send once answered: all three are read in one pass."""
    monkeypatch.setattr("server.batcher.GATHER_S", 5.0)
    engine_busy = threading.Event()
    engine_busy.set()
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    batcher.yield_to(engine_busy.is_set, seconds=60)

    async def request(text: str) -> MadeAdapter:
        with batcher.on_the_way() as arrived:
            return await batcher.make(maker.tokenize(text), arrived=arrived)

    try:
        first = asyncio.create_task(request("Came while the engine was busy."))
        await asyncio.sleep(0.2)
        engine_busy.clear()
        await asyncio.sleep(0.1)  # the engine's callers get their answers, then send these
        await asyncio.gather(first, request("Sent once answered."), request("And another."))
    finally:
        batcher.close()
    assert batches[0] == 3


async def test_a_lone_adapt_and_one_that_leaves_early_make_no_pass_wait(
    maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a wait would time the test out
    monkeypatch.setattr("server.batcher.GATHER_S", 600.0)
    monkeypatch.setattr("server.batcher.GATHER_QUIET_S", 600.0)
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        with batcher.on_the_way() as arrived:
            lone = batcher.make(maker.tokenize("Alone."), arrived=arrived)
            assert (await asyncio.wait_for(lone, 60)).tokens > 0
        with batcher.on_the_way():
            pass  # a cache hit: it never makes an adapter
        assert (await asyncio.wait_for(batcher.make(maker.tokenize("Next.")), 60)).tokens > 0
    finally:
        batcher.close()


async def test_a_cancelled_adapt_leaves_the_batch(
    maker: AdapterMaker, batches: list[int], tiny_pipeline: AdapterPipeline
) -> None:
    ids = maker.tokenize("Abandoned. " * 400)  # hundreds of windows
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        abandoned = asyncio.create_task(batcher.make(ids))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        await batcher.make(maker.tokenize("Next."))  # runs after the abandoned one is dropped
        read = len(batches)
    finally:
        batcher.close()
    assert read < len(ids) / tiny_pipeline.config.window / 2  # far from all its windows


async def test_a_failing_batch_fails_its_callers_and_the_next_adapt_works(
    maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = maker.read_next, []

    def failing_once(readings: list[Reading]) -> None:
        calls.append(len(readings))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        real(readings)

    monkeypatch.setattr(maker, "read_next", failing_once)
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.make(maker.tokenize("Fails."))
        assert (await batcher.make(maker.tokenize("Works."))).tokens > 0
    finally:
        batcher.close()


async def test_loading_and_composing_run_on_the_generator_thread(
    maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All torch work on one thread (server.batcher says why): loading and composing too."""
    threads: list[str] = []
    real = maker.compose

    def load() -> AdapterMaker:
        threads.append(threading.current_thread().name)
        return maker

    def composing(states: list[bytes]) -> MadeAdapter:
        threads.append(threading.current_thread().name)
        return real(states)

    monkeypatch.setattr(maker, "compose", composing)
    batcher = AdaptBatcher(load, max_batch=8)
    try:
        parts = [await batcher.make(maker.tokenize(t)) for t in ("First.", "Second.")]
        composed = await batcher.compose([p.state for p in parts])
    finally:
        batcher.close()
    assert threads == ["adapt-batcher", "adapt-batcher"]
    assert composed.tokens == sum(p.tokens for p in parts)


async def test_a_failing_load_fails_startup_and_adapts() -> None:
    def load() -> AdapterMaker:
        raise RuntimeError("no generator here")

    batcher = AdaptBatcher(load, max_batch=8)
    with pytest.raises(RuntimeError, match="no generator here"):
        await batcher.loaded()
    with pytest.raises(RuntimeError, match="no generator here"):
        await batcher.make([1, 2, 3])
    batcher.close()


async def test_windows_wait_for_the_engine_to_finish_its_requests(
    maker: AdapterMaker, batches: list[int]
) -> None:
    engine_busy = threading.Event()
    engine_busy.set()
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    batcher.yield_to(engine_busy.is_set, seconds=60)
    try:
        adapt = asyncio.create_task(batcher.make(maker.tokenize("Waits for the engine.")))
        await asyncio.sleep(0.2)
        assert not adapt.done() and batches == []  # not one window read while it was busy
        engine_busy.clear()
        assert (await asyncio.wait_for(adapt, 30)).tokens > 0
    finally:
        batcher.close()


async def test_an_engine_that_stays_busy_delays_windows_but_never_stops_them(
    maker: AdapterMaker, batches: list[int], tiny_pipeline: AdapterPipeline
) -> None:
    polls = []

    def always_busy() -> bool:
        polls.append(len(batches))
        return True

    ids = maker.tokenize("Never idle. " * 20)
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    batcher.yield_to(always_busy, seconds=0.02)
    try:
        assert (await asyncio.wait_for(batcher.make(ids), 30)).tokens == len(ids)
    finally:
        batcher.close()
    windows = -(-len(ids) // tiny_pipeline.config.window)
    assert len(batches) == windows > 1
    assert set(range(windows)) <= set(polls)  # it waited before every window


async def test_a_pass_from_idle_waits_for_a_busy_engine_once_not_twice(
    maker: AdapterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait from idle (before gathering the adapts the engine's callers send) is the first
    forward's wait: together at most `adapt_yield_s` (1 s here; twice that before)."""
    started: list[float] = []
    real = maker.read_next

    def timed(readings: list[Reading]) -> None:
        started.append(time.monotonic())
        real(readings)

    monkeypatch.setattr(maker, "read_next", timed)
    batcher = AdaptBatcher(lambda: maker, max_batch=8)
    batcher.yield_to(lambda: True, seconds=1.0)
    try:
        sent = time.monotonic()
        await asyncio.wait_for(batcher.make(maker.tokenize("Busy engine.")), 30)
    finally:
        batcher.close()
    assert 1.0 <= started[0] - sent < 1.7  # the wait, its gather (50 ms), some slack


async def test_a_pass_runs_as_forwards_of_at_most_pass_tokens_and_equals_alone(
    maker: AdapterMaker, batches: list[int]
) -> None:
    """Four contexts of 16-token windows, forwards of at most 40 tokens: two full windows a
    forward, the engine asked before each, and every adapter as made alone."""
    contexts = [maker.tokenize(f"Context {i}. " + "Velloran. " * 12) for i in range(4)]
    polls: list[int] = []

    def idle() -> bool:
        polls.append(len(batches))
        return False

    batcher = AdaptBatcher(lambda: maker, max_batch=8, pass_tokens=40)
    batcher.yield_to(idle, seconds=1)
    try:
        made = await asyncio.gather(*(batcher.make(ids) for ids in contexts))
    finally:
        batcher.close()
    assert batches[:2] == [2, 2]  # full windows first: two contexts a forward
    assert set(range(len(batches))) <= set(polls)  # it asked before every forward
    for a, ids in zip(made, contexts, strict=True):
        assert_same_adapter(a, maker.make(ids))


async def test_a_pass_evens_out_its_forwards(maker: AdapterMaker, batches: list[int]) -> None:
    """Four contexts of one 16-token window a pass, forwards of at most 48 tokens: as few
    forwards as in order, 2 + 2 rather than 3 + 1."""
    contexts = [maker.tokenize(f"Context {i}. " + "Velloran. " * 12) for i in range(4)]
    batcher = AdaptBatcher(lambda: maker, max_batch=8, pass_tokens=48)
    try:
        await asyncio.gather(*(batcher.make(ids) for ids in contexts))
    finally:
        batcher.close()
    assert batches[:2] == [2, 2]

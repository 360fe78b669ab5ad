"""The generator's own thread: continuous batching of generator runs, and all of its torch work.

The contexts being adapted read their next windows together, in one forward pass of the base
model; a context joins at the next pass and leaves when it is read, so a short context never
waits for a long one to end.

Every torch call of the generator runs on this one thread, its loading included. libgomp (torch's
OpenMP) lets a thread team spin between parallel regions only while the threads it manages fit
the CPUs; one more thread that ever ran a parallel region (a loader or a compose on an executor
thread) makes every region's workers sleep and wake instead: adapting then took 3x as long on 2
cores (measured, 1,400 tokens: 1.8 s on the main thread, 6 s on a second thread after loading on
another).

Between passes the thread also lets the engine's requests in flight finish first, for up to
`adapt_yield_s`: the engine (other processes) and the generator each use every core, and
computing at once, each slowed the other more than twice (measured, 2 cores: 64 documents each
adapted then asked took 61 s; the same adapts alone 19.5 s, the same questions alone 10.5 s). A
pass of many contexts runs as forwards of at most `pass_tokens` tokens with that wait before each:
one forward of 8 contexts of 512 tokens took about 2 s, all of it beside the questions that
arrived meanwhile.

A pass that starts from idle first waits, up to `GATHER_S`, for the adapt requests on their way
(`on_the_way`: tokenizing, looking up the cache), so requests sent together are read together.
Over HTTP, eight sent at once reached the server over 13 ms, and the first pass started with
one of them (logged). Counting those on their way was not enough: the event loop queued the
first six before the last two had reached the count, and those two waited for the whole pass
(logged, 1 in 3 rounds). So once a second request shows, the pass also waits for a quiet
`GATHER_QUIET_S` after the last one; a lone request still waits for nothing.

A pass from idle that had to wait for the engine then also waits, up to `GATHER_S`, for the
adapts that come once the engine is done: clients that adapt and then ask send their next
context when their answer ends, and answers that started together end together. Logged, 64
documents of 1,024 tokens each adapted then asked, 8 at a time: in every round the first caller
answered sent its adapt while the other seven were still being answered; its pass waited for
the engine (0.34-0.43 s), then started alone, while their adapts reached the server 7-15 ms
after the engine went idle and waited for that pass. Settled a pass before them, its question
then ran beside their last forward (1.0-1.5 s instead of 0.3), and the next round began the
same way. Waiting for them instead: that first round 74.7 / 77.0 -> 65.5 / 63.3 s (servers
alternating), as fast as its adapts alone plus its questions alone.

One step of a finished adapt runs on the caller's loop instead: its files, the bytes of tensors
this thread computed (serializing runs no torch kernel). Made here, the bytes the store keeps lay
in this thread's malloc heap among the memory each pass frees and pinned it: the next larger pass
took fresh pages, 15,000-60,000 page faults in the first pass of 3 contexts after 8 single
adapts, which then took 1.5-2x as long as the same pass again (measured on a Xeon; with the bytes
moved onto the loop, 0-2,561 faults and no difference).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from generator.maker import AdapterMaker, MadeAdapter, Reading

log = logging.getLogger(__name__)

ENGINE_POLL_S = 0.005  # how often a waiting pass looks whether the engine is done
GATHER_S = 0.05  # longest a pass from idle waits for the adapt requests on their way
GATHER_QUIET_S = 0.005  # and, once a second one shows, for this long without another
GATHER_POLL_S = 0.001  # how often it looks whether they have arrived


def _no_op() -> None:
    return None


@dataclass
class _Job:
    ids: list[int] = field(default_factory=list)
    parent_state: bytes | None = None
    work: Callable[[AdapterMaker], MadeAdapter] | None = None  # not a reading: run it at once
    future: asyncio.Future[MadeAdapter] = field(init=False)  # on the caller's loop
    reading: Reading | None = field(default=None, repr=False)

    def settle(self, result: MadeAdapter | BaseException | Callable[[], MadeAdapter]) -> None:
        """Resolve the future on its loop's thread (unless its caller gave up on it); a callable
        result runs there first, and what it raises is the caller's error."""

        def set_it() -> None:
            if self.future.done():
                return
            try:
                made = result() if callable(result) else result
            except Exception as e:  # noqa: BLE001 (the caller's error to raise)
                made = e
            if isinstance(made, BaseException):
                self.future.set_exception(made)
            else:
                self.future.set_result(made)

        self.future.get_loop().call_soon_threadsafe(set_it)


class AdaptBatcher:
    """One thread loads the generator (`load`) and runs it for every adapt of the server, up to
    `max_batch` contexts at a time, in forwards of at most `pass_tokens` tokens (None: one
    forward per pass); callers await their own adapter."""

    def __init__(
        self, load: Callable[[], AdapterMaker], max_batch: int, pass_tokens: int | None = None
    ) -> None:
        self._max_batch = max_batch
        self._pass_tokens = pass_tokens
        self._engine_busy: Callable[[], bool] = lambda: False
        self._yield_s = 0.0
        self._on_the_way = 0
        self._counted = 0  # requests on their way so far
        self._last_counted = 0.0  # when the last one was counted
        self._counting = threading.Lock()
        self._loaded: Future[AdapterMaker] = Future()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(load,), name="adapt-batcher", daemon=True
        )
        self._thread.start()

    def yield_to(self, engine_busy: Callable[[], bool], seconds: float) -> None:
        """Before each pass, wait up to `seconds` while `engine_busy()` (the module says why)."""
        self._engine_busy, self._yield_s = engine_busy, seconds

    async def loaded(self) -> AdapterMaker:
        """The generator, once its thread has loaded it (raises what loading raised)."""
        return await asyncio.wrap_future(self._loaded)

    @property
    def maker(self) -> AdapterMaker:
        """The loaded generator; only after `loaded` has returned."""
        return self._loaded.result(timeout=0)

    @contextmanager
    def on_the_way(self) -> Iterator[Callable[[], None]]:
        """Count a request that may soon `make` an adapter until it calls the `arrived` this
        yields (`make` takes it, and calls it once its context is queued) or leaves the block:
        a pass from idle waits for the requests counted (the module says why)."""
        counted = True

        def arrived() -> None:
            nonlocal counted
            with self._counting:
                if counted:
                    self._on_the_way -= 1
                counted = False

        with self._counting:
            self._on_the_way += 1
            self._counted += 1
            self._last_counted = time.monotonic()
        try:
            yield arrived
        finally:
            arrived()

    async def make(
        self,
        ids: list[int],
        parent_state: bytes | None = None,
        arrived: Callable[[], None] = _no_op,
    ) -> MadeAdapter:
        """The adapter of `ids` (continuing `parent_state`); cancelling the call drops its
        context from the batch at the next pass. `arrived`: from `on_the_way`."""
        return await self._submit(_Job(ids, parent_state), arrived)

    async def compose(self, states: list[bytes]) -> MadeAdapter:
        """AdapterMaker.compose, between two passes of the adapts in flight."""
        return await self._submit(_Job(work=lambda maker: maker.compose(states)))

    async def _submit(self, job: _Job, arrived: Callable[[], None] = _no_op) -> MadeAdapter:
        await self.loaded()
        job.future = asyncio.get_running_loop().create_future()
        self._queue.put(job)
        arrived()
        return await job.future

    def close(self) -> None:
        """Stop after the current pass; adapts still running fail."""
        self._queue.put(None)
        self._thread.join()

    def _run(self, load: Callable[[], AdapterMaker]) -> None:
        try:
            maker = load()
        except BaseException as e:  # noqa: BLE001 (the server's startup raises it)
            self._loaded.set_exception(e)
            return
        self._loaded.set_result(maker)
        active: list[_Job] = []
        while True:
            incoming = []
            engine_until = None  # the first forward's wait for the engine ends then
            if not active:  # idle: wait for work, then for the requests on their way
                counted = self._counted
                incoming.append(self._queue.get())
                self._gather(counted)
                engine_until = time.monotonic() + self._yield_s
                if self._wait_for_engine(engine_until):  # its callers, answered, may send more
                    self._gather(self._counted, awaited=True)
            while len(active) + len(incoming) < self._max_batch and not self._queue.empty():
                incoming.append(self._queue.get())
            for job in incoming:
                if job is None:
                    for j in active:
                        j.settle(RuntimeError("the server is shutting down"))
                    return
                try:
                    if job.work is not None:
                        job.settle(job.work(maker))
                    else:
                        job.reading = maker.start(job.ids, job.parent_state)
                        active.append(job)
                except Exception as e:  # noqa: BLE001 (the caller's error to raise)
                    job.settle(e)
            active = [j for j in active if not j.future.cancelled()]  # callers gone
            if active:
                active = self._step(maker, active, engine_until)

    def _forwards(self, maker: AdapterMaker, readings: list[Reading]) -> list[list[Reading]]:
        """The readings in order, in as few forwards of at most `pass_tokens` tokens as that
        order allows (a larger reading alone), evened out: 8 contexts of 321 tokens as 4 + 4,
        not 6 + 2 (in process on a Xeon, 919 against 995 ms; one forward of all 8, 1,045 ms).
        Grouping changes no adapter: a reading's windows of a pass are read with its own
        adapter whatever else shares the forward."""
        if self._pass_tokens is None:
            return [readings]
        sizes = [maker.pass_tokens(r) for r in readings]
        forwards = len(_cut(sizes, self._pass_tokens))
        low, high = -(-sum(sizes) // forwards), self._pass_tokens  # the least cap that keeps them
        while low < high:
            if len(_cut(sizes, (low + high) // 2)) > forwards:
                low = (low + high) // 2 + 1
            else:
                high = (low + high) // 2
        return [[readings[i] for i in group] for group in _cut(sizes, high)]

    def _gather(self, counted: int, awaited: bool = False) -> None:
        """Wait for the requests on their way and, if more than one came since `counted`, for
        a quiet moment after the last (the module says why), up to GATHER_S. `awaited`: some
        are expected though none has come yet, so wait for the first and a quiet moment."""
        deadline = time.monotonic() + GATHER_S
        while time.monotonic() < deadline:
            came = self._counted - counted
            several = awaited or came > 1 or not self._queue.empty()
            quiet = time.monotonic() - self._last_counted >= GATHER_QUIET_S
            if not self._on_the_way and (quiet or not several) and (came or not awaited):
                return
            time.sleep(GATHER_POLL_S)

    def _wait_for_engine(self, until: float) -> bool:
        """Wait while the engine is busy, until `until` at most; whether it was busy."""
        waited = False
        while time.monotonic() < until and self._engine_busy():
            waited = True
            time.sleep(ENGINE_POLL_S)
        return waited

    def _step(
        self, maker: AdapterMaker, active: list[_Job], engine_until: float | None = None
    ) -> list[_Job]:
        """Read the next windows of every active context, in forwards of at most `pass_tokens`
        (the engine's requests first, each forward's wait up to `adapt_yield_s`; the first's
        until `engine_until` where a pass from idle began it); settle those done; the rest go on."""
        readings = [j.reading for j in active if j.reading is not None]
        try:
            for group in self._forwards(maker, readings):
                self._wait_for_engine(engine_until or time.monotonic() + self._yield_s)
                engine_until = None
                maker.read_next(group)
        except Exception as e:  # noqa: BLE001 (each caller gets the error; the thread lives on)
            log.exception("generator failed on a batch of %d contexts", len(active))
            for j in active:
                j.settle(e)
            return []
        going = []
        for j in active:
            assert j.reading is not None
            if not j.reading.done:
                going.append(j)
                continue
            j.settle(partial(maker.finish, j.reading))  # its bytes on the loop's thread (module)
        return going


def _cut(sizes: list[int], cap: int) -> list[list[int]]:
    """Indices of `sizes`, in order, in groups of at most `cap` in all (a larger one alone)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > cap:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups

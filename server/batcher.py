"""Continuous batching of generator runs: the contexts being adapted read their next windows
together, in one forward pass of the base model; a context joins at the next window and leaves
when it is read, so a short context never waits for a long one to end."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from generator.maker import AdapterMaker, MadeAdapter, Reading

log = logging.getLogger(__name__)


@dataclass
class _Job:
    ids: list[int]
    parent_state: bytes | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[MadeAdapter]
    reading: Reading | None = field(default=None, repr=False)

    def settle(self, result: MadeAdapter | BaseException) -> None:
        """Resolve the future on its loop's thread (unless its caller gave up on it)."""

        def set_it() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_it)


class AdaptBatcher:
    """One thread runs the generator for every adapt of the server, up to `max_batch`
    contexts at a time; callers await their own adapter."""

    def __init__(self, maker: AdapterMaker, max_batch: int) -> None:
        self.maker = maker
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="adapt-batcher", daemon=True)
        self._thread.start()

    async def make(self, ids: list[int], parent_state: bytes | None = None) -> MadeAdapter:
        """The adapter of `ids` (continuing `parent_state`); cancelling the call drops its
        context from the batch at the next window."""
        loop = asyncio.get_running_loop()
        job = _Job(ids, parent_state, loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    def close(self) -> None:
        """Stop after the current window; adapts still running fail."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            arrived = [] if active else [self._queue.get()]  # idle: wait for work
            while len(active) + len(arrived) < self._max_batch and not self._queue.empty():
                arrived.append(self._queue.get())
            for job in arrived:
                if job is None:
                    for j in active:
                        j.settle(RuntimeError("the server is shutting down"))
                    return
                try:
                    job.reading = self.maker.start(job.ids, job.parent_state)
                    active.append(job)
                except Exception as e:  # noqa: BLE001 (the caller's error to raise)
                    job.settle(e)
            active = [j for j in active if not j.future.cancelled()]  # callers gone
            if active:
                active = self._step(active)

    def _step(self, active: list[_Job]) -> list[_Job]:
        """Read one window of every active context; settle those done; the rest go on."""
        readings = [j.reading for j in active if j.reading is not None]
        try:
            self.maker.read_next(readings)
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
            try:
                j.settle(self.maker.finish(j.reading))
            except Exception as e:  # noqa: BLE001 (the caller's error to raise)
                j.settle(e)
        return going

"""Dynamic micro-batching: concurrent requests share one engine call.

Requests wait at most ``max_queue_delay`` after the first one of a batch arrived, or until
``max_batch_size`` are waiting, and then share one call of a blocking batch function run in a worker
thread, so concurrent requests amortise the engine's fixed cost. The queue is bounded: when
``max_queue_size`` requests are already waiting a new one fails at once with :class:`Overloaded`
instead of growing memory and latency without limit. Requests whose deadline passed while queued are
dropped (:class:`DeadlineExpired`) before the engine call.

The batcher knows nothing of the guard or of any transport: :class:`~gamguard.runtime.server.dataplane.DataPlane`
gives it the guard call and tells it how many requests are on their way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DeadlineExpired, NotReady, Overloaded


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # loop.time() based


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)


class MicroBatcher:
    """Groups concurrent submissions into batches for ``run_batch`` (a blocking function of ``[N, ...]``
    returning N results), called in ``executor`` one batch at a time.

    ``on_batch(size)``, ``on_depth(waiting)`` and ``on_stacked(size, ms)`` (the time taken to stack a
    batch's inputs into one array, in the worker thread) are optional hooks (metrics, statistics). ``arriving()``, when
    given, says how many requests are about to be submitted; the batcher waits for company only while
    it is positive (without it, it always waits up to ``max_queue_delay_s``, like Triton).
    ``expected()``, when given, is asked once per batch for how many requests the batch may expect
    (e.g. how many were in flight recently); the batcher also waits, still at most
    ``max_queue_delay_s`` after the first item arrived, until that many are queued. Under staggered
    arrivals (gRPC clients do not wake in lock-step) this is what lets concurrent requests share an
    engine call instead of each going alone the moment the engine is free; a lone request
    (``expected() <= 1``) never waits.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], Sequence],
        *,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        max_queue_size: int = 64,
        executor: concurrent.futures.Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        arriving: Callable[[], int] | None = None,
        expected: Callable[[], int] | None = None,
        on_stacked: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.max_queue_size = int(max_queue_size)
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gamguard-engine")
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._arriving = arriving
        self._expected = expected
        self._on_stacked = on_stacked
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.stats = BatchStats()

    @property
    def depth(self) -> int:
        return len(self._items)

    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="gamguard-batcher")

    async def stop(self) -> None:
        """Finish every queued item, then stop (a graceful drain)."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray, *, deadline: float | None = None) -> tuple[Any, int, float]:
        """Queue one input; returns ``(result, batch_size, seconds_queued)``."""
        return await self.enqueue(x, deadline=deadline)

    def enqueue(self, x: np.ndarray, *, deadline: float | None = None) -> asyncio.Future:
        """Queue one input now (raises :class:`NotReady` / :class:`Overloaded` at once, in the event loop's
        thread); the future gives ``(result, batch_size, seconds_queued)``."""
        if self._task is None or self._closing:
            raise NotReady("the server is not accepting requests (starting or draining)")
        if len(self._items) >= self.max_queue_size:
            raise Overloaded(
                f"request queue full ({self.max_queue_size} waiting); retry later or raise --max-queue-size"
            )
        loop = asyncio.get_running_loop()
        item = _Item(x=x, future=loop.create_future(), enqueued=loop.time(), deadline=deadline)
        self._items.append(item)
        self._report_depth()
        self._wakeup.set()
        return item.future

    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._items))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for company: until the batch is full or the first item has waited long enough.
            wait_until = self._items[0].enqueued + self.max_queue_delay_s
            expected = min(self.max_batch_size, self._expected()) if self._expected is not None else 0
            while len(self._items) < self.max_batch_size and not self._closing:
                if self._arriving is not None and self._arriving() <= 0 and len(self._items) >= expected:
                    break
                remaining = wait_until - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            now = loop.time()
            while self._items and len(batch) < self.max_batch_size:
                item = self._items.popleft()
                if item.future.done():  # cancelled by the client while queued
                    continue
                if item.deadline is not None and now >= item.deadline:
                    item.future.set_exception(DeadlineExpired("deadline passed while the request was queued"))
                    continue
                batch.append(item)
            self._report_depth()
            if not batch:
                continue
            await self._dispatch(loop, batch)

    def _stack_and_run(self, xs: list[np.ndarray]) -> Sequence:
        # in the worker thread: copying the inputs into one array is not the event loop's work
        t0 = time.perf_counter()
        stacked = np.stack(xs)
        if self._on_stacked is not None:
            self._on_stacked(len(xs), (time.perf_counter() - t0) * 1000.0)
        return self.run_batch(stacked)

    async def _dispatch(self, loop, batch: list[_Item]) -> None:
        started = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._stack_and_run, [it.x for it in batch])
            results = list(results)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} inputs")
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.sizes[len(batch)] += 1
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for it, res in zip(batch, results):
            if not it.future.done():
                it.future.set_result((res, len(batch), started - it.enqueued))

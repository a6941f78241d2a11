"""Batches that form while the replica works: the deployments' dynamic batching, without Ray.

Ray Serve's `serve.batch` (2.60) closes a batch after `batch_wait_timeout_s` whether or not the previous one
has finished, and queues closed batches on its `max_concurrent_batches` semaphore: with a short wait a lone
request pays nothing but batches of 1 pile up under load; with a long wait batches form but every request
pays the wait. `QueueBatcher` closes a batch only when its worker is free: the first call runs at once, the
calls that arrive meanwhile form the next batch. Batches are bounded by count and by cost (coarse visual
tokens), taken in arrival order, so one large image runs on its own instead of stalling the cheap ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable, Sequence

__all__ = ["QueueBatcher", "split_by_cost", "coarse_tokens"]


def coarse_tokens(prepared) -> int:
    """A request's cost in a batch: the merged visual tokens of its coarse image (a `Prepared`)."""
    rows, cols = prepared.merged_hw
    return rows * cols


def split_by_cost(costs: Sequence[int], max_batch_size: int, max_cost: int) -> list[list[int]]:
    """Indices of consecutive sub-batches, in order, each of at most `max_batch_size` items whose costs sum to
    at most `max_cost`; an item costlier than `max_cost` on its own forms a sub-batch of one."""
    batches: list[list[int]] = []
    total = 0
    for i, cost in enumerate(costs):
        if not batches or len(batches[-1]) >= max_batch_size or total + cost > max_cost:
            batches.append([])
            total = 0
        batches[-1].append(i)
        total += cost
    return batches


class QueueBatcher:
    """`await batcher(item)` -> `run(items)[i]`, with `run` (blocking) in a worker thread, one batch at a time.

    A batch that raises is retried one item at a time, so one failing item fails only its own caller.
    `wait_s`: how long a batch that is not full waits for company before it runs (0: not at all).
    """

    def __init__(self, run: Callable[[list], list], *, max_batch_size: int, max_cost: int,
                 cost: Callable[[Any], int], wait_s: float = 0.0):
        self.run, self.cost = run, cost
        self.max_batch_size, self.max_cost, self.wait_s = max_batch_size, max_cost, wait_s
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # of the latest batches, in order (tests read it)
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if self.wait_s > 0 and len(self._queue) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            while self._queue:
                await self._run_next()

    async def _run_next(self) -> None:
        self._queue = [(item, f) for item, f in self._queue if not f.cancelled()]
        if not self._queue:
            return
        first = split_by_cost([self.cost(item) for item, _ in self._queue], self.max_batch_size, self.max_cost)[0]
        batch, self._queue = self._queue[:len(first)], self._queue[len(first):]
        self.batch_sizes.append(len(batch))
        try:
            results = await asyncio.to_thread(self.run, [item for item, _ in batch])
        except Exception as e:  # noqa: BLE001 - handed to the callers below
            if len(batch) == 1:
                _settle(batch[0][1], error=e)
                return
            for item, future in batch:  # which item failed is unknown: each alone, so only its caller fails
                try:
                    _settle(future, result=(await asyncio.to_thread(self.run, [item]))[0])
                except Exception as single:  # noqa: BLE001
                    _settle(future, error=single)
            return
        for (_, future), result in zip(batch, results):
            _settle(future, result=result)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

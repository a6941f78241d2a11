"""`QueueBatcher` and `split_by_cost`: a lone call runs at once, calls that arrive while a batch runs form the
next batch, batches stay under their count and cost bounds in arrival order, and a failing item fails only
its own caller."""

from __future__ import annotations

import asyncio
import threading
import time

from qzoom_service.serve.batching import QueueBatcher, split_by_cost


def test_split_by_cost_keeps_order_and_both_bounds():
    assert split_by_cost([3, 3, 3, 3], max_batch_size=8, max_cost=7) == [[0, 1], [2, 3]]
    assert split_by_cost([1] * 5, max_batch_size=2, max_cost=100) == [[0, 1], [2, 3], [4]]
    assert split_by_cost([], max_batch_size=2, max_cost=10) == []


def test_an_item_over_the_cost_bound_runs_alone_and_does_not_hold_back_the_cheap_ones():
    assert split_by_cost([1, 50, 1, 1], max_batch_size=8, max_cost=10) == [[0], [1], [2, 3]]
    assert split_by_cost([50, 1, 1], max_batch_size=8, max_cost=10) == [[0], [1, 2]]


class _Slow:
    """run(items) that takes `seconds` per batch and records each batch, from a worker thread."""

    def __init__(self, seconds: float):
        self.seconds, self.batches, self.lock = seconds, [], threading.Lock()

    def __call__(self, items):
        time.sleep(self.seconds)
        with self.lock:
            self.batches.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [f"done {x}" for x in items]


def test_a_lone_call_is_not_delayed():
    run = _Slow(0.0)
    batcher = QueueBatcher(run, max_batch_size=8, max_cost=100, cost=lambda x: 1)

    async def one():
        started = time.perf_counter()
        result = await batcher("a")
        return result, time.perf_counter() - started

    result, seconds = asyncio.run(one())
    assert result == "done a" and seconds < 0.05


def test_calls_arriving_while_a_batch_runs_form_the_next_batch_within_the_bounds():
    run = _Slow(0.2)
    batcher = QueueBatcher(run, max_batch_size=3, max_cost=100, cost=lambda x: 1)

    async def many():
        first = asyncio.create_task(batcher("x0"))
        await asyncio.sleep(0.05)  # x0 is running; the next five queue behind it
        rest = [asyncio.create_task(batcher(f"x{i}")) for i in range(1, 6)]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(many())
    assert results == [f"done x{i}" for i in range(6)]
    assert run.batches == [["x0"], ["x1", "x2", "x3"], ["x4", "x5"]]
    assert list(batcher.batch_sizes) == [1, 3, 2]


def test_the_cost_bound_splits_a_queue_in_arrival_order():
    run = _Slow(0.1)
    batcher = QueueBatcher(run, max_batch_size=8, max_cost=10, cost=len)

    async def many():
        first = asyncio.create_task(batcher("a"))
        await asyncio.sleep(0.03)
        rest = [asyncio.create_task(batcher(x)) for x in ["b", "c" * 20, "d", "e"]]
        return await asyncio.gather(first, *rest)

    asyncio.run(many())
    assert run.batches == [["a"], ["b"], ["c" * 20], ["d", "e"]]


def test_a_failing_item_fails_only_its_own_caller():
    run = _Slow(0.05)
    batcher = QueueBatcher(run, max_batch_size=8, max_cost=100, cost=lambda x: 1)

    async def many():
        first = asyncio.create_task(batcher("a"))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(batcher(x)) for x in ["b", "bad", "c"]]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    a, b, bad, c = asyncio.run(many())
    assert (a, b, c) == ("done a", "done b", "done c")
    assert isinstance(bad, ValueError) and str(bad) == "bad item"

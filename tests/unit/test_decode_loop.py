"""The decode loop batches rows as they arrive: a late short answer joins a running decode and finishes first,
every row still gets exactly its one-at-a-time tokens, errors fail only the rows they hit, shutdown is clean."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qzoom_service import decode
from qzoom_service.decode_loop import DecodeLoop
from qzoom_service.errors import Unavailable
from qzoom_service.tiny import build_tiny

from .decode_helpers import make_item, prefilled, reference, standard_rows

WAIT = 120  # seconds; a result later than this means the loop hung


@pytest.fixture(scope="module")
def model():
    return build_tiny(seed=1)[0]


@pytest.fixture(scope="module")
def rows(model):
    return standard_rows(model)


def _wait_until(condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_short_request_joins_a_running_decode_and_finishes_first(model, rows):
    long_row, short_row = rows[0], rows[2]  # the joining prompt is longer: the running row gets re-padded
    finished = []
    with DecodeLoop(model, max_rows=4) as loop:
        long_future = loop.submit(make_item(long_row, 300, 1.0, set()))
        long_future.add_done_callback(lambda f: finished.append("long"))
        _wait_until(lambda: loop.live == 1)
        short_future = loop.submit(make_item(short_row, 4, 1.05, set()))
        short_future.add_done_callback(lambda f: finished.append("short"))
        short_ids = short_future.result(WAIT)
        assert not long_future.done(), "the short answer was held until the long one finished"
        long_ids = long_future.result(WAIT)
    assert finished == ["short", "long"]
    assert short_ids == reference(model, short_row, 4, 1.05, set())
    assert long_ids == reference(model, long_row, 300, 1.0, set())


@pytest.mark.parametrize("check_every", [1, 4])
def test_concurrent_submits_from_threads_get_their_single_decodes(model, rows, monkeypatch, check_every):
    extra = [prefilled(model, n, seed=10 + n, offset=float(n % 5)) for n in (3, 30, 17, 8)]
    all_rows = rows + extra
    jobs = [(row, 5 + 3 * (i % 4), (1.0, 1.1, 1.3)[i % 3], set()) for i, row in enumerate(all_rows)]
    plain = reference(model, all_rows[1], 6, 1.0, set())
    jobs.append((all_rows[1], 12, 1.0, {plain[3]}))  # a stop id
    expected = [reference(model, *job) for job in jobs]

    sizes = []
    join = decode.DecodeBatch.join

    def recording_join(self, items, keys):
        done = join(self, items, keys)
        sizes.append(len(self))
        return done

    monkeypatch.setattr(decode.DecodeBatch, "join", recording_join)
    start = threading.Barrier(len(jobs))
    with DecodeLoop(model, max_rows=3, check_every=check_every) as loop:
        def run(job):
            start.wait()
            return loop.submit(make_item(*job)).result(WAIT)

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(run, jobs))
    assert got == expected
    assert max(sizes) == 3 and len(sizes) > 1  # bounded, and rows joined a running batch


def test_asyncio_callers_await_their_ids(model, rows):
    async def both(loop):
        return await asyncio.gather(loop.decode(make_item(rows[1], 6, 1.0, set())),
                                    loop.decode(make_item(rows[3], 9, 1.2, set())))

    with DecodeLoop(model) as loop:
        got = asyncio.run(both(loop))
    assert got == [reference(model, rows[1], 6, 1.0, set()), reference(model, rows[3], 9, 1.2, set())]


def test_an_item_that_cannot_join_fails_alone(model, rows):
    broken = make_item(rows[0], 5, 1.0, set())
    broken.cache.layers.pop()  # a cache missing a layer cannot decode
    with DecodeLoop(model) as loop:
        good = loop.submit(make_item(rows[1], 5, 1.0, set()))
        bad = loop.submit(broken)
        with pytest.raises(AssertionError, match="layers"):
            bad.result(WAIT)
        assert good.result(WAIT) == reference(model, rows[1], 5, 1.0, set())


def test_a_failing_step_fails_its_rows_and_the_loop_carries_on(model, rows, monkeypatch):
    step = decode.DecodeBatch.step
    failed = []

    def failing_once(self):
        if len(self) == 2 and not failed:  # once, while both rows are live
            failed.append(True)
            raise RuntimeError("device fell over")
        return step(self)

    monkeypatch.setattr(decode.DecodeBatch, "step", failing_once)
    with DecodeLoop(model) as loop:
        futures = [loop.submit(make_item(r, 50, 1.0, set())) for r in rows[:2]]
        for future in futures:
            with pytest.raises(RuntimeError, match="device fell over"):
                future.result(WAIT)
        assert loop.submit(make_item(rows[3], 4, 1.0, set())).result(WAIT) == reference(model, rows[3], 4, 1.0, set())


def test_close_finishes_submitted_work_then_refuses_more(model, rows):
    loop = DecodeLoop(model)
    futures = [loop.submit(make_item(r, 8, 1.0, set())) for r in rows]
    loop.close(timeout=WAIT)
    assert not loop._thread.is_alive()
    assert [f.result(0) for f in futures] == [reference(model, r, 8, 1.0, set()) for r in rows]
    with pytest.raises(Unavailable):
        loop.submit(make_item(rows[0], 1, 1.0, set()))

"""Throughput details of the pipeline (issue 6): garbage-collection thresholds while a run
is in progress (``_WhileRunning``: raised for the run, put back exactly when the last
overlapping run ends), the ledger's group commit (``_GroupCommit``: replies gathered within
a short window, never longer than until every connection's reply waits), and the render
pool's widened result pipe."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from digestd import pipeline


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*before)


def test_thresholds_are_raised_during_a_run_and_restored_after(
    thresholds: tuple[int, int, int],
) -> None:
    """enter raises the young-generation threshold; leave restores all three."""
    pipeline._WhileRunning.enter()
    try:
        assert gc.get_threshold()[0] == pipeline.RUN_GC_THRESHOLD
        assert gc.get_threshold()[1:] == thresholds[1:]
    finally:
        pipeline._WhileRunning.leave()
    assert gc.get_threshold() == thresholds


def test_overlapping_runs_restore_only_when_the_last_one_ends(
    thresholds: tuple[int, int, int],
) -> None:
    """Two runs that overlap (A starts, B starts, A ends, B ends) leave the thresholds as
    they found them, and raised until B ends."""
    pipeline._WhileRunning.enter()
    pipeline._WhileRunning.enter()
    pipeline._WhileRunning.leave()
    assert gc.get_threshold()[0] == pipeline.RUN_GC_THRESHOLD
    pipeline._WhileRunning.leave()
    assert gc.get_threshold() == thresholds
    assert pipeline._WhileRunning.active == 0


def test_a_higher_threshold_already_set_is_kept(thresholds: tuple[int, int, int]) -> None:
    """An operator's higher threshold is not lowered for the run."""
    gc.set_threshold(100_000, 10, 10)
    pipeline._WhileRunning.enter()
    assert gc.get_threshold()[0] == 100_000
    pipeline._WhileRunning.leave()
    assert gc.get_threshold() == (100_000, 10, 10)


class _CountingStore:
    """A unit seam standing in for Store.record_many: counts the groups committed."""

    def __init__(self) -> None:
        self.groups: list[int] = []

    async def record_many(self, results: list[object]) -> None:
        self.groups.append(len(results))


def _delivery(n: int) -> pipeline.Delivery:
    import datetime as dt

    return pipeline.Delivery(n, f"r{n}@example.org", dt.date(2026, 1, 1), f"<{n}@x>", "accepted")


async def test_group_commit_gathers_replies_within_its_window() -> None:
    """Replies recorded a little apart within the window go out in one commit, and each
    record() returns only after that commit."""
    import asyncio

    store = _CountingStore()
    ledger = pipeline._GroupCommit(store, {"ledger": 0.0}, full=10, window=0.5)  # type: ignore[arg-type]

    async def later(n: int) -> None:
        await asyncio.sleep(0.01 * n)
        await ledger.record(_delivery(n))

    await asyncio.gather(*(later(n) for n in range(5)))
    assert store.groups == [5]


async def test_group_commit_does_not_wait_once_every_connection_is_waiting() -> None:
    """With ``full`` replies pending the commit starts at once, not after the window."""
    import asyncio
    import time

    store = _CountingStore()
    ledger = pipeline._GroupCommit(store, {"ledger": 0.0}, full=4, window=30.0)  # type: ignore[arg-type]
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(ledger.record(_delivery(n)) for n in range(4))), 5)
    assert time.monotonic() - start < 5
    assert store.groups == [4]


def test_the_render_pool_result_pipe_is_widened() -> None:
    """The pipe that brings finished messages back from the render workers holds 1 MiB (a
    chunk crosses in a fill or two), and an executor without such a pipe is left alone."""
    import fcntl
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pipeline._widen_result_pipe(pool)
        reader = pool._result_queue._reader  # type: ignore[attr-defined]
        size = fcntl.fcntl(reader.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
        assert size >= pipeline.RESULT_PIPE_BYTES
    finally:
        pool.shutdown()
    with ThreadPoolExecutor(1) as threads:
        pipeline._widen_result_pipe(threads)  # no pipe: nothing happens, nothing raised

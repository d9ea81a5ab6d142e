"""Garbage-collection thresholds while a run is in progress (pipeline._GcWhileRunning):
raised for the run, put back exactly when the last overlapping run ends."""

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
    pipeline._GcWhileRunning.enter()
    try:
        assert gc.get_threshold()[0] == pipeline.RUN_GC_THRESHOLD
        assert gc.get_threshold()[1:] == thresholds[1:]
    finally:
        pipeline._GcWhileRunning.leave()
    assert gc.get_threshold() == thresholds


def test_overlapping_runs_restore_only_when_the_last_one_ends(
    thresholds: tuple[int, int, int],
) -> None:
    """Two runs that overlap (A starts, B starts, A ends, B ends) leave the thresholds as
    they found them, and raised until B ends."""
    pipeline._GcWhileRunning.enter()
    pipeline._GcWhileRunning.enter()
    pipeline._GcWhileRunning.leave()
    assert gc.get_threshold()[0] == pipeline.RUN_GC_THRESHOLD
    pipeline._GcWhileRunning.leave()
    assert gc.get_threshold() == thresholds
    assert pipeline._GcWhileRunning.active == 0


def test_a_higher_threshold_already_set_is_kept(thresholds: tuple[int, int, int]) -> None:
    """An operator's higher threshold is not lowered for the run."""
    gc.set_threshold(100_000, 10, 10)
    pipeline._GcWhileRunning.enter()
    assert gc.get_threshold()[0] == 100_000
    pipeline._GcWhileRunning.leave()
    assert gc.get_threshold() == (100_000, 10, 10)

"""glibc malloc while a run is in progress (issue 6): freed message and chunk buffers stay in
the heap for reuse instead of being unmapped and faulted in again (``tune_malloc``), and
after the run the heap's free memory goes back to the kernel (``release_malloc``). Checked
on the allocator itself, in fresh processes, through glibc's ``mallinfo2``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from conftest import missing

from digestd import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _glibc_with_mallinfo2() -> bool:
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return False
    return pipeline._libc() is not None


def needs_glibc() -> None:
    """Skip where the C library is not glibc >= 2.33 (mallopt, malloc_trim, mallinfo2);
    under DIGESTD_REQUIRE_TOOLS=1 (CI, on Debian) that is a failure, not a skip."""
    if not _glibc_with_mallinfo2():
        missing("needs glibc >= 2.33 (mallopt, malloc_trim, mallinfo2)")


_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    sys.path.insert(0, {root!r})
    from digestd import pipeline

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def info():
        return libc.mallinfo2()

    {body}
    """
)


def _probe(body: str) -> list[int]:
    code = _PROBE.format(root=ROOT, body=textwrap.indent(textwrap.dedent(body), "").strip())
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return [int(x) for x in out.stdout.split()]


def test_large_buffers_come_from_the_heap_while_tuned() -> None:
    """With glibc's defaults a fresh process maps a 4 MB buffer on its own (mmap, unmapped
    again when freed); tuned, it comes from the heap and stays there for the next one."""
    needs_glibc()
    default, tuned = (
        _probe(
            f"""
            {setup}
            before = info().hblkhd
            block = bytearray(4 << 20)
            print(info().hblkhd - before)
            """
        )[0]
        for setup in ("", "assert pipeline.tune_malloc()")
    )
    assert default >= 4 << 20
    assert tuned == 0


def test_release_gives_the_free_heap_back() -> None:
    """Tuned, 48 MB freed at the heap top is kept (no trimming below 64 MB); release_malloc
    gives it back to the kernel."""
    needs_glibc()
    kept, released = _probe(
        """
        assert pipeline.tune_malloc()
        blocks = [bytearray(1 << 20) for _ in range(48)]
        del blocks
        kept = info().fordblks
        assert pipeline.release_malloc()
        print(kept, info().fordblks)
        """
    )
    assert kept >= 40 << 20
    assert released < 8 << 20


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_without_glibc_nothing_is_touched(monkeypatch: Any) -> None:
    """Another libc (no mallopt) or another platform: both are no-ops that say so."""
    monkeypatch.setattr(pipeline, "_libc", lambda: None)
    assert pipeline.tune_malloc() is False
    assert pipeline.release_malloc() is False
    pipeline._WhileRunning.enter()
    pipeline._WhileRunning.leave()
    assert pipeline._WhileRunning.active == 0


def test_overlapping_runs_tune_once_and_release_after_the_last(monkeypatch: Any) -> None:
    """The first run to start tunes, the last to end releases; none in between."""
    fake = _FakeLibc()
    monkeypatch.setattr(pipeline, "_libc", lambda: fake)
    pipeline._WhileRunning.enter()
    pipeline._WhileRunning.enter()
    assert [c[1] for c in fake.calls] == [-3, -1, -2]
    assert (fake.calls[0][2], fake.calls[1][2]) == (
        pipeline.RUN_MMAP_THRESHOLD,
        pipeline.RUN_TRIM_THRESHOLD,
    )
    pipeline._WhileRunning.leave()
    assert len(fake.calls) == 3
    pipeline._WhileRunning.leave()
    assert fake.calls[3:] == [
        ("mallopt", -1, pipeline._GLIBC_TRIM_THRESHOLD),
        ("mallopt", -2, 0),
        ("malloc_trim", 0, 0),
    ]
    assert pipeline._WhileRunning.active == 0


def test_a_failed_mallopt_is_reported(monkeypatch: Any) -> None:
    """mallopt returns 0 for a value it refuses: tune_malloc says it did not tune."""
    fake = _FakeLibc()
    fake.mallopt = lambda param, value: 0  # type: ignore[method-assign]
    assert pipeline.tune_malloc(fake) is False

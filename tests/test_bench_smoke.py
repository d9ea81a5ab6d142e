"""bench/delivery.py on a tiny N, so the harness cannot rot. No timing is asserted: only that
it runs end to end (store, smtp-sink, `digestd run-once`, smtp-source, chart) and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_delivery_runs_end_to_end(tmp_path: Path) -> None:
    """A 300-subscriber run sends every non-empty digest through smtp-sink, runs the
    smtp-source reference, prints every figure and writes the PNG chart."""
    require_tool("smtp-sink", "/usr/sbin/smtp-sink")
    require_tool("smtp-source", "/usr/sbin/smtp-source")
    chart = tmp_path / "chart.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "delivery.py"),
            "--n",
            "150",
            "300",
            "--sessions",
            "4",
            "--chart",
            str(chart),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "`digestd --help` start-up:" in out
    for n in ("150", "300"):
        assert f"== N = {n}:" in out
    sent = [int(x.replace(",", "")) for x in re.findall(r"run-once: ([\d,]+) sent", out)]
    assert len(sent) == 2 and all(s > 0 for s in sent)
    ledgers = re.findall(r"ledger: \{'accepted': (\d+)\}", out)
    assert [int(x) for x in ledgers] == sent  # every message sent was accepted and recorded
    assert out.count("smtp-source ") == 2 and out.count("ratio ") == 2
    for stage in ("select", "render", "send", "ledger"):
        assert stage in out
    assert "peak RSS: digestd" in out and "peak RSS 300 vs 150" in out
    assert out.count("page faults per message") == 2
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_render_runs_and_matches_the_whole_templates() -> None:
    """bench/render.py on a few hundred subscribers prints both figures and finds the fast
    path's messages byte-identical to the whole templates' (it exits non-zero if not)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "render.py"),
            "--subscribers",
            "300",
            "--warm",
            "100",
            "--reference-sample",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "µs per subscriber" in result.stdout
    assert "byte-identical" in result.stdout and "ratio:" in result.stdout
    assert "peak RSS:" in result.stdout


@pytest.mark.slow
def test_bench_transport_runs_next_to_smtp_source() -> None:
    """bench/transport.py sends every message through smtp-sink, all accepted, and prints
    its rate next to smtp-source's."""
    require_tool("smtp-sink", "/usr/sbin/smtp-sink")
    require_tool("smtp-source", "/usr/sbin/smtp-source")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "transport.py"), "--n", "300", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "{'accepted': 300}" in result.stdout
    assert "smtp-source" in result.stdout and "ratio" in result.stdout

"""The event loop the commands run on: uvloop by default, the standard one on request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop
from click.testing import CliRunner
from conftest import FIXTURES

from digestd import cli

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_commands_run_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, a command's coroutine runs on uvloop's loop."""
    monkeypatch.delenv(cli.LOOP_ENV, raising=False)
    assert cli.loop_factory() is uvloop.new_event_loop
    assert cli._run(_loop_type()) is uvloop.Loop


@pytest.mark.parametrize("value", ["asyncio", "AsyncIO", " asyncio "])
def test_standard_loop_on_request(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """DIGESTD_EVENT_LOOP=asyncio runs the standard library's loop (a debugging aid)."""
    monkeypatch.setenv(cli.LOOP_ENV, value)
    assert cli.loop_factory() is None
    loop_type = cli._run(_loop_type())
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_uvloop_asked_for_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.LOOP_ENV, "uvloop")
    assert cli._run(_loop_type()) is uvloop.Loop


@pytest.mark.parametrize("value", ["trio", "x" * 10_000, "uvloop;rm -rf /"])
def test_unknown_loop_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    """An unknown value stops the command with exit code 2, says what is expected, and
    touches nothing (the store is not even created)."""
    store = tmp_path / "d.sqlite3"
    config = tmp_path / "digestd.toml"
    config.write_text(
        f'''[digest]
from_address = "papers@example.org"
[store]
path = "{store}"
[[sources]]
kind = "file"
path = "{PAPERS}"
'''
    )
    monkeypatch.setenv(cli.LOOP_ENV, value)
    result = CliRunner().invoke(cli.cli, ["--config", str(config), "status"])
    assert result.exit_code == cli.EXIT_USAGE, result.output
    assert "DIGESTD_EVENT_LOOP" in result.output
    assert "expected 'uvloop' or 'asyncio'" in result.output
    assert len(result.output) < 500  # a hostile value is not echoed whole
    assert not store.exists()


def test_without_uvloop_the_standard_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop missing (a platform without it): the standard loop, unless uvloop is asked
    for by name, which is a usage error rather than a silent fallback."""
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    monkeypatch.delenv(cli.LOOP_ENV, raising=False)
    assert cli.loop_factory() is None
    assert cli._run(_loop_type()) is not uvloop.Loop
    for value in ("uvloop", "trio"):  # an unknown value is refused here too
        monkeypatch.setenv(cli.LOOP_ENV, value)
        with pytest.raises(SystemExit) as exc:
            cli.loop_factory()
        assert exc.value.code == cli.EXIT_USAGE

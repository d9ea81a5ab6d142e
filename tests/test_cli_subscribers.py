"""Subscriber commands, driven in-process (click's runner) and as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from digestd.cli import cli

PAPERS = FIXTURES / "hf" / "daily_papers_month-2025-11_items-for-2025-11-07_final.json"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "digestd.toml"
    path.write_text(
        f"""
[digest]
from_address = "papers@example.org"
[store]
path = "{tmp_path / "d.sqlite3"}"
[[sources]]
kind = "file"
path = "{PAPERS}"
"""
    )
    return path


def invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_add_show_list_set_pause_resume_remove(config: Path) -> None:
    """The whole subscriber life cycle, with --json output checked."""
    code, out, err = invoke(
        config,
        "subscribers",
        "add",
        "ada@example.org",
        "--name",
        "Ada",
        "--keyword",
        "mixture of experts",
        "--keyword",
        "state space model",
        "--exclude",
        "survey",
        "--category",
        "cs.LG",
        "--author",
        "Ada Lovelace",
        "--max-papers",
        "8",
        "--min-upvotes",
        "2",
        "--timezone",
        "Europe/London",
        "--send-at",
        "07:30",
        "--cadence",
        "weekdays",
    )
    assert code == 0, err
    code, out, _ = invoke(config, "subscribers", "show", "ada@example.org", "--json")
    data = json.loads(out)
    assert data == {
        "email": "ada@example.org",
        "name": "Ada",
        "keywords": ["mixture of experts", "state space model"],
        "exclude": ["survey"],
        "categories": ["cs.LG"],
        "authors": ["Ada Lovelace"],
        "seed_papers": [],
        "max_papers": 8,
        "min_upvotes": 2,
        "timezone": "Europe/London",
        "send_at": "07:30",
        "cadence": "weekdays",
        "status": "active",
    }
    assert (
        invoke(
            config,
            "subscribers",
            "set",
            "ada@example.org",
            "--keyword",
            "diffusion",
            "--max-papers",
            "3",
            "--clear",
            "exclude",
        )[0]
        == 0
    )
    data = json.loads(invoke(config, "subscribers", "show", "ada@example.org", "--json")[1])
    assert (data["keywords"], data["max_papers"], data["exclude"], data["categories"]) == (
        ["diffusion"],
        3,
        [],
        ["cs.LG"],
    )
    assert invoke(config, "subscribers", "pause", "ada@example.org")[0] == 0
    listed = json.loads(invoke(config, "subscribers", "list", "--json")[1])
    assert [(s["email"], s["status"]) for s in listed] == [("ada@example.org", "paused")]
    assert invoke(config, "subscribers", "resume", "ada@example.org")[0] == 0
    assert (
        json.loads(invoke(config, "subscribers", "show", "ada@example.org", "--json")[1])["status"]
        == "active"
    )
    assert invoke(config, "subscribers", "remove", "ada@example.org")[0] == 0
    code, _, err = invoke(config, "subscribers", "show", "ada@example.org")
    assert code == 2 and "no subscriber" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-an-address"], "email"),
        (["a@example.org\r\nBcc: evil@example.org"], "control character"),
        (["a@example.org", "--timezone", "Mars/Base"], "timezone"),
        (["a@example.org", "--send-at", "7am"], "send_at"),
        (["a@example.org", "--max-papers", "0"], "max_papers"),
        (["a@example.org", "--keyword", "bad\nkeyword"], "control character"),
        (["a@example.org", "--name", "Eve\r\nBcc: x@evil.org"], "control character"),
        (["a@example.org", "--category", "not a category"], "category"),
        (["a@example.org", "--seed-paper", "abc"], "seed paper"),
        (["a@example.org", "--keyword", "x" * 5000], "longer than"),
    ],
)
def test_invalid_add_exits_2_and_changes_nothing(
    config: Path, args: list[str], message: str
) -> None:
    """Each invalid value exits 2 naming the problem; no subscriber is created."""
    code, _, err = invoke(config, "subscribers", "add", *args)
    assert code == 2
    assert message in err
    assert json.loads(invoke(config, "subscribers", "list", "--json")[1]) == []


def test_duplicate_add_exits_2(config: Path) -> None:
    """Adding an address twice is refused."""
    assert invoke(config, "subscribers", "add", "a@example.org")[0] == 0
    code, _, err = invoke(config, "subscribers", "add", "A@example.org")
    assert code == 2 and "already subscribed" in err


def test_seed_paper_known_in_store_is_accepted(config: Path, tmp_path: Path) -> None:
    """A seed paper the store has seen is accepted at add time with no network."""
    import asyncio

    from digestd.models import Paper
    from digestd.store import Store

    async def seed() -> None:
        async with Store.open(tmp_path / "d.sqlite3") as store:
            await store.upsert_papers([Paper(id="2511.04570", title="T", abstract="A")])

    asyncio.run(seed())
    code, _, err = invoke(
        config, "subscribers", "add", "a@example.org", "--seed-paper", "arXiv:2511.04570v1"
    )
    assert code == 0, err
    data = json.loads(invoke(config, "subscribers", "show", "a@example.org", "--json")[1])
    assert data["seed_papers"] == ["2511.04570"]


def test_seed_paper_found_in_a_file_source_offline(config: Path) -> None:
    """A seed paper present in a configured `file` source is accepted with no network."""
    code, _, err = invoke(
        config, "subscribers", "add", "a@example.org", "--seed-paper", "2511.04460"
    )
    assert code == 0, err
    data = json.loads(invoke(config, "subscribers", "show", "a@example.org", "--json")[1])
    assert data["seed_papers"] == ["2511.04460"]


IMPORT_OK = """
[[subscriber]]
email = "ada@example.org"
name = "Ada"
keywords = ["mixture of experts", "state space model"]
exclude = ["survey"]
categories = ["cs.LG"]
authors = []
max_papers = 8
timezone = "Europe/London"
send_at = "07:30"
cadence = "daily"

[[subscriber]]
email = "grace@example.org"
"""


def test_import_export_round_trip(config: Path, tmp_path: Path) -> None:
    """Import the spec's file, export it, and import the export: nothing changes."""
    src = tmp_path / "subs.toml"
    src.write_text(IMPORT_OK)
    code, out, err = invoke(config, "subscribers", "import", str(src))
    assert code == 0, err
    assert "2 added" in out
    code, exported, _ = invoke(config, "subscribers", "export", "--format", "toml")
    again = tmp_path / "again.toml"
    again.write_text(exported)
    code, out, _ = invoke(config, "subscribers", "import", str(again))
    assert code == 0 and "2 updated" in out
    assert invoke(config, "subscribers", "export", "--format", "toml")[1] == exported
    as_json = json.loads(invoke(config, "subscribers", "export", "--format", "json")[1])
    assert as_json[0]["keywords"] == ["mixture of experts", "state space model"]


def test_import_reports_every_bad_row_and_imports_nothing(config: Path, tmp_path: Path) -> None:
    """All or nothing: each bad row is reported with its line; the good rows are not added."""
    src = tmp_path / "subs.toml"
    src.write_text(
        IMPORT_OK
        + '\n[[subscriber]]\nemail = "bad address"\n'
        + '\n[[subscriber]]\nemail = "tz@example.org"\ntimezone = "Nowhere"\nfavourite = 1\n'
        + '\n[[subscriber]]\nemail = "ada@example.org"\n'
    )
    code, _, err = invoke(config, "subscribers", "import", str(src))
    assert code == 2
    lines = err.strip().splitlines()
    assert any(":17:" in line and "bad address" in line for line in lines), err
    assert any(":20:" in line and "timezone" in line for line in lines), err
    assert any(":20:" in line and "favourite: unknown key" in line for line in lines), err
    assert any(":25:" in line and "already appears at line 2" in line for line in lines), err
    assert json.loads(invoke(config, "subscribers", "list", "--json")[1]) == []


def test_import_dry_run_and_garbage(config: Path, tmp_path: Path) -> None:
    """--dry-run changes nothing; a broken TOML file exits 2 with the syntax error."""
    src = tmp_path / "subs.toml"
    src.write_text(IMPORT_OK)
    code, out, _ = invoke(config, "subscribers", "import", str(src), "--dry-run")
    assert code == 0 and "would import 2" in out
    assert json.loads(invoke(config, "subscribers", "list", "--json")[1]) == []
    src.write_text("[[subscriber]\nemail=")
    code, _, err = invoke(config, "subscribers", "import", str(src))
    assert code == 2 and "TOML syntax error" in err
    src.write_bytes(b"\xff\xfe garbage")
    code, _, err = invoke(config, "subscribers", "import", str(src))
    assert code == 2 and "not UTF-8" in err


def test_every_command_has_help_with_an_example(config: Path) -> None:
    """`--help` of every command shows an Example."""
    commands = [["run"], ["run-once"], ["demo"], ["preview"], ["status"], ["check-config"]] + [
        ["subscribers", c]
        for c in ("add", "set", "show", "list", "remove", "pause", "resume", "import", "export")
    ]
    for command in commands:
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Example" in result.output, command


def test_subprocess_python_m_and_bad_config(tmp_path: Path) -> None:
    """`python -m digestd` works and a missing config exits 2 with one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "digestd", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "run-once" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "digestd",
            "--config",
            str(tmp_path / "none.toml"),
            "subscribers",
            "list",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr

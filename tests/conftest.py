"""Shared test helpers.

Tests that need a system tool call :func:`require_tool`: it skips with a reason when the
tool is missing, unless ``DIGESTD_REQUIRE_TOOLS=1`` (set by ``.ci/run``), where a missing
tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
from httpserver import ScriptedServer

from digestd.config import FetchConfig
from digestd.sources import make_client

FIXTURES = Path(__file__).parent / "fixtures"
ARTIFACTS = Path(__file__).parent / "artifacts"


def require_tool(name: str, path: str | None = None) -> str:
    """Return the tool's path, or skip (fail under DIGESTD_REQUIRE_TOOLS=1) when missing."""
    found = path if path and Path(path).exists() else shutil.which(name)
    if found:
        return found
    missing(f"{name} is not installed (apt-get install it, or run .ci/run)")


def missing(message: str) -> NoReturn:
    """Skip for a missing part of the system, or fail under DIGESTD_REQUIRE_TOOLS=1."""
    if os.environ.get("DIGESTD_REQUIRE_TOOLS") == "1":
        pytest.fail(message + " and DIGESTD_REQUIRE_TOOLS=1")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A real HTTP server on 127.0.0.1 replaying scripted replies (tests/httpserver.py).
    Test modules that need another kind of server define their own ``server``."""
    with ScriptedServer() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The sources' shared HTTP client, as the pipeline makes it."""
    async with make_client(FetchConfig(timeout=5)) as c:
        yield c

"""digestd.notify: sd_notify datagrams on real AF_UNIX sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from digestd.notify import Notifier, monotonic_usec


@pytest.fixture
def sock_path() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    directory = tempfile.mkdtemp(prefix="dn-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_with_status_on_a_path_socket(sock_path: tuple[socket.socket, str]) -> None:
    """READY=1 and STATUS= arrive in one datagram on a filesystem socket."""
    sock, path = sock_path
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("all good")
    assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "all good"}


def test_abstract_socket() -> None:
    """An '@' address is the abstract namespace (leading NUL byte)."""
    name = f"digestd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier(f"@{name}")
        assert notifier.watchdog()
        assert fields(sock.recv(4096)) == {"WATCHDOG": "1"}
        assert notifier.stopping("bye")
        assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "bye"}


def test_reloading_carries_monotonic_usec(sock_path: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC= from CLOCK_MONOTONIC, in microseconds."""
    sock, path = sock_path
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = fields(sock.recv(4096))
    assert got["RELOADING"] == "1"
    assert before <= int(got["MONOTONIC_USEC"]) <= after
    assert before <= monotonic_usec()


def test_status_cannot_forge_fields(sock_path: tuple[socket.socket, str]) -> None:
    """A newline in a STATUS text cannot start a forged READY=1 (or any other) field."""
    sock, path = sock_path
    Notifier(path).status("subject line\nREADY=1\r\nSTOPPING=1")
    got = fields(sock.recv(4096))
    assert list(got) == ["STATUS"]
    assert "\n" not in got["STATUS"]


def test_huge_status_is_truncated(sock_path: tuple[socket.socket, str]) -> None:
    """A very long status is cut to one short line instead of an oversized datagram."""
    sock, path = sock_path
    assert Notifier(path).status("x" * 1_000_000)
    assert len(fields(sock.recv(65536))["STATUS"]) <= 200


def test_no_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval() is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that does not exist is logged, not raised."""
    notifier = Notifier(str(tmp_path / "missing"))
    assert notifier.ready() is False
    assert notifier.status("still fine") is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    """WATCHDOG_USEC (for this pid) → ping every half of it; malformed values disable it."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", **env})
    assert notifier.watchdog_interval() == interval


def test_watchdog_pid_matching_ours_enables_it() -> None:
    """WATCHDOG_PID equal to our pid keeps the watchdog on."""
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval() == 0.5

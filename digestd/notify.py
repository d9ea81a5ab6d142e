"""systemd's notify protocol (sd_notify), without a dependency.

systemd passes ``$NOTIFY_SOCKET``: a path, or an abstract socket name starting with ``@``.
Each message is one datagram of ``KEY=VALUE`` lines. Without ``$NOTIFY_SOCKET`` (not under
systemd, or ``Type=simple``) every call is a no-op.

``$WATCHDOG_USEC`` (set by ``WatchdogSec=``) asks for ``WATCHDOG=1`` at least that often;
:meth:`Notifier.watchdog_interval` returns half of it, which is how often we ping.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

# Keep STATUS= short: systemctl shows one line.
_MAX_STATUS = 200


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _clean(value: str) -> str:
    # One line per field: a newline would start a new (forged) field.
    return " ".join(str(value).split())


class Notifier:
    """Send sd_notify messages to ``address`` (None: do nothing)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(raw)
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2_000_000

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()  # abstract namespace
        return self.address

    def send(self, fields: Mapping[str, str | int]) -> bool:
        """Send one datagram; True when it went out. Failures are logged once, never raised."""
        if self.address is None:
            return False
        payload = "\n".join(f"{key}={_clean(str(value))}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload.encode(), self._target())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify failed", socket=self.address, error=str(exc))
            return False
        return True

    # -------------------------------------------------------------- the messages we use
    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status[:_MAX_STATUS]
        return self.send(fields)

    def status(self, text: str) -> bool:
        return self.send({"STATUS": text[:_MAX_STATUS]})

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": 1})

    def reloading(self) -> bool:
        return self.send({"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()})

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status[:_MAX_STATUS]
        return self.send(fields)

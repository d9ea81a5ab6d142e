"""One sender at a time: an exclusive lock file beside the database.

``fcntl.flock`` locks are released by the kernel when the holder dies, even on SIGKILL, so a
crashed run never blocks the next one, while a second live ``run``/``run-once`` process (or a
timer firing twice) waits for the first to finish and then finds every digest already sent.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import DigestdError


class LockTimeout(DigestdError):
    pass


class RunLock:
    def __init__(self, db_path: Path, timeout: float = 3600.0) -> None:
        self.path = Path(str(db_path) + ".lock")
        self.timeout = timeout
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    async def __aenter__(self) -> RunLock:
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"another digestd run holds {self.path} (waited {self.timeout:.0f} s)"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

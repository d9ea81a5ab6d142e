"""The ``file`` source: a saved Hugging Face ``daily_papers`` JSON array on disk.

It is how tests, the demo and offline users feed papers in, and returns the same papers
whatever the date. Bad content is a :class:`~digestd.errors.PayloadError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from ..errors import PayloadError, SourceError
from ..models import Paper
from .hf import decode_json, parse_daily_papers

log = structlog.get_logger(__name__)

MAX_FILE_BYTES = 100_000_000


def load_papers_file(path: Path, *, source: str = "file") -> list[Paper]:
    """Papers from a saved ``daily_papers`` response (a JSON array of items).

    Raises :class:`SourceError` when the file cannot be read and :class:`PayloadError` when
    its content is not such an array (with the reason and the file's path).
    """
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PayloadError(f"{path}: file is larger than {MAX_FILE_BYTES} bytes")
        body = path.read_bytes()
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    data = decode_json(body, str(path))
    parsed = parse_daily_papers(data, source, str(path))
    if parsed.skipped:
        log.warning(
            "items skipped",
            source=source,
            path=str(path),
            skipped=parsed.skipped,
            reason="no valid id or title",
        )
    return parsed.papers

"""A small, real HTTP/1.1 server on 127.0.0.1 for tests: scripted replies, recorded requests.

It runs the stdlib ``ThreadingHTTPServer`` in a background thread, so async code under test
talks to it over a real socket. Each path (optionally narrowed by query parameters) has a
queue of :class:`Reply` objects served in order, the last one repeating::

    with ScriptedServer() as server:
        server.add("/api/daily_papers", Reply(status=503), Reply.file(FIXTURES / "hf/x.json"))
        ...  # point the client at server.url
        assert [r.query["p"] for r in server.requests] == ["0", "0"]

A :class:`Reply` can replay a recorded payload (:meth:`Reply.file`,
:meth:`Reply.recording`), set any status and headers (``Retry-After``, ``RateLimit``, …),
wait before answering (``delay``, cut short when the server stops), drop the connection
(``drop``), send fewer body bytes than it declares (``truncate``), or stream a body of any
size in chunks (``stream``, chunked unless ``content_length`` is given; ``drip`` pauses
between chunks). Unknown paths get a 404 with a JSON error object.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_CONTENT_TYPES = {
    ".json": "application/json",
    ".xml": "application/xml",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    truncate: int | None = None
    stream: Callable[[], Iterable[bytes]] | None = None
    content_length: int | None = None
    drip: float = 0.0

    @classmethod
    def file(cls, path: Path, status: int = 200, **kwargs: Any) -> Reply:
        """Replay a file's bytes, with a content type guessed from its suffix."""
        content_type = kwargs.pop("content_type", None) or _CONTENT_TYPES.get(
            path.suffix, "application/octet-stream"
        )
        return cls(status=status, body=path.read_bytes(), content_type=content_type, **kwargs)

    @classmethod
    def json(cls, value: object, status: int = 200, **kwargs: Any) -> Reply:
        return cls(status=status, body=json.dumps(value).encode(), **kwargs)

    @classmethod
    def recording(cls, path: Path) -> Reply:
        """An arxiv.py golden recording ``{url, status_code, body}``: its status, and the
        exact body bytes from the sibling ``.body.xml`` file."""
        meta = json.loads(path.read_text())
        body = path.with_suffix(".body.xml").read_bytes()
        return cls(status=int(meta["status_code"]), body=body, content_type="application/atom+xml")


@dataclass(frozen=True)
class Request:
    """A request the server received; ``at`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


@dataclass
class _Route:
    path: str
    query: dict[str, str]
    replies: list[Reply]
    served: int = 0

    def matches(self, path: str, query: Mapping[str, str]) -> bool:
        return path == self.path and all(query.get(k) == v for k, v in self.query.items())

    def next_reply(self) -> Reply:
        reply = self.replies[min(self.served, len(self.replies) - 1)]
        self.served += 1
        return reply


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client stopped reading: that is its right

    def _answer(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        owner._record(Request(self.command, parts.path, query, headers, time.monotonic()))
        reply = owner._reply_for(parts.path, query)
        if reply.delay and owner._stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.stream is not None:
            self._send_stream(reply)
            return
        self.send_header("Content-Length", str(reply.content_length or len(reply.body)))
        self.end_headers()
        if reply.truncate is not None:
            self.wfile.write(reply.body[: reply.truncate])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(reply.body)

    def _send_stream(self, reply: Reply) -> None:
        assert reply.stream is not None
        chunked = reply.content_length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(reply.content_length))
        self.end_headers()
        for chunk in reply.stream():
            if self.server.owner._stopping.is_set():
                self.close_connection = True
                return
            if chunk:
                framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                self.wfile.write(framed)
                self.server.owner._sent(len(chunk))
            if reply.drip and self.server.owner._stopping.wait(reply.drip):
                self.close_connection = True
                return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: ScriptedServer


class ScriptedServer:
    """The server: :meth:`add` routes, read :attr:`requests`, use as a context manager."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Request] = []
        self.streamed_bytes = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- scripting -------------------------------------------------------------------
    def add(self, path: str, *replies: Reply, query: Mapping[str, str] | None = None) -> None:
        """Serve ``replies`` in order at ``path`` (the last repeats). With ``query``, only
        requests carrying those parameter values match; more specific routes win."""
        if not replies:
            raise ValueError("add() needs at least one Reply")
        with self._lock:
            self._routes.append(_Route(path, dict(query or {}), list(replies)))
            self._routes.sort(key=lambda r: -len(r.query))

    def requests_to(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> ScriptedServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- used by the handler ---------------------------------------------------------
    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _sent(self, n: int) -> None:
        with self._lock:
            self.streamed_bytes += n

    def _reply_for(self, path: str, query: Mapping[str, str]) -> Reply:
        with self._lock:
            for route in self._routes:
                if route.matches(path, query):
                    return route.next_reply()
        return Reply.json({"error": f"no route for {path}"}, status=404)


def repeat(chunk: bytes, times: int) -> Callable[[], Iterator[bytes]]:
    """A ``stream`` factory yielding ``chunk`` ``times`` times (``times=-1``: forever)."""

    def gen() -> Iterator[bytes]:
        n = 0
        while times < 0 or n < times:
            yield chunk
            n += 1

    return gen

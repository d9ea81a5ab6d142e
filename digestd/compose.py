"""The RFC 5322 message: headers folded by the stdlib ``email`` package, MIME laid out here.

:func:`build_message` turns finished text and HTML bodies plus a :class:`MessageHeaders`
into the exact bytes handed to the transport: ``multipart/alternative`` with the plain-text
part first, UTF-8, each body quoted-printable or base64 (whichever is smaller), CRLF line
ends, no line over 998 octets, and a boundary derived from the Message-ID so the same
input always gives the same bytes.

Header safety: every value passes :func:`header_text` (control and format characters,
CR/LF included, removed; whitespace collapsed; length bounded) and is then set through
``email.headerregistry`` under ``email.policy.SMTP``, which quotes display names and
RFC 2047-encodes non-ASCII. ``List-Unsubscribe`` and ``List-Id`` use a small header class
that folds only between their ``<…>`` items and never encodes them (the stdlib folder would
turn a long unsubscribe URL into an encoded-word, which no mail client follows).
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import email.policy
import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.header import Header
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from typing import Any

from .errors import RenderError

MAX_LINE = 998
MAX_SUBJECT = 200
MAX_DISPLAY_NAME = 100
MAX_HEADER_VALUE = 500

_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LOCAL_PART = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*$"
)
_URI_ITEM = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]+>$")  # <…> of visible ASCII, no < or >


@functools.cache
def _controls() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(whitespace-like controls, other invisible controls) as regexes: categories Cc, Cf,
    Zl, Zp, Cs over all of Unicode, except ZWJ/ZWNJ (emoji sequences and Persian need
    them). Built once per process (about 0.1 s)."""
    spaces: list[int] = []
    others: list[int] = []
    for code in range(0x110000):
        ch = chr(code)
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") and ch not in "\u200c\u200d":
            (spaces if ch.isspace() else others).append(code)
    return re.compile(_char_class(spaces)), re.compile(_char_class(others))


def _char_class(codes: list[int]) -> str:
    ranges: list[str] = []
    start = prev = codes[0]
    for code in [*codes[1:], -1]:
        if code != prev + 1:
            ranges.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev != start else ""))
            start = code
        prev = code
    return "[" + "".join(ranges) + "]"


def strip_controls(value: str) -> str:
    """``value`` without control, format, separator or surrogate characters (line breaks
    and tabs become spaces); whitespace is *not* collapsed."""
    if value.isprintable():
        # Every character both patterns match is one str.isprintable() refuses (all of
        # Cc, Cf, Zl, Zp and Cs are), so a printable value is already clean: one C-speed
        # scan instead of two regex passes, for the usual case.
        return value
    spaces, others = _controls()
    return others.sub("", spaces.sub(" ", value))


def header_text(value: str, max_len: int = MAX_HEADER_VALUE) -> str:
    """``value`` made safe for a header: control/format characters removed, whitespace
    collapsed, cut to ``max_len`` characters (with an ellipsis)."""
    text = " ".join(strip_controls(value[: max_len * 4 + 64]).split())
    if len(text) > max_len:
        text = text[: max_len - 1].rstrip() + "…"
    return text


class _VerbatimHeader:
    """A header whose value is already RFC 5322-formatted: folded at spaces only, never
    re-encoded. Mixed into ``email.headerregistry.BaseHeader`` by ``HeaderRegistry``.

    Used for the address headers (see :func:`_mailbox`) and for List-Unsubscribe and
    List-Id, whose ``<…>`` items must reach the client byte for byte. Folding at a space
    inside a quoted string is allowed (RFC 5322 FWS) and unfolds to the same text.
    """

    max_count = 1
    name: str  # provided by BaseHeader

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        if header_text(value, len(value) + 1) != value:
            raise ValueError("header value has control characters or stray whitespace")
        kwds["parse_tree"] = None
        kwds["decoded"] = value

    def fold(self, *, policy: email.policy.Policy) -> str:
        return _fold_verbatim(self.name, str(self), policy)


def _fold_verbatim(name: str, value: str, policy: email.policy.Policy) -> str:
    """:class:`_VerbatimHeader`'s folding: at spaces only, ``policy.max_line_length``."""
    if not value.isascii() and not getattr(policy, "utf8", False):
        raise ValueError(f"{name}: non-ASCII value needs an SMTPUTF8 message")
    width = policy.max_line_length or 78
    lines = [f"{name}:"]
    for word in value.split(" "):
        if not word:
            continue
        if len(lines[-1]) + 1 + len(word) > width and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    if any(len(line) > MAX_LINE for line in lines):
        raise ValueError(f"{name}: an item is longer than {MAX_LINE} octets")
    return policy.linesep.join(lines) + policy.linesep


_VERBATIM = frozenset(("from", "to", "reply-to", "list-unsubscribe", "list-id"))


def _policy(utf8: bool) -> email.policy.EmailPolicy[EmailMessage]:
    registry = HeaderRegistry()
    for name in _VERBATIM:
        registry.map_to_type(name, _VerbatimHeader)  # type: ignore[arg-type]  # a mixin
    return email.policy.SMTP.clone(header_factory=registry, utf8=utf8)


POLICY = _policy(utf8=False)
POLICY_SMTPUTF8 = _policy(utf8=True)


@dataclass(frozen=True, slots=True)
class MessageHeaders:
    """Everything the headers say. Values are raw; :func:`build_message` sanitises them."""

    from_address: str
    from_name: str
    to_address: str
    to_name: str
    subject: str
    date: dt.datetime
    message_id: str
    list_id: str  # "digest.example.org" or "Description <digest.example.org>"
    list_name: str  # description used when list_id has none
    unsubscribe_url: str
    unsubscribe_mailto: str
    reply_to: str = ""
    precedence: str = "bulk"
    feedback_id: str = ""


@functools.lru_cache(maxsize=1024)  # pure; the From mailbox recurs in every message
def _mailbox(addr: str, display_name: str, what: str) -> tuple[str, bool]:
    """``Name <local@domain>`` ready for a header: the domain IDNA-encoded, the name an atom,
    a quoted string or RFC 2047 encoded-words. The bool says SMTPUTF8 is needed (non-ASCII
    local part).

    Formatted here rather than by ``headerregistry.Address`` because the stdlib folder drops
    the quotes of a long quoted display name when it folds it, turning
    ``"x <!-- y" <a@b>`` into a different address list.
    """
    addr = addr.strip()
    if not addr or header_text(addr) != addr or addr.count("@") != 1:
        raise RenderError(f"{what} address {addr!r} is not a plain e-mail address")
    local, _, domain = addr.rpartition("@")
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise RenderError(f"{what} address {addr!r}: domain is not valid IDNA") from None
    if not _LOCAL_PART.match(local) or not _DOT_ATOM.match(ascii_domain) or len(addr) > 254:
        raise RenderError(f"{what} address {addr!r} is not a plain e-mail address")
    phrase = _phrase(display_name)
    spec = f"{local}@{ascii_domain}"
    return (f"{phrase} <{spec}>" if phrase else spec), not local.isascii()


def _phrase(text: str) -> str:
    """A display phrase (RFC 5322 ``phrase``) in ASCII: atoms, a quoted string, or
    RFC 2047 encoded-words."""
    text = header_text(text, MAX_DISPLAY_NAME)
    if not text:
        return ""
    if _ATEXT.match(text):
        return text
    if text.isascii():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    encoded = Header(text, "utf-8", maxlinelen=76).encode(splitchars=" ", linesep=" ")
    return " ".join(encoded.split())


@functools.lru_cache(maxsize=64)  # pure, and the same for every message of a run
def list_id_value(list_id: str, list_name: str) -> str:
    """``List-Id`` as RFC 2919 wants it: ``Description <list.id.example>``."""
    raw = header_text(list_id, 300)
    description = list_name
    match = re.fullmatch(r"(.*?)\s*<([^<>]*)>", raw)
    if match:
        description, raw = match.group(1) or list_name, match.group(2).strip()
    if not raw or len(raw) > 255 or not _DOT_ATOM.match(raw) or "." not in raw:
        raise RenderError(f"list_id {list_id!r}: expected a dotted id such as digest.example.org")
    phrase = _phrase(description)
    return f"{phrase} <{raw}>" if phrase else f"<{raw}>"


def unsubscribe_value(url: str, mailto: str) -> str:
    items = [f"<{url}>", f"<{mailto}>"]
    for item in items:
        if not _URI_ITEM.match(item) or len(item) > MAX_LINE - 30:
            raise RenderError(f"unsubscribe link {item!r} is not a plain ASCII URI")
    return ", ".join(items)


def choose_cte(body: str) -> str:
    """``quoted-printable`` for mostly-ASCII text, ``base64`` when that is smaller."""
    return _encode_body(body)[0]


def encoded_size(body: str) -> int:
    """The encoded octets (CRLF line ends) of ``body`` exactly as :func:`build_message`
    sends it; cheap (C encoders, ~0.1 ms per 100 KB) enough for the size-budget search."""
    return len(_encode_body(body)[1])


_CRLF = b"\r\n"


@functools.lru_cache(maxsize=8)  # the budget check and the message encode the same HTML
def _encode_body(body: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body with CRLF line ends): quoted-printable
    (lines of at most 76 characters, RFC 2045) unless base64 is smaller.

    The C encoders in :mod:`binascii` do the work: the pure-Python ones the ``email``
    package uses cost ~1 ms per message, which adds up over 100,000 digests. Encoded the way
    ``email.contentmanager`` does: QP over LF-joined lines, base64 over CRLF-joined lines,
    76 characters a line. A lone "." line is QP-encoded as "=2E" (harmless, and never an
    end-of-data marker).
    """
    lines = _body(body).encode("utf-8").splitlines() or [b""]
    qp = b"".join([_qp_line(line) for line in lines])
    canonical = len(_CRLF.join(lines)) + 2
    chars = 4 * ((canonical + 2) // 3)
    if chars + 2 * ((chars + 75) // 76) < len(qp):
        data = _CRLF.join(lines) + _CRLF
        encoded = b"".join(binascii.b2a_base64(data[i : i + 57]) for i in range(0, len(data), 57))
        return "base64", encoded.replace(b"\n", _CRLF)
    return "quoted-printable", qp


SEGMENTS_MAX = 8192  # cached encoded runs of lines (a paper's block, a template's part)
# text -> (QP bytes, UTF-8 octets, LFs, the QP bytes dot-stuffed or None if the same)
Segment = tuple[bytes, int, int, bytes | None]
_SEGMENTS: dict[str, Segment] = {}


class WireReady(bytes):
    """Message bytes whose SMTP DATA payload is already worked out: ``payload`` is the
    dot-stuffed form ending in CRLF.CRLF when it differs from the message plus ".\r\n",
    ``size`` the RFC 1870 size. Made by :func:`build_message` from pieces that are CRLF-only
    and stuffed on their own (each starts a line), so the transport needs no scan of its
    own; see :func:`digestd.deliver.wire_checked` for bytes from anywhere else."""

    payload: bytes | None = None
    size: int = 0

    def __reduce__(self) -> tuple[object, ...]:
        # Across processes (render workers → sender) only the payload travels when it
        # differs: the message is the payload unstuffed, half the bytes to move.
        if self.payload is not None and self.size == len(self) and self.endswith(b"\r\n"):
            return (_wire_from_payload, (self.payload, self.size))
        return (_wire_ready, (bytes(self), self.payload, self.size))


def _wire_ready(message: bytes, payload: bytes | None, size: int) -> WireReady:
    ready = WireReady(message)
    ready.payload, ready.size = payload, size
    return ready


def _wire_from_payload(payload: bytes, size: int) -> WireReady:
    """The message whose DATA payload is ``payload``: the final ".\r\n" dropped and the
    dot-stuffing undone (every line start's ".." was a "." before)."""
    body = payload[:-3]
    if body.startswith(b".."):
        body = body[1:]
    ready = WireReady(body.replace(b"\r\n..", b"\r\n."))
    if len(ready) != size or not payload.endswith(b".\r\n"):
        raise ValueError("DATA payload does not match its message size")
    ready.payload, ready.size = payload, size
    return ready


class DataPayload(bytes):
    """A message as its SMTP DATA payload only: CRLF line ends, dot-stuffed, ending in
    CRLF.CRLF, with ``size``, the message's RFC 1870 size. The render workers hand these
    to the SMTP sender instead of the message (:func:`as_data_payload`): the payload is all
    it writes, and turning a payload back into the message costs a scan of ~25 µs per
    30 KB in the process that drives the connections. :func:`message_bytes` gives the
    message back, :func:`message_size` its size, for a message in either form."""

    size: int = 0

    def __reduce__(self) -> tuple[object, ...]:
        return (_payload_of, (bytes(self), self.size))


def _payload_of(payload: bytes, size: int) -> DataPayload:
    out = DataPayload(payload)
    out.size = size
    return out


def as_data_payload(message: bytes) -> bytes:
    """``message`` as a :class:`DataPayload` when it is :class:`WireReady` (its payload
    worked out), else ``message`` unchanged (the transport works the payload out)."""
    if type(message) is not WireReady:
        return message
    if message.payload is None:
        return _payload_of(message + b".\r\n", len(message))
    return _payload_of(message.payload, message.size)


def message_bytes(message: bytes) -> bytes:
    """The message itself, whether ``message`` is one or a :class:`DataPayload`."""
    if type(message) is DataPayload:
        return _wire_from_payload(bytes(message), message.size)
    return message


def message_size(message: bytes) -> int:
    """The message's size in octets, whether ``message`` is one or a :class:`DataPayload`."""
    return message.size if type(message) is DataPayload else len(message)


class EncodedText(str):
    """Text that carries its own cached encoding (:func:`segment`): a paper's block is
    kept by the renderer with its encoding, outside the shared cache."""

    segment: Segment | None = None


class EncodedBody(bytes):
    """An encoded body (CRLF line ends) and, in ``stuffed``, its dot-stuffed form when
    that differs (a line starting with "."), as :func:`encode_parts` puts it together."""

    stuffed: bytes | None = None


def dot_stuffed(data: bytes) -> bytes | None:
    """``data`` (starting a line, CRLF line ends) dot-stuffed, or None when unchanged: every
    line that starts with "." gets a second one (RFC 5321 §4.5.2). One scan: since every
    LF is part of a CRLF, such a line follows b"\r\n", and split/join on it is a single
    pass (a replace counts first, then scans again)."""
    if b"\r\n." not in data and not data.startswith(b"."):
        return None
    out = b"\r\n..".join(data.split(b"\r\n."))
    return b"." + out if out.startswith(b".") else out


def encode_parts(parts: Sequence[str]) -> tuple[str, bytes] | None:
    """``_encode_body("".join(parts))`` — (Content-Transfer-Encoding, encoded body) — put
    together from cached encodings of the parts, or None when that cannot be done here.

    Quoted-printable works line by line, so a run of parts that ends at a line end encodes
    the same alone as inside the body: the runs are encoded once (a part that recurs, such
    as a paper's block or a template's fixed text, is the same run every time) and joined.
    Every run starts a line, so each is dot-stuffed on its own too: the body comes back as
    an :class:`EncodedBody` that carries its stuffed form. None, and the caller encodes the
    whole body, for a body with a CR (line ends are normalised first), text that is not
    UTF-8-encodable, an empty body, or one for which base64 is smaller.
    """
    segments: list[Segment] = []
    pending: list[str] = []
    last = ""
    for part in parts:
        if not part:
            continue
        pending.append(part)
        last = part
        if part[-1] == "\n":
            # A part on its own recurs; a run of several holds a personal value: not kept.
            found = segment(part) if len(pending) == 1 else segment("".join(pending), False)
            if found is None:
                return None
            segments.append(found)
            pending = []
    if pending:
        found = segment("".join(pending), False)
        if found is None:
            return None
        segments.append(found)
    return assemble(segments, last.endswith("\n"))


def assemble(segments: Sequence[Segment], ends_with_newline: bool) -> tuple[str, bytes] | None:
    """The body whose line runs are ``segments``, as :func:`encode_parts` returns it: an
    :class:`EncodedBody` carrying its stuffed form; None when empty or base64 is smaller."""
    if not segments:
        return None
    qp = EncodedBody(b"".join([seg[0] for seg in segments]))
    canonical = sum([seg[1] + seg[2] for seg in segments]) + (0 if ends_with_newline else 2)
    chars = 4 * ((canonical + 2) // 3)
    if chars + 2 * ((chars + 75) // 76) < len(qp):
        return None
    if any([seg[3] is not None for seg in segments]):
        qp.stuffed = b"".join([seg[0] if seg[3] is None else seg[3] for seg in segments])
    return "quoted-printable", qp


def segment(text: str, keep: bool = True) -> Segment | None:
    """The encoding of ``text``, a run of whole lines (or a body's last, unterminated
    one): (QP bytes, UTF-8 octets, LFs, the QP dot-stuffed or None if the same); cached
    by text if ``keep``. None if it cannot be encoded here (a CR, not UTF-8-encodable)."""
    if type(text) is EncodedText:
        if text.segment is None:
            text.segment = segment(str(text), False)
        return text.segment
    hit = _SEGMENTS.get(text) if keep else None
    if hit is None:
        if "\r" in text:
            return None
        try:
            data = text.encode("utf-8")
        except UnicodeError:
            return None
        if not keep:
            # One call for the run: b2a_qp encodes line by line (its line length starts
            # over at every LF), so this is the lines' encodings joined.
            whole = data if data.endswith(b"\n") else data + b"\n"
            qp = binascii.b2a_qp(whole, istext=True).replace(b"\n", _CRLF)
            return qp, len(data), data.count(b"\n"), dot_stuffed(qp)
        lines = data.split(b"\n")
        if text.endswith("\n"):
            lines.pop()
        qp = b"".join([_qp_line(line) for line in lines])
        hit = (qp, len(data), data.count(b"\n"), dot_stuffed(qp))
        if len(_SEGMENTS) >= SEGMENTS_MAX:
            _SEGMENTS.clear()
        _SEGMENTS[text] = hit
    return hit


@functools.lru_cache(maxsize=16384)
def _qp_line(line: bytes) -> bytes:
    """One line, quoted-printable, with its (CRLF) line end. QP is line by line, so the
    body's encoding is its lines' encodings joined; most lines of a digest (the template,
    each paper's block) recur in every message, so they are encoded once."""
    return binascii.b2a_qp(line + b"\n", istext=True).replace(b"\n", _CRLF)


@functools.lru_cache(maxsize=1024)
def _shared_header(name: str, value: str | dt.datetime, utf8: bool) -> bytes:
    """A header that is the same in many messages (From, Subject, Date, List-Id…), folded
    once per run."""
    return _header(name, value, utf8)


def _header(name: str, value: str | dt.datetime, utf8: bool) -> bytes:
    """One header exactly as the stdlib generator writes it under :data:`POLICY`:
    parsed by the policy's header registry (the classes above), then folded.

    The per-message headers are cheaper: a verbatim header (To, List-Unsubscribe) is
    checked and folded here the way ``header_store_parse`` + ``fold_binary`` would do it
    (~40 µs less each), and a Message-ID of the usual shape is folded once per shape."""
    policy = POLICY_SMTPUTF8 if utf8 else POLICY
    if isinstance(value, str):
        if name.lower() in _VERBATIM:
            if len(value.splitlines()) > 1:  # what header_store_parse checks first
                raise ValueError(
                    "Header values may not contain linefeed or carriage return characters"
                )
            if header_text(value, len(value) + 1) != value:  # _VerbatimHeader.parse
                raise ValueError("header value has control characters or stray whitespace")
            folded = _fold_verbatim(name, value, policy)
            return folded.encode("utf8" if utf8 else "ascii", "surrogateescape")
        if name == "Message-ID":
            shaped = _MESSAGE_ID.fullmatch(value)
            if shaped is not None:
                hexdigits = shaped.group(1)
                pattern = value.replace(hexdigits, _ID_SHAPE, 1)
                folded_shape = _message_id_shape(pattern, utf8)
                if folded_shape.count(_ID_SHAPE_BYTES) == 1:
                    return folded_shape.replace(_ID_SHAPE_BYTES, hexdigits.encode("ascii"))
    return policy.fold_binary(*policy.header_store_parse(name, value))


@functools.lru_cache(maxsize=64)
def _message_id_shape(value: str, utf8: bool) -> bytes:
    policy = POLICY_SMTPUTF8 if utf8 else POLICY
    return policy.fold_binary(*policy.header_store_parse("Message-ID", value))


# render.message_id_for's shape: only the 32 hex digits differ between subscribers, and
# hex digits and "0" are the same kind of atext, so they parse and fold the same way.
_MESSAGE_ID = re.compile(r"<digest\.\d{4}-\d\d-\d\d\.([0-9a-f]{32})@[a-z0-9-]+(?:\.[a-z0-9-]+)*>")
_ID_SHAPE = "0" * 32
_ID_SHAPE_BYTES = _ID_SHAPE.encode("ascii")


_BOUNDARY_SHAPE = "=_digestd_" + "0" * 32


def _content_type(boundary: str, utf8: bool) -> bytes:
    """The multipart Content-Type header. Every boundary has the same shape (a fixed
    prefix and 32 hex digits), so it folds the same way: folded once, then the boundary
    is put in (``header_store_parse`` is the costliest header of all)."""
    if len(boundary) != len(_BOUNDARY_SHAPE) or not boundary.isascii():
        return _header("Content-Type", f'multipart/alternative; boundary="{boundary}"', utf8)
    folded = _shared_header(
        "Content-Type", f'multipart/alternative; boundary="{_BOUNDARY_SHAPE}"', utf8
    )
    return folded.replace(_BOUNDARY_SHAPE.encode("ascii"), boundary.encode("ascii"))


@dataclass(frozen=True, slots=True)
class _FixedHeaders:
    """The headers that are the same in every message of a run, folded, in the groups that
    stand between the personal ones (To, Message-ID, List-Unsubscribe, Content-Type)."""

    sender: bytes  # From
    subject_date: bytes  # Subject, Date
    lists: bytes  # Reply-To, List-Id
    rest: bytes  # List-Unsubscribe-Post … MIME-Version
    utf8: bool
    longest: int  # the longest line among them


@functools.lru_cache(maxsize=64)
def _fixed_headers(
    from_address: str,
    from_name: str,
    subject: str,
    date: dt.datetime,
    reply_to: str,
    list_id: str,
    list_name: str,
    precedence: str,
    feedback_id: str,
    utf8_to: bool,
) -> _FixedHeaders:
    sender, utf8_from = _mailbox(from_address, from_name, "from")
    utf8 = utf8_from or utf8_to
    lists = []
    if reply_to:
        reply_address, utf8_reply = _mailbox(reply_to, "", "reply-to")
        if utf8_reply and not utf8:
            raise RenderError("reply-to address needs SMTPUTF8; use an ASCII address")
        lists.append(_header("Reply-To", reply_address, utf8))
    lists.append(_header("List-Id", list_id_value(list_id, list_name), utf8))
    rest = [_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click", utf8)]
    if header_text(precedence, 20):
        rest.append(_header("Precedence", header_text(precedence, 20), utf8))
    rest.append(_header("Auto-Submitted", "auto-generated", utf8))
    if header_text(feedback_id, 200):
        rest.append(_header("Feedback-ID", header_text(feedback_id, 200), utf8))
    rest.append(_header("MIME-Version", "1.0", utf8))
    fixed = _FixedHeaders(
        sender=_header("From", sender, utf8),
        subject_date=_header("Subject", header_text(subject, MAX_SUBJECT), utf8)
        + _header("Date", date, utf8),
        lists=b"".join(lists),
        rest=b"".join(rest),
        utf8=utf8,
        longest=0,
    )
    joined = fixed.sender + fixed.subject_date + fixed.lists + fixed.rest
    return dataclasses.replace(fixed, longest=max(len(x) for x in joined.split(_CRLF)))


def build_message(
    headers: MessageHeaders,
    *,
    text: str,
    html: str,
    encoded: tuple[tuple[str, bytes] | None, tuple[str, bytes] | None] = (None, None),
    payload: bool = False,
) -> bytes:
    """The complete message as bytes (CRLF line ends), or RenderError.

    ``encoded`` may give (text, html) bodies already encoded by :func:`encode_parts`.
    ``payload``: return the message as its SMTP DATA payload only (a :class:`DataPayload`
    with the message's size), without putting the message itself together: all the SMTP
    sender needs.

    Headers go through the ``email`` package's header registry and folder (the same bytes
    ``EmailMessage.as_bytes`` writes); the MIME structure is assembled here, as the
    generator would lay it out for ``set_content`` + ``add_alternative``.
    """
    if headers.date.tzinfo is None or headers.date.utcoffset() is None:
        raise RenderError("message date must be timezone-aware")
    h = headers
    recipient, utf8_to = _mailbox(h.to_address, h.to_name, "to")
    try:
        # The headers that are the same in every message of a run come folded, in groups.
        fixed = _fixed_headers(
            h.from_address,
            h.from_name,
            h.subject,
            h.date,
            h.reply_to,
            h.list_id,
            h.list_name,
            h.precedence,
            h.feedback_id,
            utf8_to,
        )
        utf8 = fixed.utf8
        unsubscribe = unsubscribe_value(h.unsubscribe_url, h.unsubscribe_mailto)
        # A boundary that cannot occur in QP or base64 output ("=_"), fixed per message.
        digest = hashlib.sha256(h.message_id.encode("utf-8", "replace")).hexdigest()
        boundary = f"=_digestd_{digest[:32]}"
        personal = [
            _header("To", recipient, utf8),
            _header("Message-ID", header_text(h.message_id, 250), utf8),
            _header("List-Unsubscribe", unsubscribe, utf8),
            _content_type(boundary, utf8),
        ]
        head = [
            fixed.sender,
            personal[0],
            fixed.subject_date,
            personal[1],
            fixed.lists,
            personal[2],
            fixed.rest,
            personal[3],
        ]
        longest = max(fixed.longest, *(len(line) for line in b"".join(personal).split(_CRLF)))
        if longest > MAX_LINE:  # bodies are encoded in lines of 76
            raise RenderError(f"message has a line of {longest} octets (limit {MAX_LINE})")
        out = [*head, _CRLF]
        # The DATA payload alongside: headers never start a line with "." (a name or a
        # folding space does), nor do the MIME lines; each body starts a line, so its
        # stuffed form is all the stuffing the message needs.
        stuffed_bodies: list[bytes | None] = []
        delimiter = b"--" + boundary.encode("ascii")
        for subtype, body, given in ((b"plain", text, encoded[0]), (b"html", html, encoded[1])):
            cte, data = given if given is not None else _encode_body(body)
            stuffed_bodies.append(
                data.stuffed if type(data) is EncodedBody else dot_stuffed(data) if data else None
            )
            out += [
                delimiter,
                b"\r\nContent-Type: text/" + subtype + b'; charset="utf-8"\r\n',
                b"Content-Transfer-Encoding: " + cte.encode("ascii") + b"\r\n\r\n",
                data,
                _CRLF,
            ]
        out += [delimiter, b"--\r\n"]
    except RenderError:
        raise
    except (ValueError, TypeError, UnicodeError, IndexError) as exc:
        raise RenderError(f"cannot build the message: {exc}") from exc
    head_bytes = b"".join(head)
    if not _crlf_lines(head_bytes):  # the bodies are CRLF-only as encoded
        return b"".join(out)  # not what it should be: the transport checks it whole
    first_body = len(head) + 1
    if payload:
        size = sum(map(len, out))
        _stuff(out, first_body, stuffed_bodies)
        return _payload_of(b"".join(out), size)
    message = WireReady(b"".join(out))
    message.size = len(message)
    if any(s is not None for s in stuffed_bodies):
        pieces = out.copy()
        _stuff(pieces, first_body, stuffed_bodies)
        message.payload = b"".join(pieces)
    return message


def _stuff(out: list[bytes], first_body: int, stuffed_bodies: list[bytes | None]) -> None:
    """Turn :func:`build_message`'s pieces into the DATA payload's: each body that needs
    it stuffed, and the final dot. ``out`` is head…, CRLF, then per body: delimiter, type,
    encoding, data, CRLF; and the closing delimiter."""
    for index, stuffed in enumerate(stuffed_bodies):
        if stuffed is not None:
            out[first_body + 5 * index + 3] = stuffed
    out.append(b".\r\n")


def _crlf_lines(data: bytes) -> bool:
    """Whether every CR and LF in ``data`` is part of a CRLF (cheap for short bytes)."""
    pairs = data.count(_CRLF)
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


def _body(text: str) -> str:
    """Normalise line ends; the email package re-encodes with CRLF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")

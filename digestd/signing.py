"""DKIM signing (RFC 6376 with rsa-sha256, RFC 8463 with ed25519-sha256) via dkimpy.

:func:`dkim_sign` is synchronous and CPU-bound (an RSA-2048 signature is about a
millisecond): the pipeline runs it in a worker thread, off the event loop.

The signed header list is explicit. dkimpy's default leaves out ``List-Unsubscribe`` and
``List-Unsubscribe-Post``, which Gmail and Yahoo require to be covered for one-click
unsubscribe. ``From``, ``Subject``, ``Reply-To`` and the two unsubscribe headers are also
*over-signed* (listed once more than they occur), so nobody can add a second copy in
transit without breaking the signature.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import re

import dkim

from .errors import RenderError

ALGORITHMS = {
    "rsa-sha256": b"rsa-sha256",
    "ed25519-sha256": b"ed25519-sha256",
    "ed25519": b"ed25519-sha256",
}

SIGNED_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
    "auto-submitted",
    "precedence",
)
OVERSIGNED_HEADERS = ("from", "subject", "reply-to", "list-unsubscribe", "list-unsubscribe-post")

# DER prefix of a PKCS#8 Ed25519 private key (RFC 8410), as `openssl genpkey` writes it.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_SELECTOR = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")


def signed_header_list(message: bytes) -> list[str]:
    """The ``h=`` list for ``message``: the headers of :data:`SIGNED_HEADERS` it carries,
    then the over-signed ones."""
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    present = {name.lower() for name in parsed}
    if "from" not in present:
        raise RenderError("cannot DKIM-sign a message without a From header")
    return [h for h in SIGNED_HEADERS if h in present] + list(OVERSIGNED_HEADERS)


def _ed25519_key(private_key: bytes) -> bytes:
    """dkimpy wants base64 of the 32-byte seed; also accept PKCS#8 PEM (openssl's)."""
    data = private_key.strip()
    if data.startswith(b"-----BEGIN"):
        body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise RenderError("DKIM ed25519 key: PEM body is not base64") from None
        if len(der) != 48 or not der.startswith(_ED25519_PKCS8_PREFIX):
            raise RenderError("DKIM ed25519 key: PEM is not a PKCS#8 Ed25519 private key")
        return base64.b64encode(der[-32:])
    return data


def dkim_sign(
    message: bytes,
    *,
    domain: str,
    selector: str,
    private_key: bytes,
    algorithm: str = "rsa-sha256",
) -> bytes:
    """``message`` with a ``DKIM-Signature`` header prepended (relaxed/relaxed).

    ``private_key``: PEM (PKCS#1 or PKCS#8) for rsa-sha256; for ed25519-sha256 a PKCS#8
    PEM (``openssl genpkey -algorithm ed25519``) or the base64 32-byte seed.
    Raises RenderError when the key or parameters are unusable.
    """
    sig_alg = ALGORITHMS.get(algorithm.lower())
    if sig_alg is None:
        raise RenderError(f"DKIM algorithm {algorithm!r}: expected rsa-sha256 or ed25519-sha256")
    if not _DOMAIN.match(domain) or not _SELECTOR.match(selector):
        raise RenderError(f"DKIM domain {domain!r} / selector {selector!r} is not valid")
    # Key files may have CRLF line ends or lose their final newline (secrets are stripped).
    pem = private_key.replace(b"\r\n", b"\n").strip() + b"\n"
    key = _ed25519_key(pem) if sig_alg == b"ed25519-sha256" else pem
    try:
        signature = dkim.sign(
            message,
            selector.encode("ascii"),
            domain.encode("ascii"),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=sig_alg,
            include_headers=[h.encode("ascii") for h in signed_header_list(message)],
            linesep=b"\r\n",
        )
    except dkim.DKIMException as exc:
        raise RenderError(f"DKIM signing failed: {exc}") from exc
    except (ValueError, TypeError, IndexError) as exc:  # malformed keys surface as these too
        raise RenderError(f"DKIM signing failed: unusable private key ({exc})") from exc
    return bytes(signature) + message

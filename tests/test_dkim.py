"""DKIM signing with dkimpy: rsa-sha256 and ed25519-sha256 keys made by openssl, verified
by dkimpy against a stubbed DNS record, also after a real SMTP hop."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import dkim
import pytest
from conftest import require_tool
from smtpserver import SmtpServer
from test_render_samples import context, digest, parse, renderer

from digestd.errors import RenderError
from digestd.signing import dkim_sign

DOMAIN = "example.org"
SELECTOR = "digest2026"


class Key:
    """A private key file made by openssl and the DNS TXT record that publishes it."""

    def __init__(self, directory: Path, algorithm: str) -> None:
        openssl = require_tool("openssl")
        self.path = directory / f"{algorithm}.pem"
        if algorithm == "rsa-sha256":
            args = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
        else:
            args = ["-algorithm", "ed25519"]
        subprocess.run(
            [openssl, "genpkey", *args, "-out", str(self.path)], check=True, capture_output=True
        )
        der = subprocess.run(
            [openssl, "pkey", "-in", str(self.path), "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        if algorithm == "rsa-sha256":
            record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        else:  # RFC 8463: the raw 32-byte public key
            record = f"v=DKIM1; k=ed25519; p={base64.b64encode(der[-32:]).decode()}"
        self.algorithm = algorithm
        self.record = record.encode()
        self.pem = self.path.read_bytes()

    def dns(self, name: bytes, timeout: int = 5) -> bytes:
        """dkimpy's DNS look-up, answered from memory for our selector only."""
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return self.record


@pytest.fixture(scope="module", params=["rsa-sha256", "ed25519-sha256"])
def key(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Key:
    return Key(tmp_path_factory.mktemp("dkim"), request.param)


def signed_digest(key: Key) -> bytes:
    message = renderer().render(digest(10), context()).message
    return dkim_sign(
        message, domain=DOMAIN, selector=SELECTOR, private_key=key.pem, algorithm=key.algorithm
    )


def tags(data: bytes) -> dict[str, str]:
    """The DKIM-Signature tags of a signed message, unfolded."""
    header = parse(data)["DKIM-Signature"]
    pairs = (p.split("=", 1) for p in re.sub(r"\s+", "", str(header)).split(";") if "=" in p)
    return {name: value for name, value in pairs}


def test_signature_verifies(key: Key) -> None:
    """A signed digest verifies against the published key."""
    data = signed_digest(key)
    assert data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(data, dnsfunc=key.dns)
    assert tags(data)["a"] == key.algorithm and tags(data)["d"] == DOMAIN


def test_signed_headers_include_list_unsubscribe(key: Key) -> None:
    """h= names From, Subject, List-Unsubscribe and List-Unsubscribe-Post (and more)."""
    signed = tags(signed_digest(key))["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id", "list-id"):
        assert name in signed
    assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed
    assert signed.count("from") == 2  # over-signed: a second From cannot be added


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"EnvHarness", b"EnvHarnesz"),  # a byte of the body
        (b"Subject: Your papers", b"Subject: Your Papers"),  # a signed header
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x"),
    ],
)
def test_a_changed_byte_fails_verification(key: Key, old: bytes, new: bytes) -> None:
    """Changing one byte of the body or of a signed header breaks the signature."""
    data = signed_digest(key)
    assert old in data
    assert not dkim.verify(data.replace(old, new, 1), dnsfunc=key.dns)


def test_an_added_unsubscribe_header_fails_verification(key: Key) -> None:
    """Over-signing: a second List-Unsubscribe added in transit breaks the signature."""
    data = signed_digest(key)
    head, body = data.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n\r\n" + body
    assert not dkim.verify(forged, dnsfunc=key.dns)


async def test_received_bytes_verify_after_a_real_smtp_hop(key: Key) -> None:
    """Sent through aiosmtplib to a real aiosmtpd server, the received bytes still verify."""
    data = signed_digest(key)
    with SmtpServer() as server:
        await aiosmtplib.send(
            data,
            sender="papers@example.org",
            recipients=["ada@example.org"],
            hostname="127.0.0.1",
            port=server.port,
            start_tls=False,
            use_tls=False,
        )
        received = server.received[0].data
    assert dkim.verify(received, dnsfunc=key.dns)


@pytest.mark.parametrize("mangle", [bytes.strip, lambda pem: pem.replace(b"\n", b"\r\n")])
def test_key_file_line_ends_do_not_matter(key: Key, mangle: Callable[[bytes], bytes]) -> None:
    """A key whose final newline was stripped, or with CRLF line ends, still signs."""
    message = renderer().render(digest(2), context()).message
    data = dkim_sign(
        message,
        domain=DOMAIN,
        selector=SELECTOR,
        private_key=mangle(key.pem),
        algorithm=key.algorithm,
    )
    assert dkim.verify(data, dnsfunc=key.dns)


def test_ed25519_key_as_base64_seed(tmp_path: Path) -> None:
    """dkimpy's own ed25519 key format (base64 of the 32-byte seed) works too."""
    key = Key(tmp_path, "ed25519-sha256")
    der = base64.b64decode(b"".join(key.pem.strip().splitlines()[1:-1]))
    seed = base64.b64encode(der[-32:])
    message = renderer().render(digest(2), context()).message
    data = dkim_sign(
        message, domain=DOMAIN, selector=SELECTOR, private_key=seed, algorithm="ed25519"
    )
    assert dkim.verify(data, dnsfunc=key.dns)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"private_key": b"not a key"}, "DKIM"),
        (
            {"private_key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
            "DKIM",
        ),
        ({"algorithm": "rsa-sha1"}, "algorithm"),
        ({"domain": "bad domain"}, "domain"),
        ({"selector": "a;b=c"}, "selector"),
    ],
)
def test_bad_parameters_raise_render_error(changes: dict[str, object], match: str) -> None:
    """Unusable keys and parameters fail with a clear RenderError, never a traceback."""
    kwargs: dict[str, object] = {
        "domain": DOMAIN,
        "selector": SELECTOR,
        "private_key": b"not a key",
        "algorithm": "rsa-sha256",
    }
    kwargs.update(changes)
    message = renderer().render(digest(1), context()).message
    with pytest.raises(RenderError, match=match):
        dkim_sign(message, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RenderError, match="DKIM"):
        dkim_sign(
            message,
            domain=DOMAIN,
            selector=SELECTOR,
            private_key=b"x" * 40,
            algorithm="ed25519-sha256",
        )

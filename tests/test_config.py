"""Configuration: TOML + environment overrides; every bad file is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from digestd.config import load_config, resolve_path
from digestd.errors import ConfigError

GOOD = """
[digest]
from_address = "papers@example.org"
base_url = "https://papers.example.org"

[smtp]
port = 2525

[[sources]]
kind = "file"
path = "papers.json"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "digestd.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid() -> None:
    """config.example.toml, which documents every key, loads without error."""
    settings = load_config(Path(__file__).parent.parent / "config.example.toml")
    assert settings.digest.from_address == "papers@example.org"
    assert [s.kind for s in settings.sources] == ["hf_daily", "arxiv"]


def test_good_config_and_defaults(tmp_path: Path) -> None:
    """Values from the file are read and everything else takes its default."""
    s = load_config(write(tmp_path, GOOD))
    assert s.smtp.port == 2525
    assert s.smtp.security == "starttls"
    assert s.smtp.verify_certificates is True
    assert s.digest.domain == "example.org"
    assert s.digest.effective_list_id == "digest.example.org"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DIGESTD_<SECTION>__<KEY> wins over the file, with type conversion."""
    monkeypatch.setenv("DIGESTD_SMTP__PORT", "465")
    monkeypatch.setenv("DIGESTD_SMTP__SECURITY", "tls")
    monkeypatch.setenv("DIGESTD_DIGEST__FROM_NAME", "Env Name")
    s = load_config(write(tmp_path, GOOD))
    assert (s.smtp.port, s.smtp.security, s.digest.from_name) == (465, "tls", "Env Name")


def test_bad_environment_value_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad override names the key and the variable."""
    monkeypatch.setenv("DIGESTD_SMTP__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"smtp\.port: .*DIGESTD_SMTP__PORT"):
        load_config(write(tmp_path, GOOD))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[digest\nfrom_address='a@example.org'", "TOML syntax error"),
        ("[digest]\nfrom_address='a@example.org'\nbogus=1", "digest.bogus: unknown key"),
        ("[digest]\nfrom_address='a@example.org'\n[smtp]\nport='x'", "smtp.port: "),
        ("[digest]\nfrom_address='a@example.org'\n[smtp]\nport=70000", "smtp.port: "),
        ("[smtp]\nport=25", "digest: required value is missing"),
        ("[digest]\nfrom_name='x'", "digest.from_address: required value is missing"),
        ("[digest]\nfrom_address='not an address'", "digest.from_address: "),
        ("[digest]\nfrom_address='a@example.org'\ntimezone='Mars/Base'", "digest.timezone: "),
        ("[digest]\nfrom_address='a@example.org'\nsend_at='25:00'", "digest.send_at: "),
        ("[digest]\nfrom_address='a@example.org'\nbase_url='ftp://x'", "digest.base_url: "),
        (
            '[digest]\nfrom_address="a@example.org"\nfrom_name="a\\r\\nBcc: x@evil"',
            "digest.from_name: ",
        ),
        (
            "[digest]\nfrom_address='a@example.org'\n[[sources]]\nkind='arxiv'",
            "sources[0].categories: required",
        ),
        (
            "[digest]\nfrom_address='a@example.org'\n[[sources]]\nkind='nope'",
            "sources[0].kind: 'nope' is not one of",
        ),
        (
            "[digest]\nfrom_address='a@example.org'\n[[sources]]\nkind='file'\npath='x'\nurl='y'",
            "sources[0].url: unknown key",
        ),
        (
            "[digest]\nfrom_address='a@example.org'\n[[sources]]\nkind='feed'\nurl='https://a'"
            "\n[[sources]]\nkind='feed'\nurl='https://b'",
            "sources: two sources are named 'feed'",
        ),
        (
            "[digest]\nfrom_address='a@example.org'\n[delivery]\ntransport='pigeon'",
            "delivery.transport: ",
        ),
        ("[digest]\nfrom_address='a@example.org'\n[http]\nlisten='nowhere'", "http.listen: "),
        (
            "[digest]\nfrom_address='a@example.org'\n[dkim]\ndomain='example.org'\nselector='s'",
            "dkim.private_key_file is required",
        ),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    """Each kind of mistake gives one line starting with the file name."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_and_binary_and_huge_files(tmp_path: Path) -> None:
    """Missing, non-UTF-8 and oversized files are clean errors too."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * 2_000_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(huge)


def test_resolve_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, then $DIGESTD_CONFIG, then ./digestd.toml, then /etc."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIGESTD_CONFIG", raising=False)
    assert resolve_path(None) == Path("/etc/digestd/digestd.toml")
    (tmp_path / "digestd.toml").write_text("")
    assert resolve_path(None) == Path("digestd.toml")
    monkeypatch.setenv("DIGESTD_CONFIG", "/x/y.toml")
    assert resolve_path(None) == Path("/x/y.toml")
    assert resolve_path("explicit.toml") == Path("explicit.toml")


def test_check_config_exit_codes_as_subprocess(tmp_path: Path) -> None:
    """`digestd check-config` exits 2 with one line and no traceback on a bad file."""
    bad = write(tmp_path, "[digest]\nfrom_address='a@example.org'\n[smtp]\nport='x'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "digestd", "--config", str(bad), "check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "smtp.port" in proc.stderr and str(bad) in proc.stderr


def test_check_config_warns_about_risky_but_valid_settings(tmp_path: Path) -> None:
    """http base_url, no postal address, plaintext SMTP to a remote host: warned, exit 0."""
    path = write(
        tmp_path,
        "[digest]\nfrom_address='a@example.org'\nbase_url='http://papers.example.org'\n"
        "[smtp]\nhost='mail.example.org'\nsecurity='none'\n",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "digestd", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    for fragment in ("not https", "postal_address", "no TLS", "no [[sources]]"):
        assert fragment in proc.stderr

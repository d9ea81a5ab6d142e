"""Configuration: a TOML file, overridden by ``DIGESTD_<SECTION>__<KEY>`` environment variables.

``load_config(path)`` returns a frozen :class:`Settings` or raises :class:`ConfigError` whose
message is one line naming the file, the key and the problem.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError, ValidationError
from .validation import check_hhmm, check_timezone, has_control_chars, normalize_email

DEFAULT_PATHS = (Path("digestd.toml"), Path("/etc/digestd/digestd.toml"))
MAX_CONFIG_BYTES = 1_000_000


def _state_dir() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY; otherwise the FHS location.
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/digestd").split(":")[0])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DigestConfig(_Section):
    from_address: str
    from_name: str = "digestd"
    send_at: str = "07:00"
    timezone: str = "UTC"
    base_url: str = "http://127.0.0.1:8025"
    list_id: str = ""
    reply_to: str = ""
    postal_address: str = ""
    send_empty: bool = False
    subject: str = "Your papers for {date}"
    precedence: Literal["bulk", "list", ""] = "bulk"
    feedback_id: str = ""

    @field_validator("from_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return normalize_email(value)
        except ValidationError as exc:
            raise ValueError(exc.problems[0]) from None

    @field_validator("send_at")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        try:
            return check_hhmm(value)
        except ValidationError as exc:
            raise ValueError(exc.problems[0]) from None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            return check_timezone(value)
        except ValidationError as exc:
            raise ValueError(exc.problems[0]) from None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")) or has_control_chars(value):
            raise ValueError("must be an http(s) URL, e.g. https://digest.example.org")
        return value.rstrip("/")

    @field_validator("from_name", "list_id", "reply_to", "postal_address", "subject", "feedback_id")
    @classmethod
    def _no_controls(cls, value: str) -> str:
        if has_control_chars(value):
            raise ValueError("contains a control character (CR, LF, tab, NUL, …)")
        return value

    @property
    def domain(self) -> str:
        return self.from_address.rpartition("@")[2]

    @property
    def effective_list_id(self) -> str:
        return self.list_id or f"digest.{self.domain}"


class StoreConfig(_Section):
    path: Path = Field(default_factory=lambda: _state_dir() / "digestd.sqlite3")


class DeliveryConfig(_Section):
    transport: Literal["smtp", "maildir"] = "smtp"
    maildir: Path = Path("outbox")
    concurrency: int = Field(default=4, ge=1, le=64)
    rate_per_second: float = Field(default=0.0, ge=0.0)  # 0 = unlimited
    max_attempts: int = Field(default=5, ge=1, le=50)
    messages_per_connection: int = Field(default=100, ge=1)
    # Processes selecting and rendering digests; unset = one per CPU for large lists, 0 = none.
    render_workers: int | None = Field(default=None, ge=0, le=64)
    write_html_copy: bool = False


class SmtpConfig(_Section):
    host: str = "localhost"
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password_file: Path | None = None
    timeout: float = Field(default=30.0, gt=0, le=600)
    verify_certificates: bool = True
    ca_file: Path | None = None
    # Send MAIL, RCPT and DATA together when the server offers PIPELINING (RFC 2920).
    pipelining: bool = True

    def password(self) -> str | None:
        """The SMTP password: $DIGESTD_SMTP_PASSWORD, the systemd credential, or the file."""
        return read_secret("smtp-password", self.password_file, "DIGESTD_SMTP_PASSWORD")


class HttpConfig(_Section):
    listen: str = "127.0.0.1:8025"
    enabled: bool = True
    subscribe_page: bool = False
    secret_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8025")
        return value


class DkimConfig(_Section):
    domain: str = ""
    selector: str = ""
    private_key_file: Path | None = None
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"

    @property
    def enabled(self) -> bool:
        return bool(self.domain and self.selector)


class FetchConfig(_Section):
    timeout: float = Field(default=30.0, gt=0, le=600)
    retries: int = Field(default=3, ge=0, le=10)
    user_agent: str = "digestd/0.1 (+https://github.com/digestd/digestd)"
    max_bytes: int = Field(default=20_000_000, ge=1000)


class HfDailySource(_Section):
    kind: Literal["hf_daily"]
    name: str = "hf_daily"
    base_url: str = "https://huggingface.co"
    days_back: int = Field(default=1, ge=0, le=30)
    page_size: int = Field(default=100, ge=1, le=1000)
    max_pages: int = Field(default=10, ge=1, le=100)


class ArxivSource(_Section):
    kind: Literal["arxiv"]
    name: str = "arxiv"
    categories: list[str] = Field(min_length=1)
    base_url: str = "https://rss.arxiv.org"
    include_cross: bool = False
    min_interval: float = Field(default=3.0, ge=0)


class FeedSource(_Section):
    kind: Literal["feed"]
    name: str = "feed"
    url: str


class FileSource(_Section):
    kind: Literal["file"]
    name: str = "file"
    path: Path


SourceConfig = Annotated[
    HfDailySource | ArxivSource | FeedSource | FileSource, Field(discriminator="kind")
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DIGESTD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    digest: DigestConfig
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    smtp: SmtpConfig = SmtpConfig()
    http: HttpConfig = HttpConfig()
    dkim: DkimConfig = DkimConfig()
    fetch: FetchConfig = FetchConfig()
    sources: list[SourceConfig] = Field(default_factory=list)

    # Where the settings came from (for messages); not a config key.
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _dkim_complete(self) -> Settings:
        if self.dkim.enabled and self.dkim.private_key_file is None:
            raise ValueError("dkim.private_key_file is required when dkim.domain is set")
        return self

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"two sources are named {dupes[0]!r}; give each [[sources]] its own name"
            )
        return sources

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so it overrides the file, which arrives as init kwargs.
        return (env_settings, init_settings)


def read_secret(credential: str, path: Path | None, env_var: str) -> str | None:
    """A secret from the environment, a systemd credential (LoadCredential=), or a file."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return (Path(cred_dir) / credential).read_text().strip()
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    return None


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """--config, else $DIGESTD_CONFIG, else ./digestd.toml, else /etc/digestd/digestd.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get("DIGESTD_CONFIG"):
        return Path(os.environ["DIGESTD_CONFIG"])
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[-1]


def load_config(path: Path) -> Settings:
    """Read, parse and validate the config file; every failure is one ConfigError line."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: file is larger than {MAX_CONFIG_BYTES} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (use --config or $DIGESTD_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return settings_from_dict(data, path)


def settings_from_dict(data: dict[str, Any], path: Path | None = None) -> Settings:
    where = str(path) if path else "configuration"
    if "source_path" in data:
        raise ConfigError(f"{where}: source_path: unknown key")
    try:
        settings = Settings(**data)
    except PydanticValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc, data)}") from None
    return settings.model_copy(update={"source_path": path})


def _describe(exc: PydanticValidationError, data: dict[str, Any]) -> str:
    """The first error as ``key: problem``, with array positions shown TOML-style."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    parts: list[str] = []
    for i, loc in enumerate(err["loc"]):
        if isinstance(loc, int):
            parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
        elif i > 0 and err["loc"][0] == "sources" and loc in ("hf_daily", "arxiv", "feed", "file"):
            continue  # pydantic's discriminator tag, not a key the operator wrote
        else:
            parts.append(str(loc))
    key = ".".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        problem = "unknown key"
    elif kind == "missing":
        problem = "required value is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        key += ".kind"
        tag = (err.get("ctx") or {}).get("tag")
        problem = (
            f"{tag!r} is not one of hf_daily, arxiv, feed, file"
            if tag
            else "required value is missing (hf_daily, arxiv, feed or file)"
        )
    else:
        problem = err["msg"].removeprefix("Value error, ")
    env_name = "DIGESTD_" + "__".join(p.upper() for p in parts[:2] if "[" not in p)
    hint = f" (or ${env_name})" if len(parts) == 2 and env_name in os.environ else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{key}: {problem}{hint}{more}"

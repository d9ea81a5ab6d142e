"""digestd's exceptions, in one small tree::

DigestdError
├── ConfigError            bad configuration (exit 2); names the file, the key, the problem
├── ValidationError        bad subscriber data (exit 2); ``problems`` lists each one
├── NotFoundError          an unknown subscriber or paper (exit 2)
├── StoreError             the SQLite store cannot be used (exit 1)
├── SourceError            one paper source failed (the run goes on with the others)
│   └── PayloadError       a source answered, but with something we cannot use
├── RenderError            a digest could not be rendered (that subscriber only)
└── DeliveryError          the transport failed
    └── TransportSetupError   login / TLS / connection failed before sending anything
"""

from __future__ import annotations


class DigestdError(Exception):
    """Base class: every error digestd raises on purpose."""

    exit_code = 1


class ConfigError(DigestdError):
    exit_code = 2


class ValidationError(DigestdError):
    """One or more invalid values; ``problems`` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class NotFoundError(DigestdError):
    exit_code = 2


class StoreError(DigestdError):
    pass


class SourceError(DigestdError):
    pass


class PayloadError(SourceError):
    pass


class RenderError(DigestdError):
    pass


class DeliveryError(DigestdError):
    pass


class TransportSetupError(DeliveryError):
    pass

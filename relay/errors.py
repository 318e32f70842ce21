"""The exception tree of relay.

Every error a user can cause or meet has a class here, so the CLI can turn it
into one line and an exit code, and callers can catch by meaning::

    RelayError
     ├── ConfigError              bad or missing setting (exit 2)
     ├── ContractError            an event does not fit SPEC §1
     │    ├── UnknownEventType    no model for (event_type, schema_version)
     │    └── InvalidPayload      the payload fails its model; names the field
     ├── DatabaseUnavailable      cannot reach PostgreSQL (names host:port, never the password)
     ├── MigrationError           a migration cannot be applied
     │    ├── MigrationTampered   an applied migration's file changed since
     │    └── SchemaNotCurrent    the database's schema is missing, behind or ahead (exit 2)
     ├── InvalidCursor            a stream cursor that is malformed or from elsewhere
     └── AuthError                a token is missing/invalid (401) or not allowed (403)
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "ContractError",
    "DatabaseUnavailable",
    "InvalidCursor",
    "InvalidPayload",
    "MigrationError",
    "MigrationTampered",
    "RelayError",
    "SchemaNotCurrent",
    "UnknownEventType",
    "clip",
]


def clip(text: str, limit: int = 80) -> str:
    """``text`` in at most ``limit`` characters, saying how much was cut: producer
    text quoted into a message, a reason or a log line must stay short."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text)} characters)"
    return text[: max(0, limit - len(note))] + note


class RelayError(Exception):
    """Base of every error relay raises on purpose."""

    exit_code: int = 1


class ConfigError(RelayError):
    """A setting is missing or malformed; the message names the variable."""

    exit_code = 2


class ContractError(RelayError):
    """An event does not fit the contract; it is dead-lettered, never broadcast."""


class UnknownEventType(ContractError):
    """No model is registered for this (event_type, schema_version)."""


class InvalidPayload(ContractError):
    """The payload fails validation against its model.

    ``field`` names the first offending field (camelCase), so the producer's
    bug is found from the message alone.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DatabaseUnavailable(RelayError):
    """PostgreSQL cannot be reached; the message names host and port only."""

    exit_code = 3


class MigrationError(RelayError):
    """A migration could not be applied."""


class MigrationTampered(MigrationError):
    """An already-applied migration file was edited; refusing to continue."""


class SchemaNotCurrent(MigrationError):
    """The database's relay schema does not match this code; says what to run."""

    exit_code = 2


class InvalidCursor(RelayError):
    """A cursor that is malformed, from another stream, or from another database."""


class LogPruned(RelayError):
    """A read started below what retention kept: its windows are gone, and
    reading on would silently skip their events. Resume from the oldest."""


class AuthError(RelayError):
    """Authentication (401) or authorisation (403) failed."""

    def __init__(self, message: str, *, status: int = 401, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

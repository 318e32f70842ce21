"""Configuration from environment variables, typed and checked at start-up.

Every variable is a field below with its default and a one-line description;
the README's table is generated from this class (a test keeps them equal). A
bad value becomes one ``ConfigError`` line naming the variable.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay.errors import ConfigError

__all__ = ["Settings", "load_settings", "parse_duration", "settings_table"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d``, ``250ms`` or plain seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 90s, 15m, 24h or 7d, got {value!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
_SECRET_FIELDS = frozenset({"jwt_secret", "database_url"})


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """All of relay's settings; field aliases are the environment variable names."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    database_url: str | None = Field(
        None, alias="DATABASE_URL", description="libpq URL of the order service's database"
    )
    host: str = Field("127.0.0.1", alias="HOST", description="HTTP bind address")
    port: int = Field(8000, alias="PORT", ge=1, le=65535, description="HTTP port")
    jwt_secret: str | None = Field(
        None, alias="RELAY_JWT_SECRET", description="HS256 shared secret for tokens"
    )
    jwt_jwks: str | None = Field(
        None, alias="RELAY_JWT_JWKS", description="JWKS file path or URL for RS256/ES256 tokens"
    )
    jwt_audience: str | None = Field(
        None, alias="RELAY_JWT_AUDIENCE", description="required `aud` claim, when set"
    )
    jwt_issuer: str | None = Field(
        None, alias="RELAY_JWT_ISSUER", description="required `iss` claim, when set"
    )
    heartbeat_seconds: float = Field(
        15.0, alias="RELAY_HEARTBEAT_SECONDS", gt=0, le=300, description="SSE comment heartbeat"
    )
    retention: Duration = Field(
        timedelta(hours=24),
        alias="RELAY_RETENTION",
        description="how long published events stay replayable (e.g. 24h, 7d)",
    )
    log_format: Literal["json", "text"] = Field(
        "text", alias="RELAY_LOG_FORMAT", description="`json` or `text`"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", alias="RELAY_LOG_LEVEL", description="log level"
    )
    wakeup: Literal["poll", "notify"] = Field(
        "poll",
        alias="RELAY_WAKEUP",
        description="`poll` (adaptive, no cost to producers) or `notify` (trigger + LISTEN)",
    )
    poll_idle: Duration = Field(
        timedelta(milliseconds=10),
        alias="RELAY_POLL_IDLE",
        description="longest pause between probes for a new window when idle (5x after 1 s "
        "without events)",
    )
    linger: Duration = Field(
        timedelta(milliseconds=25),
        alias="RELAY_LINGER",
        le=timedelta(seconds=1),
        description="after a window, the next waits 0.25 ms per event of it, up to this: "
        "fewer, larger windows under load, ms latency at low rates",
    )
    window_interval: Duration = Field(
        timedelta(milliseconds=2),
        alias="RELAY_WINDOW_INTERVAL",
        le=timedelta(seconds=1),
        description="shortest time between two windows: bounds the recorder's commits "
        "beside busy producers (0: a window per turn)",
    )
    safety_sweep: Duration = Field(
        timedelta(seconds=1),
        alias="RELAY_SAFETY_SWEEP",
        description="probe at least this often whatever the wake-up says; a standby takes "
        "the recorder's role within it",
    )
    batch_size: int = Field(
        5000, alias="RELAY_BATCH_SIZE", ge=1, le=10000, description="rows per read of a window"
    )
    replay_memory: int = Field(
        50_000,
        alias="RELAY_REPLAY_MEMORY",
        ge=0,
        le=1_000_000,
        description="events the gateway keeps for resuming streams (0: every resume reads the log)",
    )
    subscriber_buffer: int = Field(
        1000,
        alias="RELAY_SUBSCRIBER_BUFFER",
        ge=1,
        description="events buffered per SSE subscriber before its stream is closed",
    )
    max_connections: int = Field(
        0, alias="RELAY_MAX_CONNECTIONS", ge=0, description="stream cap per process (0 = none)"
    )
    max_connections_per_subject: int = Field(
        0,
        alias="RELAY_MAX_CONNECTIONS_PER_SUBJECT",
        ge=0,
        description="stream cap per token subject (0 = none)",
    )
    cors_origins: str = Field(
        "", alias="RELAY_CORS_ORIGINS", description="comma-separated allowed CORS origins"
    )
    publishers: str = Field(
        "",
        alias="RELAY_PUBLISHERS",
        description="comma-separated broker URLs (amqp://…, nats://…)",
    )
    backplane: str = Field(
        "",
        alias="RELAY_BACKPLANE",
        description="nats://… : gateways take their live tail from JetStream (unset: the database)",
    )
    replica_id: str = Field(
        default_factory=_default_replica_id,
        alias="RELAY_REPLICA_ID",
        description="name of this process in `relay status` (default host-pid)",
    )
    shutdown_grace: Duration = Field(
        timedelta(seconds=5),
        alias="RELAY_SHUTDOWN_GRACE",
        description="how long SIGTERM waits for in-flight work",
    )

    query_timeout: Duration = Field(
        timedelta(seconds=15),
        alias="RELAY_QUERY_TIMEOUT",
        description="client-side bound on one database round trip (detects half-open links)",
    )
    sla_enabled: bool = Field(
        True, alias="RELAY_SLA_ENABLED", description="derive OrderDelayAlert events from deadlines"
    )
    sla_not_accepted: Duration = Field(
        timedelta(minutes=3),
        alias="RELAY_SLA_NOT_ACCEPTED",
        description="alert when a paid order is not accepted within this",
    )
    sla_not_ready: Duration = Field(
        timedelta(minutes=25),
        alias="RELAY_SLA_NOT_READY",
        description="alert when an accepted order is not ready within this",
    )
    sla_delivery_grace: Duration = Field(
        timedelta(0),
        alias="RELAY_SLA_DELIVERY_GRACE",
        description="alert when delivery runs this far past estimatedDeliveryTime",
    )

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def publisher_urls(self) -> list[str]:
        return [u.strip() for u in self.publishers.split(",") if u.strip()]

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: expected a libpq URL such as "
                "postgresql://user@host:5432/orders"
            )
        return self.database_url

    def require_jwt_key(self) -> None:
        if not self.jwt_secret and not self.jwt_jwks:
            raise ConfigError(
                "no token key configured: set RELAY_JWT_SECRET (HS256) or "
                "RELAY_JWT_JWKS (a JWKS file path or URL)"
            )

    def masked(self) -> dict[str, str]:
        """Effective configuration by variable name, secrets masked.

        Besides the secret fields, every value goes through the logs' redaction:
        broker URLs in RELAY_PUBLISHERS and a JWKS URL may carry a password or
        a token, which ``relay config`` must not print any more than a log line.
        """
        from relay.logs import redact

        shown: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            text = "" if value is None else str(value)
            if name == "database_url" and value:
                from relay.db import describe

                text = f"postgresql://{describe(value)} (password hidden)"
            elif name in _SECRET_FIELDS and value:
                text = "***"
            else:
                text = redact(text)
            shown[str(field.alias)] = text
        return shown


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        info = Settings.model_fields.get(field)
        name = str(info.alias) if info and info.alias else field
        raw = first.get("input")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{name}={raw!r} is invalid: {message}") from None


def settings_table() -> str:
    """The README's configuration table, generated from the fields above."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "replica_id":
            default = "`<hostname>-<pid>`"
        elif field.default is None:
            default = "(unset)"
        elif isinstance(field.default, timedelta):
            default = f"`{_format_duration(field.default)}`"
        else:
            default = f"`{field.default}`" if field.default != "" else "(empty)"
        rows.append(f"| `{field.alias}` | {default} | {field.description} |")
    return "\n".join(rows)


def _format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"

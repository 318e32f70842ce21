"""Structured logs (``RELAY_LOG_FORMAT=json|text``) that never carry secrets.

A filter on every handler masks ``access_token=…`` values, bearer tokens and
URL passwords, whatever logged them (our code, uvicorn, a library).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from relay.errors import clip

__all__ = ["MAX_MESSAGE", "RedactingFilter", "configure_logging", "redact"]

_PATTERNS = (
    (re.compile(r"((?:access_token|token)=)[^&\s\"']+", re.I), r"\1***"),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I), r"\1***"),
    # user:password@ up to the URL's last "@" (a password may hold an unencoded
    # one), and a lone user@, which for NATS is a token: both masked.
    (re.compile(r"(://[^:/@\s,]+:)[^\s,]*@"), r"\1***@"),
    (re.compile(r"(://)[^:/@\s,]+@"), r"\1***@"),
    (re.compile(r"(password=)\S+", re.I), r"\1***"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "***jwt***"),
)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# A log line quoting producer text (an event type, a reason) is cut here: a
# megabyte string must not become a megabyte line in the operator's logs.
MAX_MESSAGE = 2000


class RedactingFilter(logging.Filter):
    """Masks secrets and cuts oversized text, in the message and in every extra."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = clip(redact(message), MAX_MESSAGE), None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str) and len(value) > MAX_MESSAGE:
                setattr(record, key, clip(value, MAX_MESSAGE))
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")
        )
        line = super().format(record)
        return f"{line} {extras}" if extras else line


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Broker clients log every lost connection with a traceback; the publisher
    # already logs one line per outage, so only their errors get through.
    for name in ("aiormq", "aio_pika", "nats"):
        logging.getLogger(name).setLevel(logging.ERROR)

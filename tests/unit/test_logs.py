"""Log lines stay bounded and secret-free whatever text reaches them."""

from __future__ import annotations

import logging

import pytest

from relay.logs import MAX_MESSAGE, RedactingFilter


def _filtered(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": msg, "args": args, **extra})
    assert RedactingFilter().filter(record)
    return record


def test_a_megabyte_message_is_cut_and_says_how_much() -> None:
    record = _filtered("dead-lettered event (%s)", "X" * 1_000_000)
    text = record.getMessage()
    assert len(text) < MAX_MESSAGE + 100
    assert len(text) <= MAX_MESSAGE
    assert text.endswith(f"({len('dead-lettered event ()') + 1_000_000} characters)")


def test_a_megabyte_extra_is_cut_too() -> None:
    record = _filtered("dead-lettered", event_type="T" * 1_000_000)
    assert len(getattr(record, "event_type")) < MAX_MESSAGE + 100  # noqa: B009


@pytest.mark.parametrize(
    "secret",
    [
        "access_token=eyJabc.def.ghi",
        "Bearer abc.def",
        "amqp://u:hunter2@host/",
        "amqp://guest:hun@ter2@host:5672/",  # an unencoded @ in the password
        "nats://hunter2@127.0.0.1:4222",  # a NATS token in the user part
        "amqp://u:x@h1,nats://u2:hunter2@h2",
    ],
)
def test_secrets_are_masked(secret: str) -> None:
    text = _filtered("connecting %s", secret).getMessage()
    assert "hunter2" not in text and "ter2" not in text and "abc.def" not in text

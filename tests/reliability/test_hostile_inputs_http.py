"""Hostile and careless input over real HTTP, and secrets kept out of `relay config`.

A correctly signed token whose time claims are absurd (an ``exp`` in
milliseconds, past year 9999, infinite, a string, a bool) is a bad token: 401
with a reason, never a 500. Numbers a client spells with thousands of digits
(``limit``, cursors) are a 400 or a reset, never a 500: ``int()`` refuses more
than 4,300 digits by raising. And ``relay config`` prints broker and JWKS
URLs with their passwords masked, as the logs do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames

RESTAURANT = uuid.uuid4()
NOW = int(time.time())
FUTURE = NOW + 3600
HEADER = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(times: dict[str, str], *, admin: bool = False) -> str:
    """An HS256 token signed with the relay's secret, built by hand: each time
    claim is spliced in as raw JSON text, since ``1e999`` or ``NaN`` have no
    spelling a JSON encoder would produce on purpose."""
    roles = ["admin"] if admin else []
    claims = json.dumps({"sub": "hostile", "restaurant_ids": [str(RESTAURANT)], "roles": roles})
    body = claims[:-1] + "".join(f', "{name}": {raw}' for name, raw in times.items()) + "}"
    signing_input = f"{_b64(HEADER)}.{_b64(body.encode())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _no_crash_logged(relay: RelayProcess, since: int) -> None:
    """Nothing in the relay's log since offset ``since`` (this test's share) is a crash."""
    output = relay.output()[since:]
    assert "Traceback" not in output and "Exception in ASGI" not in output, output[-3000:]


# (offending claim, the other time claims, the offending value as raw JSON)
ABSURD_TIMES = [
    ("exp", {}, str(NOW * 1000)),  # milliseconds: year ~58,000
    ("exp", {}, str(10**20)),
    ("exp", {}, "253402300800"),  # 10000-01-01, one second past what a datetime holds
    ("exp", {}, "1e300"),
    ("exp", {}, "1e999"),  # parses as an infinite float
    ("exp", {}, "Infinity"),
    ("exp", {}, "-Infinity"),
    ("exp", {}, "NaN"),
    ("exp", {}, '"soon"'),
    ("exp", {}, "true"),
    ("exp", {}, json.dumps(str(FUTURE))),  # a number in a string is not a NumericDate
    ("exp", {}, "[1]"),
    ("nbf", {"exp": str(FUTURE)}, str(10**20)),
    ("nbf", {"exp": str(FUTURE)}, str(-(10**20))),
    ("nbf", {"exp": str(FUTURE)}, "true"),
    ("nbf", {"exp": str(FUTURE)}, '"soon"'),
    ("iat", {"exp": str(FUTURE)}, "NaN"),
    ("iat", {"exp": str(FUTURE)}, str(NOW * 1000)),
    ("iat", {"exp": str(FUTURE)}, "false"),
]


@pytest.mark.parametrize(("claim", "others", "raw"), ABSURD_TIMES)
def test_absurd_time_claims_are_a_401_naming_the_claim(
    relay: RelayProcess, claim: str, others: dict[str, str], raw: str
) -> None:
    """The signature is right, so only the claim is wrong: a 401 that says
    which one, on the polling and the streaming endpoint alike."""
    since = len(relay.output())
    token = _signed({**others, claim: raw})
    for path in ("events", "stream"):
        response = httpx.get(
            f"{relay.url}/v1/restaurants/{RESTAURANT}/{path}",
            headers=_bearer(token),
            timeout=10,
        )
        assert response.status_code == 401, (path, response.status_code, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        # The claim as a word: "token expired" does not name a bad exp.
        assert re.search(rf"\b{claim}\b", response.json()["error"]), response.text
    _no_crash_logged(relay, since)


def test_the_last_representable_exp_is_accepted_and_one_more_second_is_not(
    relay: RelayProcess,
) -> None:
    """An exp at 9999-12-31T23:59:59 is far-fetched but valid, as PyJWT has
    it: the stream opens and its expiry timer, built from that exp, keeps
    the heartbeat going. One second later there is no datetime for it."""
    since = len(relay.output())
    last = _signed({"exp": "253402300799"})
    url = f"{relay.url}/v1/restaurants/{RESTAURANT}/stream"
    with httpx.stream("GET", url, headers=_bearer(last), timeout=10) as response:
        assert response.status_code == 200
        buffer, comments = "", list[str]()
        deadline = time.monotonic() + 8
        for chunk in response.iter_text():
            buffer += chunk
            _frames, comments, _tail = parse_frames(buffer)
            if "heartbeat" in comments or time.monotonic() > deadline:
                break
        assert buffer.startswith("retry: ") and "heartbeat" in comments, buffer
    polled = httpx.get(
        f"{relay.url}/v1/restaurants/{RESTAURANT}/events",
        headers=_bearer(last),
        timeout=10,
    )
    assert polled.status_code == 200, polled.text
    beyond = httpx.get(url, headers=_bearer(_signed({"exp": "253402300800"})), timeout=10)
    assert beyond.status_code == 401 and re.search(r"\bexp\b", beyond.json()["error"])
    _no_crash_logged(relay, since)


@pytest.mark.parametrize(
    ("limit", "status"),
    [
        ("9" * 4301, 400),
        ("1" * 10_000, 400),
        ("0" * 5000 + "7", 200),  # leading zeros: still the number 7, as "007" is
    ],
    ids=["4301-digits", "10000-digits", "zero-padded"],
)
def test_limit_of_any_length_is_answered_not_crashed(
    relay: RelayProcess, limit: str, status: int
) -> None:
    """``int()`` raises past 4,300 digits: the length is checked first."""
    since = len(relay.output())
    response = httpx.get(
        f"{relay.url}/v1/restaurants/{RESTAURANT}/events",
        params={"limit": limit},
        headers=_bearer(_signed({"exp": str(FUTURE)})),
        timeout=10,
    )
    assert response.status_code == status, response.text[:300]
    if status == 400:
        assert "limit" in response.json()["error"]
    else:
        assert isinstance(response.json()["events"], list)
    _no_crash_logged(relay, since)


HUGE_CURSORS = [
    "w" + "9" * 5000,
    "w1." + "9" * 5000 + ".1",
    "w1.1." + "9" * 5000,
    "w9999999999999999999",  # past the pattern's 18 digits of window
    "w1.9223372036854775807.1",  # the xid of "the whole window": never an event's
    "w999999999999999999",  # a window far past the log's head
    "w999999999999999999.1.1~0badcafe",
    "9" * 5000,
    "1-" + "9" * 5000,
    "v.1-" + "9" * 5000,
    "v" + ".1-1" * 2000,
    "1-9999999999999999999",  # fits the cursor pattern, not a PostgreSQL bigint
    "v.1-9999999999999999999",
]


@pytest.mark.parametrize("cursor", HUGE_CURSORS, ids=range(len(HUGE_CURSORS)))
def test_huge_cursors_reset_rather_than_crash(relay: RelayProcess, cursor: str) -> None:
    """A cursor is matched against a bounded pattern before any ``int()``, and
    a position past the log's head never reaches a query: the client is told
    to start over (a reset), whichever way it sent the cursor."""
    since = len(relay.output())
    auth = _bearer(_signed({"exp": str(FUTURE)}))
    polled = httpx.get(
        f"{relay.url}/v1/restaurants/{RESTAURANT}/events",
        params={"after": cursor},
        headers=auth,
        timeout=10,
    )
    assert polled.status_code == 200, polled.text[:300]
    assert polled.json()["reset"]
    admin = _bearer(_signed({"exp": str(FUTURE)}, admin=True))
    for stream, token in (
        (f"{relay.url}/v1/restaurants/{RESTAURANT}/stream", auth),
        (f"{relay.url}/v1/admin/stream", admin),  # a stream over every restaurant
    ):
        for params, headers in (
            ({"lastEventId": cursor}, token),
            ({}, {**token, "Last-Event-ID": cursor}),
        ):
            with httpx.stream(
                "GET", stream, params=params, headers=headers, timeout=10
            ) as response:
                assert response.status_code == 200
                first = next(response.iter_text())
            assert "event: reset" in first, (stream, first)
    _no_crash_logged(relay, since)


def test_relay_config_prints_no_secret() -> None:
    """Broker URLs carry passwords, and so may a JWKS URL: `relay config`,
    text or JSON, masks them as the logs do, and still shows the rest."""
    secrets = [
        "s3cret",
        "n4tspw",
        "db-pa55word",
        "jwt-secret-value-0123456789",
        "jwk5pw",
        "jwkstok",
    ]
    env = {
        **os.environ,
        "RELAY_PUBLISHERS": (
            "amqp://guest:s3cret@127.0.0.1:5672/?exchange=x,nats://user:n4tspw@127.0.0.1:4222"
        ),
        "DATABASE_URL": "postgresql://app:db-pa55word@127.0.0.1:5432/orders",
        "RELAY_JWT_SECRET": "jwt-secret-value-0123456789",
        "RELAY_JWT_JWKS": "https://idp:jwk5pw@127.0.0.1:9/jwks.json?token=jwkstok",
    }
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "relay", "config", *extra],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        output = result.stdout + result.stderr
        assert [s for s in secrets if s in output] == [], output
        assert "127.0.0.1:5672" in output and "exchange=x" in output and "127.0.0.1:4222" in output
        assert "127.0.0.1:9/jwks.json" in output

"""Fuzzing every input: payloads, tokens, cursors. Never a crash, never a leak."""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.errors import AuthError, ContractError, InvalidCursor
from relay.events import REGISTRY, Envelope, render
from relay.gateway.auth import AuthConfig, TokenVerifier
from relay.log import Position
from tests.helpers.orders import payload

RESTAURANT, ORDER = uuid.uuid4(), uuid.uuid4()
SECRET = "fuzz-secret-" * 6
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=50)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
event_types = st.sampled_from([*sorted({t for t, _ in REGISTRY}), "Nope", ""])


def _contract_fields(event_type: str) -> set[str]:
    spec = REGISTRY.get((event_type, 1))
    if spec is None:
        return set()
    return {info.alias or name for name, info in spec.model.model_fields.items()} | {
        "eventId", "eventType", "schemaVersion", "occurredOnUtc",
    }  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_type=event_types, body=st.dictionaries(st.text(max_size=20), json_values, max_size=10))
def test_random_payloads_are_rejected_cleanly_or_whitelisted(
    event_type: str, body: dict[str, Any]
) -> None:
    _render_and_check(event_type, body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=st.sampled_from(
        ["OrderPaymentSucceeded", "OrderAccepted", "OrderDelivered", "OrderPaymentFailed"]
    ),
    drop=st.sets(
        st.sampled_from(
            ["orderId", "orderNumber", "total", "newStatus", "status", "lastUpdateTimestamp"]
        )
    ),
    extra=st.dictionaries(
        st.sampled_from(
            ["customerName", "email", "phone", "address", "CustomerName", "card", "ssn"]
        ),
        st.text(max_size=2000),
    ),
    mutate=st.dictionaries(
        st.sampled_from(
            ["orderNumber", "total", "newStatus", "lastUpdateTimestamp", "estimatedDeliveryTime"]
        ),
        json_values,
        max_size=2,
    ),
)
def test_mutated_real_payloads_never_leak_extra_fields(
    event_type: str, drop: set[str], extra: dict[str, str], mutate: dict[str, Any]
) -> None:
    body = payload(event_type, restaurant_id=RESTAURANT, order_id=ORDER, pii=False)
    for key in drop:
        body.pop(key, None)
    body.update(mutate)
    body.update(extra)
    _render_and_check(event_type, body)


def _render_and_check(event_type: str, body: dict[str, Any]) -> None:
    env = Envelope(str(uuid.uuid4()), event_type, 1, str(RESTAURANT), str(ORDER), None,
                   datetime.now(UTC), body)  # fmt: skip
    try:
        result = render(env)
    except ContractError:
        return
    assert set(result.data) <= _contract_fields(event_type)
    json.dumps(result.data)  # always encodable
    for key in body:
        if key not in _contract_fields(event_type) and key[:1].lower() + key[
            1:
        ] not in _contract_fields(event_type):
            assert key in result.dropped_fields


def _b64(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


NOW = int(time.time())
# Time claims as careless or hostile issuers write them: near now, in
# milliseconds, past what a datetime holds (year 10000 starts at 253402300800),
# of any size or sign, non-finite, or not numbers at all.
time_values = st.one_of(
    st.integers(NOW - 10**6, NOW + 10**6),
    st.sampled_from(
        [NOW * 1000, 10**20, -(10**20), 253402300799, 253402300800, -62135596801, 0, 2**63]
    ),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(NOW, NOW + 10**6).map(str),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
)


def _numeric_date(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@settings(max_examples=300, deadline=None)
@given(
    claims=st.dictionaries(
        st.sampled_from(["sub", "exp", "aud", "iss", "restaurant_ids", "roles", "nbf", "iat"]),
        json_values,
    ),
    times=st.dictionaries(st.sampled_from(["exp", "nbf", "iat"]), time_values),
    alg=st.sampled_from(["HS256", "HS512", "none", "RS256", "ES256", "", "hs256"]),
    key=st.sampled_from([SECRET, "wrong-secret-" * 6, ""]),
)
@example(claims={"sub": "s"}, times={"exp": NOW * 1000}, alg="HS256", key=SECRET)
@example(claims={"sub": "s"}, times={"exp": 10**20}, alg="HS256", key=SECRET)
@example(claims={"sub": "s"}, times={"exp": 253402300800}, alg="HS256", key=SECRET)
@example(claims={"sub": "s"}, times={"exp": 1e300}, alg="HS256", key=SECRET)
@example(claims={"sub": "s"}, times={"exp": str(NOW + 600)}, alg="HS256", key=SECRET)
@example(claims={"sub": "s"}, times={"exp": NOW + 600, "nbf": True}, alg="HS256", key=SECRET)
def test_random_tokens_are_refused_or_yield_a_principal(
    claims: dict[str, Any], times: dict[str, Any], alg: str, key: str
) -> None:
    claims = {**claims, **times}
    verifier = TokenVerifier(AuthConfig(secret=SECRET))
    if alg in ("HS256", "HS512") and key:
        try:
            token = jwt.encode(claims, key, algorithm=alg)
        except (TypeError, ValueError):
            return
    else:
        token = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{_b64(claims)}."
    try:
        principal = verifier.verify(token)
    except AuthError as exc:
        assert exc.status == 401
        return
    # Only a correctly signed HS256 token with a string sub and a future exp gets through,
    # and only with numbers for its times: an expiry a stream's timer can use.
    assert alg == "HS256" and key == SECRET
    assert principal.subject == claims["sub"]
    assert all(_numeric_date(claims[t]) for t in ("exp", "nbf", "iat") if t in claims), claims
    assert abs(principal.expires_at.timestamp() - claims["exp"]) < 1
    assert principal.expires_at > datetime.now(UTC) - timedelta(minutes=1)


TOKEN_PIECES = st.sampled_from([".", "=", "-", "_", "!", "eyJ", "e30", "W10", "bnVsbA", "fQ", " "])


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(max_size=60) | st.lists(TOKEN_PIECES, max_size=12).map("".join),
    header=st.sampled_from([[], "x", None, {"alg": "HS256", "kid": 7}, {"alg": 5}, {}]),
)
# A header nested deeper than any decoder recurses.
@example(text=base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode() + ".e30.", header={})
def test_malformed_tokens_are_refused_with_401(text: str, header: Any) -> None:
    """Garbage, a header that is no JSON object, or one with a kid that is no
    string: a 401, never another exception, whatever the header reading meets."""
    verifier = TokenVerifier(AuthConfig(secret=SECRET))
    for token in (text, f"{_b64(header)}.{_b64({'sub': 's'})}.{text}"):
        with pytest.raises(AuthError) as caught:
            verifier.verify(token)
        assert caught.value.status == 401


CURSOR_PIECES = st.sampled_from(["w", ".", "~", "-", "v.", "0", "7", "12", "9" * 19, "1a2b3c4d"])


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(max_size=40)
    | st.lists(CURSOR_PIECES, max_size=8).map("".join)
    | st.builds(
        lambda w, x, i: f"w{w}.{x}.{i}",
        st.integers(-5, 10**19),
        st.integers(-5, 2**64),
        st.integers(-5, 2**64),
    ),
    scope=st.sampled_from(["", "1a2b3c4d"]),
)
@example(text="w12", scope="")
@example(text="w12.771.5003", scope="")
@example(text="w12~1a2b3c4d", scope="1a2b3c4d")
@example(text="3-17", scope="")
@example(text="v.3-17", scope="")
@example(text="w-1", scope="")
def test_random_cursors_parse_or_raise_invalid_cursor(text: str, scope: str) -> None:
    """Whatever a client sends as Last-Event-ID: a position of the log that
    encodes back to itself, or InvalidCursor (its stream gets a reset)."""
    try:
        position = Position.parse(text, scope)
    except InvalidCursor:
        return
    assert position.window >= 0 and position.xid >= 0 and position.id >= 0
    assert position.whole or (position.xid < 2**63 - 1 and position.id < 2**63 - 1)
    assert Position.parse(position.encode(scope), scope) == position

"""The SLA watcher's reads of single fields from an event's rendered JSON."""

from __future__ import annotations

import json

import pytest

from relay.sla import _field

DATA = json.dumps(
    {
        "orderNumber": 'B-"7\\\\',
        "plain": "B-7",
        "unicode": "Zoë \u2028",
        "count": 12,
        "none": None,
        "nested": {"plain": "inner"},
        "last": "end",
    },
    separators=(",", ":"),
    ensure_ascii=False,
)


@pytest.mark.parametrize("key", ["orderNumber", "plain", "unicode", "count", "none", "last"])
def test_a_field_reads_as_json_loads_reads_it(key: str) -> None:
    assert _field(DATA, key) == json.loads(DATA)[key]


def test_an_absent_field_is_none() -> None:
    assert _field(DATA, "absent") is None

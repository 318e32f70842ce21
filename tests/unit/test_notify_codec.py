"""The NOTIFY codec: what a publication tells every relay process, and what a
reader makes of a payload it cannot trust (a hint, never data)."""

from __future__ import annotations

import pytest

from relay.log import notify


def test_a_batch_notice_round_trips_to_each_partitions_last_position() -> None:
    text = notify.encode({3: (17, 20), 63: (1, 1)})
    assert text == "3:17:20,63:1:1"
    assert notify.decode(text) == [(3, 20), (63, 1)]


@pytest.mark.parametrize(
    "payload",
    ["", "3:17", "3:17:x", "x:1:2", "64:1:2", "-1:1:2", "3:1:2,", "3:1:2:4"],
)
def test_a_malformed_notice_is_refused_whole(payload: str) -> None:
    with pytest.raises(ValueError):
        notify.decode(payload)

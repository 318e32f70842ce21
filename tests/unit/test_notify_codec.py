"""The NOTIFY codec: what a new window tells every relay process, and what a
reader makes of a payload it cannot trust (a hint, never data)."""

from __future__ import annotations

import pytest

from relay.log import notify


def test_the_channel_is_the_windows_channel() -> None:
    assert notify.CHANNEL == "relay_windows"


@pytest.mark.parametrize(
    ("payload", "window"), [("0", 0), ("17", 17), ("999999999999999999", 10**18 - 1)]
)
def test_a_notice_names_one_window(payload: str, window: int) -> None:
    assert notify.decode(payload) == window


@pytest.mark.parametrize(
    "payload",
    ["", "-1", "+1", " 1", "1 ", "1.5", "x", "3:17:20", "1e3", "١٢", "²", "1" * 19],
)
def test_a_malformed_notice_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        notify.decode(payload)

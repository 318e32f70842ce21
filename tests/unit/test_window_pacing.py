"""How long the recorder waits between windows while producers are live."""

from __future__ import annotations

import pytest

from relay.recorder import RecorderConfig

CONFIG = RecorderConfig(linger=0.025, window_interval=0.002)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_a_window_of_a_few_rows_is_followed_after_the_interval_only(rows: int) -> None:
    """At 1,000 events/s a window holds two or three rows: latency wins."""
    assert CONFIG.pause_after(rows, since_window=0.0005) == pytest.approx(0.0015)
    assert CONFIG.pause_after(rows, since_window=0.003) == 0.0  # the interval has passed


def test_from_eight_rows_the_next_window_lingers_with_the_last_ones_size() -> None:
    """Busy producers get fewer, larger windows: each is a statement and a
    commit on their database whatever it holds."""
    assert CONFIG.pause_after(8, since_window=0.003) == pytest.approx(0.002)
    assert CONFIG.pause_after(40, since_window=0.003) == pytest.approx(0.010)
    assert CONFIG.pause_after(5000, since_window=0.003) == 0.025  # at most RELAY_LINGER


def test_no_interval_and_no_linger_means_a_window_per_turn() -> None:
    eager = RecorderConfig(linger=0.0, window_interval=0.0)
    assert eager.pause_after(5000, since_window=0.0) == 0.0

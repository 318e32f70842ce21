"""The backplane's two ends against a real NATS server: what the publishing
side sends arrives once and in order, a restart of NATS costs the tail nothing
it cannot resume, and a message a gateway cannot trust is skipped, never
applied in part."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import nats
import pytest
from nats.js.api import StreamConfig

from relay.backplane import BackplaneConfig, parse_backplane_url
from relay.backplane.codec import AFTER, REACHED
from relay.backplane.reader import Reader
from relay.backplane.writer import Writer
from relay.log import ORIGIN, LogEvent, Page, Position
from tests.helpers.nats_server import NatsServer, nats_server

Stretch = tuple[Position, Position, tuple[LogEvent, ...]]


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with nats_server() as running:
        yield running


@pytest.fixture
def config(server: NatsServer) -> BackplaneConfig:
    return parse_backplane_url(server.url)


def _event(window: int, row: int) -> LogEvent:
    now = datetime.now(UTC)
    return LogEvent(Position(window, 900, row), "orderAccepted", ("restaurant:r", "admin"),
                    '{"orderId":"o"}', f"e-{window}-{row}", "OrderAccepted", 1, "r", "o", None,
                    now, now)  # fmt: skip


def _page(window: int, events: int) -> Page:
    listed = [_event(window, i) for i in range(1, events + 1)]
    return Page(Position.end_of(window - 1), listed, [], Position.end_of(window), events)


class Tail:
    """A reader and what it handed over, as the hub would take it."""

    def __init__(self, config: BackplaneConfig) -> None:
        self.got: list[Stretch] = []
        self.delivered = ORIGIN
        self.reader = Reader(config, self._offer, lambda: self.delivered)

    def _offer(self, after: Position, reached: Position, events: tuple[LogEvent, ...]) -> None:
        self.got.append((after, reached, events))
        self.delivered = max(self.delivered, reached)

    def events(self) -> list[LogEvent]:
        return [e for _a, _r, part in self.got for e in part]

    def continuous(self) -> bool:
        return all(b[0] == a[1] for a, b in zip(self.got, self.got[1:], strict=False))


async def _until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def running(config: BackplaneConfig) -> AsyncIterator[tuple[Writer, Tail]]:
    writer, tail, stop = Writer(config), Tail(config), asyncio.Event()
    tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(tail.reader.run(stop))]
    await _until(lambda: writer.state == "publishing" and tail.reader.live)
    try:
        yield writer, tail
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_pages_arrive_once_in_log_order_as_one_chain(
    running: tuple[Writer, Tail],
) -> None:
    writer, tail = running
    pages = [_page(w, events=w % 4) for w in range(0, 40)]
    for page in pages:
        writer.handed(page)
        if page.after.window % 7 == 0:
            await asyncio.sleep(0.01)  # some pages alone, some merged
    await _until(lambda: tail.delivered == Position.end_of(39))
    assert tail.events() == [e for p in pages for e in p.events]
    assert tail.got[0][0] == Position.end_of(-1)
    assert tail.continuous()
    assert writer.published == sum(len(p.events) for p in pages)


async def test_a_restart_of_nats_is_resumed_from_the_stream_without_a_gap(
    server: NatsServer, running: tuple[Writer, Tail]
) -> None:
    writer, tail = running
    for w in range(0, 5):
        writer.handed(_page(w, 2))
    await _until(lambda: tail.delivered == Position.end_of(4))
    server.restart(down_for=0.5)
    await _until(lambda: not tail.reader.live)
    assert tail.reader.state.startswith("unavailable")
    await _until(lambda: writer.state == "publishing" and tail.reader.live)
    for w in range(5, 10):
        writer.handed(_page(w, 2))
    await _until(lambda: tail.delivered == Position.end_of(9))
    assert tail.continuous()  # resumed at the next stream sequence: nothing to read
    assert len(tail.events()) == 20


async def test_pages_handed_while_nats_is_down_are_dropped_for_the_gateways_to_read(
    server: NatsServer, running: tuple[Writer, Tail]
) -> None:
    writer, tail = running
    writer.handed(_page(0, 1))
    await _until(lambda: tail.delivered == Position.end_of(0))
    server.stop()
    await _until(lambda: writer.state.startswith("unavailable"))
    for w in range(1, 4):
        writer.handed(_page(w, 1))  # the recorder never waits for NATS
    server.start()
    await _until(lambda: writer.state == "publishing" and tail.reader.live)
    writer.handed(_page(4, 1))
    await _until(lambda: tail.delivered == Position.end_of(4))
    # The next message begins where the writer stood, beyond the tail: the
    # hub sees the gap and reads windows 1-3 from the log.
    assert tail.got[-1][0] == Position.end_of(3)
    assert [e.at.window for e in tail.events()] == [0, 4]


async def test_a_malformed_message_is_skipped_and_the_next_one_applies(
    config: BackplaneConfig, running: tuple[Writer, Tail], caplog: pytest.LogCaptureFixture
) -> None:
    writer, tail = running
    nc = await nats.connect(config.url)
    try:
        js = nc.jetstream()
        await js.publish(config.subject, b"{not json", headers={AFTER: "-1.9.9", REACHED: "0.1.1"})
        await js.publish(config.subject, b"[]", headers={AFTER: "-1.9.9"})
    finally:
        await nc.close()
    with caplog.at_level(logging.WARNING, logger="relay.backplane"):
        writer.handed(_page(0, 3))
        await _until(lambda: tail.delivered == Position.end_of(0))
    assert len(tail.events()) == 3
    skipped = [r.getMessage() for r in caplog.records if "malformed backplane" in r.getMessage()]
    assert len(skipped) == 2


async def test_a_subject_another_stream_takes_is_reported_not_retried_silently(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="EVENTS", subjects=["taken.>"]))
    finally:
        await nc.close()
    writer, stop = Writer(parse_backplane_url(f"{server.url}?prefix=taken")), asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="relay.backplane"):
        task = asyncio.create_task(writer.run(stop))
        await _until(lambda: writer.state.startswith("unavailable"))
        stop.set()
        await asyncio.wait_for(task, 10)
    assert "JetStream refused to create stream RELAY_LIVE on taken.log" in writer.state
    assert any("taken.log" in r.getMessage() for r in caplog.records)


async def test_an_unreachable_nats_is_reported_at_start_not_retried_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = parse_backplane_url("nats://127.0.0.1:1")
    writer, tail, stop = Writer(config), Tail(config), asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="relay.backplane"):
        tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(tail.reader.run(stop))]
        await _until(lambda: writer.state.startswith("unavailable")
                     and tail.reader.state.startswith("unavailable"), timeout=10)  # fmt: skip
        for page in range(3):
            writer.handed(_page(page, 1))  # the recorder goes on; nothing piles up
        await _until(lambda: writer.queued == 0, timeout=10)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert not tail.reader.live
    warned = [r.getMessage() for r in caplog.records]
    assert any("publisher: backplane nats://127.0.0.1:1 unavailable" in m for m in warned)
    assert any("gateway: backplane nats://127.0.0.1:1 unavailable" in m for m in warned)


async def test_a_backlog_beyond_the_bound_drops_its_oldest_pages_as_a_gap(
    config: BackplaneConfig,
) -> None:
    writer, tail, stop = Writer(config, queue_events=25), Tail(config), asyncio.Event()
    tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(tail.reader.run(stop))]
    try:
        await _until(lambda: writer.state == "publishing" and tail.reader.live)
        for window in range(10):  # in one turn of the loop: the writer cannot keep up
            writer.handed(_page(window, 10))
        assert writer.queued == 2  # 20 events kept of 100, the newest
        await _until(lambda: tail.delivered == Position.end_of(9))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [e.at.window for e in tail.events()] == [8] * 10 + [9] * 10
    assert tail.got[0][0] == Position.end_of(7)  # the hub reads windows 0-7 from the log

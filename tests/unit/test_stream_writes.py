"""The stream write watchdog: a write stuck past its deadline is stopped, and
only that write; the stream's task carries on as if the write had failed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from relay.gateway.sse import EventStream, OpenStreams


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def _stream(registry: OpenStreams, timeout: float) -> EventStream:
    stream = EventStream(_nothing(), headers={}, send_timeout=timeout, registry=registry)
    stream._task = asyncio.current_task()  # as __call__ sets it: the task that writes
    return stream


async def _never(_message: Any) -> None:
    await asyncio.Event().wait()  # a client that stopped reading


async def _sent(_message: Any) -> None:
    return None


async def test_a_stuck_write_is_stopped_after_its_timeout_and_the_task_goes_on() -> None:
    registry = OpenStreams(tick=0.02)
    stream = _stream(registry, timeout=0.1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await stream._write(_never, b"x", more_body=True) is False
    assert 0.1 <= loop.time() - began < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # no cancellation left behind
    await asyncio.sleep(0)  # and the task awaits normally again
    assert await stream._write(_sent, b"y", more_body=True) is True


async def test_writes_that_complete_are_never_stopped() -> None:
    registry = OpenStreams(tick=0.01)
    stream = _stream(registry, timeout=0.05)

    async def slow(_message: Any) -> None:
        await asyncio.sleep(0.01)  # well within the timeout, again and again

    for _ in range(20):  # 0.2 s of writes: four timeouts' worth in all
        assert await stream._write(slow, b"x", more_body=True) is True


async def test_a_cancellation_from_elsewhere_is_not_taken_for_a_stall() -> None:
    registry = OpenStreams(tick=0.01)

    async def write() -> bool:
        return await _stream(registry, timeout=10.0)._write(_never, b"x", more_body=True)

    writer = asyncio.ensure_future(write())
    await asyncio.sleep(0.05)
    writer.cancel()  # the client left, or the server shuts down
    try:
        await writer
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancellation was swallowed")


async def test_hurry_brings_every_pending_deadline_forward() -> None:
    registry = OpenStreams(tick=0.5)

    async def write() -> bool:
        return await _stream(registry, timeout=30.0)._write(_never, b"x", more_body=True)

    writers = [asyncio.ensure_future(write()) for _ in range(3)]
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    registry.hurry(0.2)
    assert await asyncio.gather(*writers) == [False, False, False]
    assert loop.time() - began < 2.0  # not the 30 s timeout

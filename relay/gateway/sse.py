"""The HTTP side of an SSE stream: headers, writes, disconnects, HEAD.

Why not sse-starlette's EventSourceResponse: it runs every stream in an anyio
task group of three tasks (the stream, a shutdown listener, a disconnect
listener), and measured 34 KB of RSS per idle connection against 17 KB here
(5,000 idle connections, uvloop + httptools). Our frames are pre-encoded bytes
(each event once per stream, heartbeats by the stream itself, shutdown through
the hub), so the response only has to write them and notice a departed
client: the body runs in the request's own task, and one small watcher task
waits for ``http.disconnect`` and cancels it.

A client that stops reading is dropped, not just its stream: when a write
stalls for the send timeout, the stream aborts its connection through the
``relay.abort`` ASGI extension (the server's half is in ``relay.service``).
Returning an unfinished response is not enough: uvicorn then *closes* the
transport, which waits for the unsent bytes to drain, so the socket and its
megabytes of buffers stayed for as long as the client kept it, uncounted by
the connection caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["ABORT_EXTENSION", "EventStream", "OpenStreams"]

# scope["extensions"][ABORT_EXTENSION]["abort"]: a callable that drops the
# connection at once (an RST; unsent bytes discarded), offered by the server.
ABORT_EXTENSION = "relay.abort"

log = logging.getLogger("relay.gateway")

_TICK = 0.5  # seconds between the watchdog's looks at the writes in progress


class OpenStreams:
    """The writes in progress of one application's streams, and their watchdog.

    A write stuck on a client that stopped reading is stopped after the send
    timeout by one watchdog task for the whole application, which looks at
    the writes in progress a few times a second: a deadline per write
    (``asyncio.timeout``: a timer scheduled and cancelled for every write of
    every stream) cost more than the write itself when streams write often.

    At shutdown the streams end themselves (the hub closes every subscriber
    and each sends a last ``retry:``), except a write stuck on a client that
    stopped reading: it would wait out its send timeout, longer than the
    shutdown grace, and then be cancelled by the server mid-write. ``hurry``
    brings every deadline forward instead.
    """

    def __init__(self, *, tick: float = _TICK) -> None:
        self._writes: dict[EventStream, float] = {}  # stream -> loop time its write must end by
        self._hurry: float | None = None
        self._tick = tick
        self._watchdog: asyncio.Task[None] | None = None

    def hurry(self, within: float) -> None:
        """From now on no write waits more than ``within`` seconds."""
        self._hurry = within
        self._tick = min(self._tick, within / 4)
        deadline = asyncio.get_running_loop().time() + within
        for stream, when in self._writes.items():
            self._writes[stream] = min(when, deadline)

    def writing(self, stream: EventStream, timeout: float) -> None:
        """``stream`` starts a write that must end within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        self._writes[stream] = loop.time() + self.bound(timeout)
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch(), name="stream-write-watchdog")

    def written(self, stream: EventStream) -> None:
        self._writes.pop(stream, None)

    def bound(self, timeout: float) -> float:
        """``timeout``, or less once ``hurry`` was called."""
        return timeout if self._hurry is None else min(timeout, self._hurry)

    async def _watch(self) -> None:
        """Stop the writes past their deadline; ends when none is in progress."""
        loop = asyncio.get_running_loop()
        try:
            while self._writes:
                await asyncio.sleep(self._tick)
                now = loop.time()
                for stream in [s for s, when in self._writes.items() if when <= now]:
                    del self._writes[stream]
                    stream.stalled()
        finally:
            self._watchdog = None


class EventStream(Response):
    """A response that writes an async iterator of SSE bytes as they come."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str],
        send_timeout: float,
        on_close: Callable[[], None] = lambda: None,
        registry: OpenStreams | None = None,
    ) -> None:
        # Response.__init__ would render a body; a stream has none up front.
        self.status_code = 200
        self.background = None
        self._body = body
        self._send_timeout = send_timeout
        self._on_close = on_close  # runs once, however the stream ends (HEAD included)
        self._registry = registry or OpenStreams()
        self._task: asyncio.Task[Any] | None = None  # the request's, which writes
        self._stalled = False
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if scope.get("method", "GET").upper() == "HEAD":
            # Headers only: a HEAD must not open a stream that never ends.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await self._close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        departure = _Departure(scope, receive, task)
        try:
            sent = True
            async for chunk in self._body:
                if not (sent := await self._write(send, chunk, more_body=True)):
                    break
            # The end of a stream is flushed like any write, and as bounded.
            if sent and await self._write(send, b"", more_body=False):
                return
            departure.streaming = False  # the disconnect that follows is ours
            log.warning(
                "closing a stream whose client stopped reading",
                extra={"send_timeout_s": self._send_timeout},
            )
            await _abort(scope, departure, self._registry.bound(self._send_timeout))
        except asyncio.CancelledError:
            if departure.left:
                task.uncancel()  # the client left: a normal end of the stream
            else:
                # Cancelled by the server: its shutdown grace ran out before
                # this stream ended. Drop the connection (the client resumes
                # by Last-Event-ID) and end like any stream, rather than as
                # an "Exception in ASGI application" with a traceback.
                departure.streaming = False
                log.warning("dropping a stream still open when the shutdown grace ran out")
                task.uncancel()
                await _abort(scope, departure, 0.5)
        finally:
            departure.close()
            await self._close()

    async def _write(self, send: Send, body: bytes, *, more_body: bool) -> bool:
        """False if the write stalled for the send timeout: the client stopped reading."""
        registry = self._registry
        registry.writing(self, self._send_timeout)
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more_body})
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            # The watchdog's cancellation, not the server's: the client
            # stopped reading. (A departure at the same moment cancelled
            # too, and stays pending for the caller.)
            self._stalled = False
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            return False
        finally:
            registry.written(self)
        return True

    def stalled(self) -> None:
        """Called by the watchdog: the write in progress is past its deadline."""
        if self._task is not None and not self._task.done():
            self._stalled = True
            self._task.cancel()

    async def _close(self) -> None:
        try:
            aclose = getattr(self._body, "aclose", None)  # an async generator's clean-up
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        finally:
            self._on_close()


async def _abort(scope: Scope, departure: _Departure, within: float) -> None:
    """Drop the connection of an unfinished response, unsent bytes and all.

    Then wait (boundedly) until the server has seen the connection go: from
    then on, returning with the response unfinished is an ordinary
    departure, not an application error it would log. A server without the
    extension drops the connection when the response returns unfinished, as
    ASGI servers do.
    """
    hook = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if hook is None:
        return
    hook["abort"]()
    await departure.gone(within)


class _Departure:
    """How a stream learns that its client left.

    From the server's own connection when it offers ``on_lost`` in the
    ``relay.abort`` extension: one callback, nothing running per stream. Else
    from a task that waits for ``http.disconnect`` (a task and three frames
    for each of ten thousand idle streams, about a kilobyte).
    """

    __slots__ = ("_gone", "_hook", "_task", "_watch", "left", "streaming")

    def __init__(self, scope: Scope, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._task = task
        self.left = False  # the connection is gone
        self.streaming = True  # a departure now is the client's: end the stream
        self._gone: asyncio.Future[None] | None = None
        hook = scope.get("extensions", {}).get(ABORT_EXTENSION)
        self._hook: dict[str, Any] | None = hook if hook and "on_lost" in hook else None
        self._watch: asyncio.Future[None] | None = None
        if self._hook is not None:
            self._hook["on_lost"](self._lost)
        else:
            self._watch = asyncio.ensure_future(_disconnected(receive))
            self._watch.add_done_callback(lambda _watch: self._lost())

    def _lost(self) -> None:
        self.left = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if self.streaming:
            self._task.cancel()

    async def gone(self, within: float) -> None:
        """Until the connection is gone, or ``within`` seconds."""
        if self.left:
            return
        self._gone = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._gone}, timeout=within)

    def close(self) -> None:
        self.streaming = False
        if self._hook is not None:
            self._hook["on_lost"](None)
        if self._watch is not None:
            self._watch.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (a receive error counts as gone)."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass

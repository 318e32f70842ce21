"""One hub per process: follows the event log and fans frames out to subscribers.

The hub keeps the last position it has fanned out. Work arrives as "the log
now reaches position p", from three sources: pages this process's recorder
just read (events in hand), ``NOTIFY relay_windows`` from the recording
replica, and a periodic sweep of the log's head (covers a dead listener or a
lost notification). One worker applies them in order; whatever it does not
hold in hand it reads from the log, so every subscriber sees the events in
log order with no gap, whichever replica recorded them. Each event is
encoded into one SSE frame, once, and the same bytes go to every subscriber
of its channels.

In the leading recorder's process the hub starts where the check stands
(its pages then continue the hub's position in hand, even on a backlog).
Every hub remembers the events it delivered last (``Recent``), so a stream
resuming among them replays from memory. A stream opened without a cursor
still starts at the head.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import psycopg

from relay import log as event_log
from relay.db import sleep_or_stop
from relay.gateway import frames
from relay.gateway.recent import Recent, Remembered
from relay.log import LogEvent, Page, Position, notify
from relay.metrics import M
from relay.sessions import LOST, Listener, hold_session

__all__ = ["FanIn", "Framed", "Hub", "Subscriber", "frame"]

_READ_LIMIT = 5000
# Events one subscriber is offered between two turns of the streams: a page
# (up to RELAY_BATCH_SIZE events) can be more than a subscriber's buffer
# holds, and a healthy stream must get to write before its buffer overflows.
# A slice ends when one channel has had this many (shared among the channels
# of the widest multi-channel stream), so a page spread over a hundred
# restaurants goes out in one slice: each stream writes its share at once.
_SLICE = 256
_LISTEN_CHECK = 0.25  # seconds between looks at whether a LISTEN is needed
_IO_TIMEOUT = 15.0  # seconds any one log read may take before the connection is presumed dead

log = logging.getLogger("relay.hub")


class Framed(Protocol):
    """What a frame is made of: a ``LogEvent``, or one recalled from memory."""

    @property
    def at(self) -> Position: ...
    @property
    def sse_event(self) -> str: ...
    @property
    def data(self) -> str: ...


def frame(event: Framed) -> bytes:
    """The SSE frame of one event, shared by every stream on its channels that
    needs no fingerprint in its cursors: the event's position as the id."""
    return frames.event(event.at.encode(), event.sse_event, event.data)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Subscriber:
    """A stream's bounded buffer; overflow closes the stream (the client resumes).

    Kept small (a list and a future made only while waiting, no deque or
    Event): a process holds ten thousand of these.
    """

    __slots__ = ("_waiter", "channel", "closed", "frames", "limit", "subject")

    def __init__(self, channel: str, limit: int, subject: str = "") -> None:
        self.channel = channel
        self.limit = limit
        self.subject = subject
        self.frames: list[tuple[LogEvent, bytes]] = []
        self.closed: str | None = None
        self._waiter: asyncio.Future[bool] | None = None

    def offer(self, item: tuple[LogEvent, bytes]) -> None:
        """One event and its frame; the same tuple goes to every subscriber (a
        tuple per delivery would be a million allocations, and the cyclic
        garbage collector's passes over them, per thousand-subscriber burst)."""
        if self.closed:
            return
        if len(self.frames) >= self.limit:
            self.close("slow")
            M.slow_disconnects.inc()
            return
        self.frames.append(item)
        self._wake()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self.frames = []
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """Until there are frames or the stream is closed; False if ``timeout`` passed first.

        A plain timer on one future (no ``wait_for``, no exception on timeout):
        ten thousand idle streams each time out once per heartbeat.
        """
        if self.frames or self.closed:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> list[tuple[LogEvent, bytes]]:
        taken, self.frames = self.frames, []
        return taken

    def routes(self) -> tuple[str, ...]:
        """The channels this subscriber is registered under."""
        return (self.channel,)


class FanIn(Subscriber):
    """One buffer for several channels (a stream over several restaurants).

    One buffer, not one per channel: the overflow limit and the memory bound
    hold for the stream as a whole. A subclass, so the single-channel
    subscriber, of which a process holds ten thousand, carries no extra slot.
    """

    __slots__ = ("_routes",)

    def __init__(self, routes: tuple[str, ...], limit: int, subject: str) -> None:
        super().__init__(routes[0], limit, subject)
        self._routes = routes

    def routes(self) -> tuple[str, ...]:
        return self._routes


class Hub:
    """Fan-out of the event log to this process's subscribers."""

    def __init__(
        self,
        database_url: str,
        *,
        sweep_every: float = 1.0,
        local_recorder: Callable[[], int | None] = lambda: None,
        local_check: Callable[[], Position | None] = lambda: None,
        local_pending: Callable[[], bool] = lambda: False,
        recent: int = 0,
        backplane_live: Callable[[], bool] | None = None,
    ) -> None:
        """``local_check`` is where this process's recorder has checked the
        log to while it leads (its pages come in hand), else None;
        ``local_pending`` whether that recorder has yet to try the lease;
        ``recent`` is how many delivered events are kept for replays;
        ``backplane_live`` whether a live backplane brings the log (then
        neither LISTEN nor the sweep reads it while the backplane keeps up)."""
        self._url = database_url
        # The backend pid of this process's recorder: its windows arrive in
        # hand (``handed``), so its NOTIFYs need no read of the log.
        self._local_recorder = local_recorder
        self._local_check = local_check
        self._local_pending = local_pending
        self._check_seen: Position | None = None
        self._backplane_live = backplane_live
        self._head_seen: Position | None = None  # at the last sweep, with a backplane
        self._swept_to = Position.end_of(-1)  # ``delivered`` at the last sweep
        self._recent = Recent(recent)
        self._joined = Position.end_of(-1)  # the head when the hub started
        self._sweep_every = sweep_every
        self._channels: dict[str, set[Subscriber]] = {}
        self._widths: Counter[int] = Counter()  # multi-channel subscribers by channel count
        self.delivered = Position.end_of(-1)
        # (read after, reaches, events in hand): "the log reaches here".
        self._work: asyncio.Queue[tuple[Position, Position, tuple[LogEvent, ...]]] = asyncio.Queue()
        self._listener: Listener | None = None
        self._applying = False  # the hub's task is applying work (it may be awaiting a read)
        self.ready = asyncio.Event()
        self.subscriber_count = 0

    # -- subscribers ---------------------------------------------------------

    def subscribe(self, channel: str, limit: int, subject: str = "") -> Subscriber:
        return self._register(Subscriber(channel, limit, subject))

    def subscribe_many(self, channels: Iterable[str], limit: int, subject: str = "") -> Subscriber:
        """One subscriber, one buffer, for several channels.

        Each event reaches it once: an event is on one restaurant's channel.
        """
        given = tuple(channels)
        unique = tuple(dict.fromkeys(given))
        if unique == given:
            unique = given  # the caller's tuple (a shared plan's), not a copy per stream
        if not unique:
            raise ValueError("subscribe_many needs at least one channel")
        return self._register(FanIn(unique, limit, subject))

    def _register(self, sub: Subscriber) -> Subscriber:
        routes = sub.routes()
        for channel in routes:
            self._channels.setdefault(channel, set()).add(sub)
        if len(routes) > 1:
            self._widths[len(routes)] += 1
        self.subscriber_count += 1
        M.subscribers.inc()
        return sub

    def live_position(self) -> Position | None:
        """Where a stream subscribed just now starts live, without reading the log.

        Every event above ``delivered`` will still be offered to a subscriber
        registered before this call (the hub fans out in log order), so a
        stream that starts here (fresh, or resuming from exactly here) has no
        gap and needs no replay. None until the hub has loaded the head.
        """
        if not self.ready.is_set():
            return None
        # The hub may start below the head (at the check): a fresh stream
        # still starts at the head, and skips what the hub delivers below it.
        return max(self.delivered, self._joined)

    def recent(self, channels: Sequence[str], after: Position) -> Remembered | None:
        """The events on ``channels`` after ``after`` up to ``delivered``,
        from memory, and ``delivered``; None if memory does not reach back
        to ``after``.

        A stream subscribed before this call gets every event after
        ``delivered`` live, so replaying this list and then going live
        leaves no gap.
        """
        if not self.ready.is_set():
            return None
        events = self._recent.since(channels, after)
        return None if events is None else Remembered(events, self.delivered)

    def unsubscribe(self, sub: Subscriber) -> None:
        removed = False
        for channel in sub.routes():
            subs = self._channels.get(channel)
            if subs is not None and sub in subs:
                subs.discard(sub)
                if not subs:
                    del self._channels[channel]
                removed = True
        if removed:
            self.subscriber_count -= 1
            if (width := len(sub.routes())) > 1:
                self._widths[width] -= 1
                if not self._widths[width]:
                    del self._widths[width]
            M.subscribers.dec()

    def close_all(self, reason: str) -> None:
        for subs in list(self._channels.values()):
            for sub in list(subs):
                sub.close(reason)

    @property
    def listener_connected(self) -> bool:
        return self._listener is not None and self._listener.connected

    # -- inputs --------------------------------------------------------------

    def handed(self, page: Page) -> None:
        """A page this process's recorder read: fan it out without reading it again.

        A small page that follows on from what was delivered, with the hub's
        task idle and nothing queued before it, is fanned out at once: a live
        window reaches its streams without two more turns of the event loop
        (the queue, then the hub's task).
        """
        events = tuple(page.events)
        if (
            not self._applying
            and self._work.empty()
            and self.ready.is_set()
            and len(events) <= _SLICE
            and page.after <= self.delivered
        ):
            if page.reached > self.delivered:
                self._fan([e for e in events if e.at > self.delivered])
                self._moved(page.reached)
            return
        self._work.put_nowait((page.after, page.reached, events))

    def offered(self, after: Position, reached: Position, events: tuple[LogEvent, ...]) -> None:
        """The log from ``after`` to ``reached`` and its events, from the backplane:
        applied if it begins where the hub stands, else after reading the gap."""
        self._work.put_nowait((after, reached, events))

    @property
    def following(self) -> bool:
        """Whether any stream here is subscribed to anything."""
        return bool(self._channels)

    @property
    def backplane_live(self) -> bool:
        return self._backplane_live is not None and self._backplane_live()

    def _notified(self, _channel: str, payload: str, sender: int) -> None:
        if sender == self._local_recorder():
            return  # its pages are handed over in memory; a later gap check backs that up
        try:
            window = notify.decode(payload)
        except ValueError:
            log.warning("ignoring malformed notification %r", payload[:80])
            return
        reached = Position.end_of(window)
        if reached > self.delivered:
            self._work.put_nowait((reached, reached, ()))

    # -- running -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._listen_while_needed(stop), name="hub-listener"),
            asyncio.create_task(self._follow(stop), name="hub-follow"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close_all("shutdown")

    async def _listen(self, stop: asyncio.Event) -> None:
        self._listener = Listener(self._url, [notify.CHANNEL], self._notified)
        await self._listener.run(stop)

    @property
    def listening_needed(self) -> bool:
        """Whether windows can be recorded without this hub hearing of them
        otherwise: not while this process's recorder leads (its pages come in
        hand, and only the leader records) nor while a backplane is live.
        Not before this process's recorder has tried the lease either: a
        leader's LISTEN session was opened at start only to be closed again."""
        return not self.backplane_live and not self._local_pending() and self._local_check() is None

    async def _listen_while_needed(self, stop: asyncio.Event) -> None:
        """LISTEN only while needed: the leader's own process and fifty
        gateways on a live backplane hold no session that the database wakes
        for every window. A change of leader or a backplane going down is
        seen within a quarter of a second, and the sweep reads what passed."""
        while not stop.is_set():
            if not self.listening_needed:
                await sleep_or_stop(stop, _LISTEN_CHECK)
                continue
            listening = asyncio.create_task(self._listen(stop))
            while not stop.is_set() and self.listening_needed:
                await sleep_or_stop(stop, _LISTEN_CHECK)
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            self._listener = None

    async def _follow(self, stop: asyncio.Event) -> None:
        """Apply work items in order, reading from the log what is not in hand."""

        async def follow(conn: psycopg.AsyncConnection[Any]) -> None:
            if not self.ready.is_set():
                await self._start(conn)
                self.ready.set()
            else:
                await self._sweep(conn)  # catch up on whatever passed while down
            await self._apply_forever(conn, stop)

        await hold_session(
            self._url, stop, follow, label="gateway", logger=log, lost=(psycopg.Error, *LOST)
        )

    async def _start(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Start at the head, or where this process's leading recorder's check
        stands when that is behind the head: its pages then continue the
        hub's position in hand, so a backlog is read once (by the check), not
        again by the hub or by each resuming stream. Another replica's hub
        starts at the head: its streams replay only their own rows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _IO_TIMEOUT
        while self._local_pending() and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the lease is tried at the recorder's first turn
        head = await event_log.head(conn)
        checked = self._local_check()
        start = head.end if checked is None else max(min(checked, head.end), head.oldest)
        self._joined = head.end
        self.delivered = start
        self._recent.reset(start)

    async def _apply_forever(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_every
        pending: tuple[Position, Position, tuple[LogEvent, ...]] | None = None
        while not stop.is_set():
            timeout = max(0.0, next_sweep - loop.time())
            try:
                pending = await asyncio.wait_for(self._work.get(), timeout)
            except TimeoutError:
                # Bounded: a half-open connection (packets silently dropped)
                # raises TimeoutError here, and _follow reconnects.
                self._applying = True
                try:
                    await asyncio.wait_for(self._sweep(conn), _IO_TIMEOUT)
                finally:
                    self._applying = False
                next_sweep = loop.time() + self._sweep_every
                continue
            # Everything queued is applied before any stream runs again: a
            # burst of pages reaches a stream as one wake-up and one write.
            self._applying = True
            try:
                while pending is not None:
                    after, reached, events = pending
                    try:
                        if not await self._in_hand(after, reached, events):
                            await asyncio.wait_for(self._advance(conn, reached), _IO_TIMEOUT)
                    except BaseException:
                        self._work.put_nowait(pending)  # not lost: retried after reconnecting
                        raise
                    try:
                        pending = self._work.get_nowait()
                    except asyncio.QueueEmpty:
                        pending = None
            finally:
                self._applying = False

    async def _in_hand(
        self, after: Position, reached: Position, events: tuple[LogEvent, ...]
    ) -> bool:
        """Apply a work item that needs no read (nothing new, or a page that
        follows on from what was delivered); False if the log must be read first."""
        delivered = self.delivered
        if reached <= delivered:
            return True
        if after <= delivered:
            if events and events[0].at <= delivered:
                events = tuple(e for e in events if e.at > delivered)
            await self._offer(events)
            self._moved(reached)
            return True
        return False

    async def _sweep(self, conn: psycopg.AsyncConnection[Any]) -> None:
        checked = self._local_check()
        progressing = checked is not None and checked != self._check_seen
        self._check_seen = checked
        if progressing:
            return  # this process's recorder is handing the log over: no read
        reached = (await event_log.head(conn)).end
        if self.backplane_live:
            # The backplane brings the log; a gap between two of its messages
            # is read when the second arrives. Read here only a head seen a
            # sweep ago that is still not delivered while nothing came since
            # (its publisher died, or its last message was lost), and only up
            # to that head: a publisher that is merely behind, or what the
            # backplane brings next, is left to it.
            behind, self._head_seen = self._head_seen, reached
            moved, self._swept_to = self.delivered > self._swept_to, self.delivered
            if behind is None or behind <= self.delivered or moved:
                return
            reached = behind
        else:
            self._head_seen = None
        if reached > self.delivered:
            await self._advance(conn, reached)

    async def _advance(self, conn: psycopg.AsyncConnection[Any], reached: Position) -> None:
        """Read the log from ``delivered`` until ``reached`` (a gap: another
        replica recorded, or nothing was in hand)."""
        if not self._channels:
            # Nobody here follows anything: nothing to read. A stream that
            # subscribes later replays from the log or starts live above
            # ``delivered`` (no await between this check and the jump, so no
            # subscriber can register in between).
            if reached > self.delivered:
                self._recent.reset(reached)
                self.delivered = reached
            return
        while self.delivered < reached:
            page = await event_log.read(conn, self.delivered, reached.window, limit=_READ_LIMIT)
            M.hub_read_back.inc(len(page.events))
            await self._offer(page.events)
            self._moved(page.reached)

    async def _offer(self, events: Sequence[LogEvent]) -> None:
        """Fan ``events`` out in slices, letting the streams write between them.

        ``delivered`` follows each slice, so a stream subscribing between two
        slices starts exactly after the last event offered.
        """
        share = max(1, _SLICE // max(self._widths, default=1))
        start = 0
        while start < len(events):
            if start:
                await asyncio.sleep(0)
            start += self._fan(events[start:], share)

    def _fan(self, events: Sequence[LogEvent], share: int = _SLICE) -> int:
        """Deliver a slice from the start of ``events`` (in log order, all above
        ``delivered``) and remember it: up to the event that gives one channel
        its ``share``. Returns how many events the slice holds."""
        if not events:
            return 0
        count = self._deliver(events, share)
        sliced = events if count == len(events) else events[:count]
        self._recent.add(sliced)
        self.delivered = sliced[-1].at
        return count

    def _moved(self, reached: Position) -> None:
        """Everything up to ``reached`` is delivered (what was in between is)."""
        if reached > self.delivered:
            self.delivered = reached
            self._recent.reach(reached)
        if self._recent.end != self.delivered:  # the start, or a gap
            self._recent.reset(self.delivered)

    def _deliver(self, events: Sequence[LogEvent], share: int = _SLICE) -> int:
        channels = self._channels
        offered: dict[str, int] = {}  # events per channel in this slice
        count = taken = 0
        for event in events:
            taken += 1
            item: tuple[LogEvent, bytes] | None = None
            full = False
            for channel in event.channels:
                subs = channels.get(channel)
                if subs:
                    if item is None:
                        item = (event, frame(event))
                    for sub in subs:
                        sub.offer(item)
                    count += len(subs)
                    seen = offered[channel] = offered.get(channel, 0) + 1
                    full = full or seen >= share
            if full:
                break
        if count:
            M.deliveries.inc(count)
        return taken

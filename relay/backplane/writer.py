"""The publishing side: the leading recorder's checked pages, each once, in order.

Runs in every dispatcher process; only the one whose recorder leads is handed
pages, so one process publishes at a time, and a takeover continues from the
check's durable offset. Publishing never holds the recorder back: pages wait
in a bounded queue, and when NATS is away they are dropped, since the
gateways read any stretch the backplane did not bring from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from relay.backplane.codec import BackplaneConfig, encode
from relay.backplane.connection import hold_nats
from relay.log import Page
from relay.metrics import M
from relay.publishers.nats import unless_lost

__all__ = ["Writer"]

log = logging.getLogger("relay.backplane")

# Events waiting for NATS at most (pages hold up to RELAY_BATCH_SIZE each):
# beyond it the oldest pages are dropped, and gateways read them.
_QUEUE_EVENTS = 50_000
_HEADROOM = 1024  # bytes of a message left for its headers
_MARKER_EVERY = 0.05  # seconds between messages that carry no event, only progress


class Writer:
    def __init__(self, config: BackplaneConfig, *, queue_events: int = _QUEUE_EVENTS) -> None:
        self.config = config
        self._pages: deque[Page] = deque()
        self._queued_events = 0
        self._limit = queue_events
        self._wake = asyncio.Event()
        self.state = "connecting"
        self.published = 0  # events

    @property
    def queued(self) -> int:
        """Pages waiting to be published."""
        return len(self._pages)

    def handed(self, page: Page) -> None:
        """A page the leading recorder checked (called in its turn: never blocks).

        Nothing is kept while NATS is away: the gateways read those stretches."""
        if self.state != "publishing":
            return
        self._pages.append(page)
        self._queued_events += len(page.events)
        while self._queued_events > self._limit and len(self._pages) > 1:
            self._queued_events -= len(self._pages.popleft().events)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        await hold_nats(self.config, stop, self._publish_forever, label="publisher",
                        on_lost=self._lost)  # fmt: skip

    def _lost(self, reason: str) -> None:
        dropped = self._queued_events
        self._clear()
        self.state = f"unavailable: {reason}"
        if dropped:
            log.info("backplane: %d events not published; gateways read them from the log",
                     dropped)  # fmt: skip

    async def _publish_forever(self, nc: Any, js: Any, lost: asyncio.Event) -> None:
        self.state = "publishing"
        max_bytes = max(4096, nc.max_payload - _HEADROOM)
        loop = asyncio.get_running_loop()
        last = 0.0
        while not lost.is_set():
            if not self._pages:
                self._wake.clear()
                waiting = asyncio.ensure_future(self._wake.wait())
                gone = asyncio.ensure_future(lost.wait())
                try:
                    await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
                    gone.cancel()
                continue
            page = self._merged()
            if not page.events and loop.time() - last < _MARKER_EVERY:
                # Progress alone can wait a moment (idle windows would
                # otherwise be a message each): put it back and collect more.
                self._pages.appendleft(page)  # no events: the count stands
                await asyncio.sleep(_MARKER_EVERY - (loop.time() - last))
                continue
            for chunk in encode(page, max_bytes):
                sending = js.publish(self.config.subject, chunk.body, headers=chunk.headers,
                                     stream=self.config.stream)  # fmt: skip
                await unless_lost(sending, lost)
            last = loop.time()
            self.published += len(page.events)
            M.backplane_published.inc(len(page.events))

    def _clear(self) -> None:
        self._pages.clear()
        self._queued_events = 0

    def _merged(self) -> Page:
        """Every queued page that follows on from the first, as one page."""
        first = self._pages.popleft()
        self._queued_events -= len(first.events)
        if not self._pages or self._pages[0].after != first.reached:
            return first
        events = list(first.events)
        reached = first.reached
        while self._pages and self._pages[0].after == reached:
            page = self._pages.popleft()
            self._queued_events -= len(page.events)
            events.extend(page.events)
            reached = page.reached
        return Page(first.after, events, [], reached, len(events))

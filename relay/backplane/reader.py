"""The gateway's live tail from JetStream, and whether it is whole.

Each message is handed to the hub as "the log from here to there, these
events"; the hub applies it only if it begins where the hub stands, and
otherwise reads the missing stretch from PostgreSQL first. After a lost
connection the tail resumes at the stream sequence after the last message
seen, so a short outage costs no read at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from relay.backplane.codec import AFTER, REACHED, BackplaneConfig, decode, parse_position
from relay.backplane.connection import hold_nats
from relay.log import LogEvent, Position
from relay.metrics import M

__all__ = ["Reader"]

log = logging.getLogger("relay.backplane")

Offer = Callable[[Position, Position, tuple[LogEvent, ...]], None]


class Reader:
    def __init__(
        self,
        config: BackplaneConfig,
        offer: Offer,
        delivered: Callable[[], Position],
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """``offer`` hands a stretch of the log to the hub; ``delivered`` is
        where the hub stands (a message wholly below it is not even decoded);
        ``wanted`` whether anyone here follows the log (if not, only how far
        it reaches is handed over)."""
        self.config = config
        self._offer = offer
        self._delivered = delivered
        self._wanted = wanted
        self._next_sequence: int | None = None
        self.live = False
        self.state = "connecting"

    async def run(self, stop: asyncio.Event) -> None:
        await hold_nats(self.config, stop, self._follow, label="gateway", on_lost=self._lost)

    def _lost(self, reason: str) -> None:
        self.live = False
        self.state = f"unavailable: {reason}"

    async def _follow(self, nc: Any, js: Any, lost: asyncio.Event) -> None:
        start = await self._start_sequence(js)
        config = (
            ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
            if start is None
            else ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        )
        sub = await js.subscribe(
            self.config.subject,
            stream=self.config.stream,
            cb=self._received,
            ordered_consumer=True,
            idle_heartbeat=2.0,
            config=config,
        )
        self.live = True
        self.state = "live"
        try:
            await lost.wait()
        finally:
            self.live = False
            if not lost.is_set():
                await sub.unsubscribe()

    async def _start_sequence(self, js: Any) -> int | None:
        """Where to resume: after the last message seen, if the stream still
        holds it (NATS may have lost its store, or aged it out)."""
        if self._next_sequence is None:
            return None
        state = (await js.stream_info(self.config.stream)).state
        if state.first_seq <= self._next_sequence <= state.last_seq + 1:
            return self._next_sequence
        return None  # the hub reads the stretch it missed from the log

    async def _received(self, msg: Any) -> None:
        self._next_sequence = msg.metadata.sequence.stream + 1
        headers = msg.headers or {}
        try:
            after, reached = headers[AFTER], headers[REACHED]
            end = parse_position(reached)
            if end <= self._delivered():
                return  # already delivered (in hand, or read from the log)
            if not self._wanted():
                # No stream open here: the hub jumps ahead without reading.
                self._offer(end, end, ())
                return
            start, end, events = decode(after, reached, msg.data)
        except (KeyError, ValueError) as exc:
            # Skipped: the next message begins beyond the hub, which reads the gap.
            log.warning("ignoring a malformed backplane message: %s", exc)
            return
        M.backplane_received.inc(len(events))
        self._offer(start, end, events)

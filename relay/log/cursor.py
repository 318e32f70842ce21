"""The log's vocabulary for readers: positions, cursors (the SSE ids) and streams.

An event's position is ``(window, xid, id)``: the snapshot window its
transaction committed in, then the transaction and the insert order within
it. Positions of committed events only ever grow in that order (a late
commit lands in a later window), so "everything after position p" is a
complete answer at any moment, for every stream alike.

A cursor is ``w{window}.{xid}.{id}`` after an event, or ``w{window}`` after
a whole window; streams over a chosen set (several restaurants, a customer's
orders) append their fingerprint, ``~1a2b3c4d``, so one stream's cursor is
reset, not half-honoured, by another. Cursors of the earlier per-partition
log (``3-17``, ``v.3-17``) no longer parse: their streams get ``reset``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple
from uuid import UUID

from relay.errors import InvalidCursor
from relay.events import order_channel

__all__ = [
    "END",
    "ORIGIN",
    "Position",
    "Selector",
    "Stream",
    "customer_scope",
    "restaurant_set_scope",
]

END = 2**63 - 1  # xid and id of "the whole window"
_CURSOR = re.compile(r"^w([0-9]{1,18})(?:\.([0-9]{1,19})\.([0-9]{1,19}))?(?:~([0-9a-f]{8}))?$")


class Position(NamedTuple):
    """Where an event sits in the log; tuples compare in log order."""

    window: int
    xid: int
    id: int

    @classmethod
    def end_of(cls, window: int) -> Position:
        """After every event of ``window``."""
        return cls(window, END, END)

    @property
    def whole(self) -> bool:
        """Whether this position is the end of its window."""
        return self.xid == END

    def encode(self, scope: str = "") -> str:
        text = f"w{self.window}" if self.whole else f"w{self.window}.{self.xid}.{self.id}"
        return f"{text}~{scope}" if scope else text

    @classmethod
    def parse(cls, text: str, scope: str = "") -> Position:
        """The position a cursor resumes after; InvalidCursor if malformed or of another stream."""
        match = _CURSOR.match(text.strip())
        if not match:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        if (match.group(4) or "") != scope:
            raise InvalidCursor("cursor belongs to another stream")
        window = int(match.group(1))
        if match.group(2) is None:
            return cls.end_of(window)
        xid, row = int(match.group(2)), int(match.group(3))
        if xid >= END or row >= END:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        return cls(window, xid, row)


ORIGIN = Position.end_of(-1)  # before window 0: before everything


def restaurant_set_scope(restaurants: Iterable[UUID]) -> str:
    """A fingerprint of a set of restaurants, for the cursors of its stream.

    A cursor of {A, B} offered to the stream of {A, B, C} would silently skip
    C's events up to it; with the set in the cursor it is reset.
    """
    joined = ",".join(sorted(str(r) for r in restaurants))
    return hashlib.sha256(joined.encode()).hexdigest()[:8]


def customer_scope(customer: UUID) -> str:
    """The fingerprint in the cursors of one customer's orders stream."""
    return hashlib.sha256(f"customer:{customer}".encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Selector:
    """Which outbox rows a read considers, by the producer's columns (an index
    serves each): all, some restaurants, one order, or one customer's orders."""

    restaurants: tuple[UUID, ...] = ()
    order: tuple[UUID, UUID] | None = None  # (restaurant, order)
    customer: UUID | None = None


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscribable channel and the rows its replay reads."""

    # "restaurant:<id>", "order:<restaurant>:<order>", "finance:<id>", "coupon:<id>", "admin"
    channel: str
    selector: Selector

    @classmethod
    def restaurant(cls, restaurant_id: UUID) -> Stream:
        return cls(f"restaurant:{restaurant_id}", Selector(restaurants=(restaurant_id,)))

    @classmethod
    def order(cls, order_id: UUID, restaurant_id: UUID) -> Stream:
        """The stream of an order owned by ``restaurant_id`` (see ``order_channel``)."""
        return cls(
            order_channel(restaurant_id, order_id), Selector(order=(restaurant_id, order_id))
        )

    @classmethod
    def finance(cls, restaurant_id: UUID) -> Stream:
        return cls(f"finance:{restaurant_id}", Selector(restaurants=(restaurant_id,)))

    @classmethod
    def global_(cls, channel: str) -> Stream:
        """``admin`` or ``coupon:<uuid>``: events of every restaurant."""
        return cls(channel, Selector())

    @property
    def kind(self) -> str:
        return self.channel.split(":", 1)[0]

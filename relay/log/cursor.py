"""The log's vocabulary for readers: streams, cursors and SSE ids.

A cursor is ``"{partition}-{position}"``: opaque to clients, exact for us. All
events of one stream (a restaurant, an order) live in one partition, whose
positions are committed in increasing order, so "everything after position p"
is a complete answer at any moment. Streams that span partitions carry a
vector cursor, ``v.3-17.12-5``, optionally fingerprinted with what they cover.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from relay.errors import InvalidCursor
from relay.events import order_channel
from relay.log.partitions import PARTITIONS, partition_of

__all__ = [
    "GLOBAL",
    "NIL",
    "Cursor",
    "Stream",
    "customer_scope",
    "encode_vector",
    "parse_vector",
    "restaurant_set_scope",
]

NIL = UUID(int=0)
GLOBAL = -1  # Stream.partition of streams that span every partition
_CURSOR = re.compile(r"^(\d{1,2})-(\d{1,19})$")
# "v", then the scope's fingerprint for a stream over a chosen set of
# restaurants, then "{partition}-{position}" entries.
_VECTOR = re.compile(r"^v(~[0-9a-f]{8})?((?:\.\d{1,2}-\d{1,19})*)$")


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    partition: int
    position: int

    def encode(self) -> str:
        return f"{self.partition}-{self.position}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _CURSOR.match(text.strip())
        if not match or int(match.group(1)) >= PARTITIONS:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        return cls(int(match.group(1)), int(match.group(2)))


def encode_vector(positions: dict[int, int], scope: str = "") -> str:
    """A cursor for streams spanning partitions: ``v.3-17.12-5`` (zero entries omitted).

    ``scope`` (see ``restaurant_set_scope``) names the set of restaurants a
    multi-restaurant stream covers: ``v~1a2b3c4d.3-17``. A cursor then only
    resumes the stream of that same set.
    """
    prefix = f"v~{scope}" if scope else "v"
    return prefix + "".join(f".{p}-{pos}" for p, pos in sorted(positions.items()) if pos)


def parse_vector(text: str, scope: str = "") -> dict[int, int]:
    """The positions of a vector cursor; InvalidCursor if malformed or of another scope."""
    match = _VECTOR.match(text.strip())
    if not match:
        raise InvalidCursor(f"malformed cursor {text[:40]!r}")
    if (match.group(1) or "~")[1:] != scope:
        raise InvalidCursor("cursor belongs to another stream")
    vector: dict[int, int] = {}
    for part in match.group(2).split(".")[1:]:
        p, pos = part.split("-")
        if int(p) >= PARTITIONS:
            raise InvalidCursor(f"malformed cursor {text[:40]!r}")
        vector[int(p)] = int(pos)
    return vector


def restaurant_set_scope(restaurants: Iterable[UUID]) -> str:
    """A fingerprint of a set of restaurants, for the cursors of its stream.

    Partitions alone cannot tell two sets apart (restaurants share them): a
    cursor of {A, B} offered to the stream of {A, B, C} would silently skip
    C's events up to B's position. With the set in the cursor it is reset.
    """
    joined = ",".join(sorted(str(r) for r in restaurants))
    return hashlib.sha256(joined.encode()).hexdigest()[:8]


def customer_scope(customer: UUID) -> str:
    """The fingerprint in the cursors of one customer's orders stream: another
    stream's vector cursor offered to it is reset, not half-honoured."""
    return hashlib.sha256(f"customer:{customer}".encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Stream:
    """One subscribable channel and where its events live in the log."""

    # "restaurant:<id>", "order:<restaurant>:<order>", "finance:<id>", "coupon:<id>", "admin"
    channel: str
    partition: int  # GLOBAL for streams that span partitions
    key: UUID  # the restaurant or order id the replay query filters on

    @classmethod
    def restaurant(cls, restaurant_id: UUID) -> Stream:
        return cls(f"restaurant:{restaurant_id}", partition_of(restaurant_id), restaurant_id)

    @classmethod
    def order(cls, order_id: UUID, restaurant_id: UUID) -> Stream:
        """The stream of an order owned by ``restaurant_id`` (see ``order_channel``)."""
        return cls(order_channel(restaurant_id, order_id), partition_of(restaurant_id), order_id)

    @classmethod
    def finance(cls, restaurant_id: UUID) -> Stream:
        return cls(f"finance:{restaurant_id}", partition_of(restaurant_id), restaurant_id)

    @classmethod
    def global_(cls, channel: str) -> Stream:
        """``admin`` or ``coupon:<uuid>``: events from every partition."""
        return cls(channel, GLOBAL, NIL)

    @property
    def kind(self) -> str:
        return self.channel.split(":", 1)[0]

    def start(self, cursor: Cursor) -> int:
        """The position to resume after; InvalidCursor if it belongs elsewhere."""
        if cursor.partition != self.partition:
            raise InvalidCursor("cursor belongs to another stream")
        return cursor.position

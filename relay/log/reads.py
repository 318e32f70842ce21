"""Every read of the log: the head, pages of windows, order ownership, offsets.

The log is ``relay_outbox`` itself, read by snapshot window (``relay_windows``):
no reader depends on a write per event. ``read`` is the one way to read
events: after a position, through a window, optionally narrowed to some
restaurants, one order or one customer; it validates and renders each row
(``render_row``) so every reader sees the same events.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import psycopg

from relay.errors import LogPruned
from relay.log.cursor import END, Position, Selector
from relay.log.records import LogEvent, Page, Rejected
from relay.log.rows import COLUMNS, render_row
from relay.sql import query

__all__ = [
    "CHECK",
    "Head",
    "Turn",
    "advance_offset",
    "head",
    "order_owner",
    "read",
    "read_offset",
    "record_window_if_due",
    "remember_window",
    "take_offset",
    "unrecorded_bounds",
]

# The recorder's check of each new window (it files dead letters): a
# follower whose position the gateway's hub also starts from.
CHECK = "relay.check"
_PAGE = 1000
_EVERYTHING = Selector()
_KNOWN_WINDOWS = 256  # window bounds remembered per connection


class _Bounds(NamedTuple):
    """A window's snapshot as the reads take it: text, horizon, in-progress list."""

    snapshot: str
    horizon: str
    xip: str  # as an xid8[] literal

    @classmethod
    def of(cls, snapshot: str) -> _Bounds:
        """From ``pg_snapshot`` text: ``xmin:xmax:xip,…``."""
        _xmin, horizon, xip = snapshot.split(":")
        return cls(snapshot, horizon, "{" + xip + "}")


# Per connection (a connection never changes database): windows are immutable
# once recorded, and a reader asks for the same few again and again.
_bounds_cache: weakref.WeakKeyDictionary[Any, OrderedDict[int, _Bounds]] = (
    weakref.WeakKeyDictionary()
)


def _rows_after(previous: _Bounds, after_xid: int, after_id: int) -> dict[str, Any]:
    """window_rows' lower bounds: the transactions in progress at the earlier
    snapshot are read after (``after_xid``, ``after_id``); the range of
    later transactions starts at the earlier horizon or there, whichever is
    later (one row bound: where the index scan starts)."""
    start = max((int(previous.horizon), -1), (after_xid, after_id))
    return {
        "since_xip": previous.xip,
        "from_xid": str(start[0]),
        "from_id": start[1],
        "after_xid": str(after_xid),
        "after_id": after_id,
    }


def unrecorded_bounds(snapshot: str, cap: int | None = None) -> dict[str, Any]:
    """``backlog_unrecorded``'s parameters from the newest window's snapshot
    (``pg_snapshot`` text): its horizon and in-progress list, as values, and
    how many rows to count at most (None: all)."""
    bounds = _Bounds.of(snapshot)
    return {"horizon": bounds.horizon, "xip": bounds.xip, "cap": cap}


def remember_window(conn: psycopg.AsyncConnection[Any], window: int, snapshot: str) -> None:
    """A window's snapshot as recorded (``pg_snapshot`` text), so the next read
    of it on ``conn`` needs no round trip to look it up."""
    known = _bounds_cache.setdefault(conn, OrderedDict())
    known[window] = _Bounds.of(snapshot)
    while len(known) > _KNOWN_WINDOWS:
        known.popitem(last=False)


async def _bounds(conn: psycopg.AsyncConnection[Any], *windows: int) -> list[_Bounds]:
    """The bounds of ``windows``; LogPruned if one is gone (retention)."""
    known = _bounds_cache.setdefault(conn, OrderedDict())
    missing = [w for w in windows if w not in known]
    if missing:
        cur = await conn.execute(query("window_bounds"), {"ids": missing})
        for window, snapshot in await cur.fetchall():
            remember_window(conn, int(window), snapshot)
    try:
        return [known[w] for w in windows]
    except KeyError as exc:
        raise LogPruned(
            f"window {exc.args[0]} is not in the log (pruned by retention, or never recorded)"
        ) from None


@dataclass(frozen=True, slots=True)
class Head:
    window: int  # the newest window recorded
    pruned_through: int  # windows up to this one lost their rows to retention

    @property
    def end(self) -> Position:
        return Position.end_of(self.window)

    @property
    def oldest(self) -> Position:
        """The oldest position a reader can resume after."""
        return Position.end_of(self.pruned_through)


async def head(conn: psycopg.AsyncConnection[Any]) -> Head:
    cur = await conn.execute(query("log_head"))
    row = await cur.fetchone()
    assert row is not None
    return Head(int(row[0]), int(row[1]))


def _selected(name: str, selector: Selector) -> tuple[bytes, dict[str, Any]]:
    """The named read with its ``{selector}`` filled in, and the filter's parameters."""
    params: dict[str, Any]
    if selector.order is not None:
        where, params = (
            b"o.order_id = %(order_id)s AND o.restaurant_id = %(restaurant_id)s",
            {"restaurant_id": selector.order[0], "order_id": selector.order[1]},
        )
    elif selector.customer is not None:
        where, params = (
            b"o.customer_id = %(customer_id)s AND o.order_id IS NOT NULL",
            {"customer_id": selector.customer},
        )
    elif len(selector.restaurants) == 1:
        where, params = (
            b"o.restaurant_id = %(restaurant_id)s",
            {"restaurant_id": selector.restaurants[0]},
        )
    elif selector.restaurants:
        where, params = (
            b"o.restaurant_id = ANY (%(restaurant_ids)s::uuid[])",
            {"restaurant_ids": list(selector.restaurants)},
        )
    else:
        where, params = b"true", {}
    text = query(name).replace(b"{rows}", query("window_rows"))
    text = text.replace(b"{columns}", COLUMNS).replace(b"{selector}", where)
    return text, params


def _page(after: Position, rows: list[tuple[Any, ...]], reached: Position) -> Page:
    events: list[LogEvent] = []
    rejected: list[Rejected] = []
    dropped = 0
    for row in rows:
        item, fields = render_row(row)
        if type(item) is LogEvent:
            events.append(item)
            dropped += fields
        else:
            rejected.append(item)  # type: ignore[arg-type]
    return Page(after, events, rejected, reached, len(rows), dropped)


async def read(
    conn: psycopg.AsyncConnection[Any],
    after: Position,
    through: int,
    *,
    selector: Selector = _EVERYTHING,
    limit: int = _PAGE,
) -> Page:
    """The next rows after ``after``, in log order, of windows up to ``through``.

    ``reached`` says how far the page is complete: read again from it until
    it is ``Position.end_of(through)``. A page holds at most ``limit`` rows;
    it may hold none and still move ``reached`` on.
    """
    if after >= Position.end_of(through):
        return Page(after, [], [], after, 0)
    window = after.window if not after.whole else after.window + 1
    if window == through:
        return await _read_window(conn, after, window, selector, limit)
    # Several windows: one ordered read of their rows, each assigned its window.
    since = after.window if after.whole else after.window - 1
    previous, last = await _bounds(conn, since, through)
    text, params = _selected("read_span", selector)
    cur = await conn.execute(
        text,
        {
            **params,
            **_rows_after(previous, 0, -1),  # whole windows: the caller drops what it has
            "horizon": last.horizon,
            "snapshot": last.snapshot,
            "limit": limit,
        },
        prepare=False,  # planned with this range's real bounds, every time
        binary=True,
    )
    rows = await cur.fetchall()
    if len(rows) < limit:
        complete = through
    else:
        # The limit cut the transactions at the last row's: only windows
        # entirely below it are complete.
        cur = await conn.execute(query("span_complete_through"), {"xid": str(rows[-1][1])})
        found = await cur.fetchone()
        complete = int(found[0]) if found and found[0] is not None else -1
    if complete <= after.window:
        # One window holds more than a page of the selection: read it alone, in order.
        return await _read_window(conn, after, window, selector, limit)
    kept = sorted(
        (r for r in rows if after < (r[0], r[1], r[2]) and r[0] <= complete),
        key=lambda r: (r[0], r[1], r[2]),
    )
    return _page(after, kept, Position.end_of(complete))


async def _read_window(
    conn: psycopg.AsyncConnection[Any],
    after: Position,
    window: int,
    selector: Selector,
    limit: int,
) -> Page:
    """A page of one window, exactly in (xid, id) order."""
    previous, bounds = await _bounds(conn, window - 1, window)
    text, params = _selected("read_window", selector)
    # From the window's start, or after the position within it.
    start = (after.xid, after.id) if after.window == window else (0, -1)
    cur = await conn.execute(
        text,
        {
            **params,
            **_rows_after(previous, *start),
            "window": window,
            "horizon": bounds.horizon,
            "snapshot": bounds.snapshot,
            "limit": limit,
        },
        # Unfiltered (the check, the publishers, the hub), one window's range
        # of the (xid, id) index is the plan whatever its bounds: prepared,
        # since planning was a third of a live read. Filtered, a generic plan
        # may sort a big window's rows for every page: planned each time.
        prepare=selector == _EVERYTHING,
        binary=True,
    )
    rows = await cur.fetchall()
    if len(rows) < limit:
        reached = Position.end_of(window)
    else:
        last = rows[-1]
        reached = Position(window, int(last[1]), int(last[2]))
    return _page(after, rows, reached)


class Turn(NamedTuple):
    """What one turn of the recorder found: the newest window, the window it
    recorded (if one was due), and that window's first page when it was read
    in the same statement."""

    newest: int
    recorded: int | None
    page: Page | None


_DUE = query("due_window")
_RECORD_IF_DUE = query("record_window_if_due").replace(b"{due_window}", _DUE)
# The new window's bounds are the recorded row's own (``r``), not values.
_RECORD_AND_READ = (
    query("record_window_and_read")
    .replace(b"{due_window}", _DUE)
    .replace(b"{rows}", query("window_rows"))
    .replace(b"{columns}", COLUMNS)
    .replace(b"{selector}", b"true")
    .replace(b"%(horizon)s", b"r.horizon")
    .replace(b"%(snapshot)s", b"r.snapshot")
)


async def record_window_if_due(
    conn: psycopg.AsyncConnection[Any], *, read_after: int | None = None, limit: int = _PAGE
) -> Turn:
    """Record the next window if one would hold anything (the recorder's
    lease holder only). With ``read_after`` (the window the caller has read
    to its end, believed the newest) the new window's first page of at most
    ``limit`` rows comes in the same round trip; if the newest window was
    another, the page is None and the caller reads as usual."""
    if read_after is None:
        cur = await conn.execute(_RECORD_IF_DUE, prepare=True)
        row = await cur.fetchone()
        assert row is not None
        rows = [row]
    else:
        (previous,) = await _bounds(conn, read_after)
        cur = await conn.execute(
            _RECORD_AND_READ,
            {
                **_rows_after(previous, 0, -1),
                "previous": read_after,
                "limit": limit,
            },
            prepare=True,
            binary=True,
        )
        rows = await cur.fetchall()
    newest, window, snapshot = rows[0][:3]
    if window is None:
        return Turn(int(newest), None, None)
    remember_window(conn, int(window), snapshot)
    if read_after is None or newest != read_after:
        return Turn(int(window), int(window), None)
    found = [row[3:] for row in rows if row[3] is not None]
    if len(found) < limit:
        reached = Position.end_of(window)
    else:
        reached = Position(window, int(found[-1][1]), int(found[-1][2]))
    return Turn(int(window), int(window), _page(Position.end_of(read_after), found, reached))


async def order_owner(
    conn: psycopg.AsyncConnection[Any], order_id: UUID
) -> tuple[UUID, UUID | None] | None:
    """(restaurant_id, customer_id) owning an order, or None if the relay never saw it."""
    cur = await conn.execute(query("order_owner"), {"order_id": order_id})
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


async def take_offset(
    conn: psycopg.AsyncConnection[Any], follower: str, start: Position | None = None
) -> Position | None:
    """A follower's offset, locked until the transaction ends (``conn`` must be
    in one); None if another replica holds it. A new follower starts at
    ``start``, or at the oldest retained event."""
    await conn.execute(
        query("offset_init"),
        {
            "follower": follower,
            "window": None if start is None else start.window,
            "xid": END if start is None else start.xid,
            "id": END if start is None else start.id,
        },
    )
    cur = await conn.execute(query("offset_take"), {"follower": follower})
    row = await cur.fetchone()
    return None if row is None else Position(int(row[0]), int(row[1]), int(row[2]))


async def read_offset(conn: psycopg.AsyncConnection[Any], follower: str) -> Position | None:
    cur = await conn.execute(query("offset_read"), {"follower": follower})
    row = await cur.fetchone()
    return None if row is None else Position(int(row[0]), int(row[1]), int(row[2]))


async def advance_offset(conn: psycopg.AsyncConnection[Any], follower: str, to: Position) -> None:
    """Move a follower's offset forward to ``to`` (never back)."""
    await conn.execute(
        query("offset_advance"),
        {"follower": follower, "window": to.window, "xid": to.xid, "id": to.id},
    )

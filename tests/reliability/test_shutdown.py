"""SIGTERM ends every stream cleanly, whatever it is doing.

A stream can be live and idle, replaying the log, waiting for a pooled
connection, or writing to a client that stopped reading when the relay is
told to stop. Each must end within the shutdown grace: the readable ones with
a last ``retry:`` hint (so clients come back, spread out, to another
replica), the stalled one with its connection dropped, and the process must
exit 0 with no traceback (an ASGI task cancelled under the server used to log
``Exception in ASGI application … CancelledError``).

Black-box: a recorder and a gateway as real processes, raw sockets as
clients, and a table lock held by the test to keep streams inside their
database reads at the moment of the signal.
"""

from __future__ import annotations

import socket
import time
import uuid

import psycopg

from relay.gateway.auth import mint_token
from tests.helpers.db import unrecorded
from tests.helpers.relay_process import SECRET, RelayProcess
from tests.helpers.sockets import Reader, dropped, open_stalled
from tests.helpers.sse import bulk_accepted, from_start

GRACE = 4.0
FLOOD = 18_000  # more frames than loopback buffers hold: writes to a non-reader stall
POOL = 8  # the gateway pool's max_size: streams beyond it wait for a connection


def test_sigterm_ends_streams_in_every_state(database_url: str) -> None:
    busy, quiet = uuid.uuid4(), uuid.uuid4()
    token = mint_token(SECRET, subject="staff", restaurant_ids=[busy, quiet])
    bulk_accepted(database_url, busy, FLOOD)
    env = {"RELAY_HEARTBEAT_SECONDS": "1", "RELAY_SHUTDOWN_GRACE": f"{GRACE:.0f}s"}
    with (
        RelayProcess(database_url, args=("--dispatcher-only",)),
        RelayProcess(database_url, args=("--gateway-only",), env=env) as gateway,
    ):
        deadline = time.monotonic() + 60
        while unrecorded(database_url):
            assert time.monotonic() < deadline, "the backlog was not recorded"
            time.sleep(0.2)

        live = Reader(gateway.port, f"/v1/restaurants/{quiet}/stream", token)
        live_set = Reader(gateway.port, f"/v1/restaurants/stream?restaurant={quiet}", token)
        # Replays the whole backlog to a client that reads nothing: its writes stall.
        stalled, status = open_stalled(gateway.port, token, busy)
        assert status == 200
        for reader in (live, live_set):
            reader.start()
        time.sleep(1.5)  # the stalled stream fills its buffers; the live ones are idle

        with psycopg.connect(database_url) as locker:
            # Every read of the log now waits: these streams are inside their
            # opening read, and those beyond the pool wait for a connection.
            locker.execute("LOCK TABLE relay_outbox, relay_windows IN ACCESS EXCLUSIVE MODE")
            resume = from_start()  # the whole backlog to replay
            replaying = [
                Reader(gateway.port, f"/v1/restaurants/{busy}/stream", token, resume)
                for _ in range(POOL + 3)
            ]
            for reader in replaying:
                reader.start()
            time.sleep(2.5)  # heartbeats flow while they wait
            assert all(": heartbeat" in r.body for r in replaying), "streams not waiting"

            started = time.monotonic()
            code = gateway.stop(timeout=GRACE + 10)
            took = time.monotonic() - started
            locker.rollback()

        for reader in (live, live_set, *replaying):
            reader.join(5)
        output = gateway.output()

    assert code == 0, output[-3000:]
    assert took < GRACE + 2, f"shutdown took {took:.1f}s\n{output[-4000:]}"
    for reader in (live, live_set, *replaying):
        assert not reader.is_alive(), "a stream outlived the shutdown"
        last = reader.body.rstrip("\n").rsplit("\n\n", 1)[-1]
        assert last.startswith("retry: "), (reader.reset, reader.body[-300:])
        assert "shutting down" in last
    for sign in ("Traceback", "Exception in ASGI application", "CancelledError"):
        assert sign not in output, output[-3000:]
    # No replay page was ever sent to the streams held in their opening read.
    assert all("event: " not in r.body for r in replaying)
    assert dropped(stalled) or _closed(stalled)
    stalled.close()


def _closed(sock: socket.socket) -> bool:
    """The relay ended the connection: reading what is left reaches EOF or a reset."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False  # still open: the relay kept it
    except OSError:
        return True
    return True

"""Clients that stop reading: closing their stream closes their socket.

A stream whose writes stall for the send timeout is closed by the relay. If
only the stream ends and the socket stays, the socket keeps its unsent
megabytes for as long as the client keeps it, and the connection caps (which
count streams) no longer bound what one subject holds: it reconnects, stops
reading again, and piles up sockets. So the relay must drop the connection
itself (a reset, its buffers discarded), and a well-behaved client on the
same relay must not notice any of it.

Black-box: a real relay process, raw sockets with a small receive buffer as
the clients that stop reading, the kernel's socket table for what the relay
holds.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import httpx

from relay.gateway.auth import mint_token
from tests.helpers.relay_process import SECRET, RelayProcess, parse_frames
from tests.helpers.sockets import dropped, open_stalled
from tests.helpers.sse import bulk_accepted, from_start

CAP = 2  # RELAY_MAX_CONNECTIONS_PER_SUBJECT
# StreamOptions.send_timeout is max(10 s, 2 x heartbeat): a 1 s heartbeat
# gives its floor, the shortest time after which a stalled stream is closed.
SEND_TIMEOUT = 10.0
# About 7 MB of frames: more than a loopback socket buffers (the sender's
# buffer grows to net.ipv4.tcp_wmem's 4 MB) plus the server's own write
# buffer, so the relay's writes to a client that stops reading stall.
FLOOD = 18_000
_ESTABLISHED = "01"  # st column of /proc/net/tcp


def _held_by_relay(port: int, client_ports: set[int]) -> list[tuple[int, int]]:
    """(client port, send queue bytes) of the relay's ESTABLISHED sockets to those clients.

    Read from the kernel's socket table (the relay and the test share the
    loopback), so it counts what the relay process really holds, not what
    its own gauges say.
    """
    held = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        if state != _ESTABLISHED or int(local.split(":")[1], 16) != port:
            continue
        client = int(remote.split(":")[1], 16)
        if client in client_ports:
            held.append((client, int(queues.split(":")[0], 16)))
    return held


class _Sampler(threading.Thread):
    """The most sockets (and send-queue bytes) the relay held for the clients, sampled."""

    def __init__(self, port: int, client_ports: set[int]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.client_ports = client_ports
        self.most_sockets = 0
        self.most_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            held = _held_by_relay(self.port, set(self.client_ports))
            self.most_sockets = max(self.most_sockets, len(held))
            self.most_bytes = max(self.most_bytes, sum(q for _p, q in held))


def _read_all(url: str, token: str, restaurant: uuid.UUID, want: int) -> int:
    """Events a normal client reads from the start of the restaurant's log."""
    cursor = from_start()
    got = 0
    deadline = time.monotonic() + 20
    with httpx.stream(
        "GET", f"{url}/v1/restaurants/{restaurant}/stream",
        headers={"Authorization": f"Bearer {token}", "Last-Event-ID": cursor},
        timeout=httpx.Timeout(5, read=5),
    ) as response:  # fmt: skip
        assert response.status_code == 200
        tail = ""
        for text in response.iter_text():
            frames, _comments, tail = parse_frames(tail + text)
            got += sum(1 for f in frames if f.event == "OrderStatusChanged")
            if got >= want or time.monotonic() > deadline:
                break
    return got


def test_a_client_that_stops_reading_loses_its_socket_not_just_its_stream(
    database_url: str,
) -> None:
    relay = RelayProcess(
        database_url,
        env={
            "RELAY_HEARTBEAT_SECONDS": "1",
            "RELAY_MAX_CONNECTIONS_PER_SUBJECT": str(CAP),
            # Room for the whole flood: the stream ends by its stalled write,
            # not by a hub buffer overflow.
            "RELAY_SUBSCRIBER_BUFFER": str(2 * FLOOD),
        },
    )
    restaurant = uuid.uuid4()
    hog = mint_token(SECRET, subject="hog", restaurant_ids=[restaurant])
    clients: list[socket.socket] = []
    ports: set[int] = set()

    def connect() -> tuple[socket.socket, int]:
        sock, status = open_stalled(relay.port, hog, restaurant)
        clients.append(sock)
        ports.add(sock.getsockname()[1])
        return sock, status

    sampler = _Sampler(relay.port, ports)
    try:
        relay.start()
        sampler.start()
        stalled = [connect() for _ in range(CAP)]
        assert [status for _s, status in stalled] == [200] * CAP
        bulk_accepted(database_url, restaurant, FLOOD)

        # (1) The relay closes the socket, not only the stream, soon after the send timeout.
        deadline = time.monotonic() + SEND_TIMEOUT + 10
        while time.monotonic() < deadline and not all(dropped(s) for s, _ in stalled):
            time.sleep(0.1)
        stuck_bytes = sum(q for _p, q in _held_by_relay(relay.port, ports))
        assert all(dropped(s) for s, _ in stalled), (
            f"the relay still holds {len(_held_by_relay(relay.port, ports))} sockets of "
            f"closed streams ({stuck_bytes} bytes queued)\n{relay.output()[-3000:]}"
        )
        assert "closing a stream whose client stopped reading" in relay.output()
        assert "without completing response" not in relay.output()

        # (2) Its streams closed, the subject opens more, as many as it is
        # allowed and then some: the relay never holds more of its sockets than
        # the cap (one of slack for a refused request's socket closing).
        again = [connect() for _ in range(2 * CAP)]
        assert sorted(status for _s, status in again) == [200] * CAP + [429] * CAP
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        assert sampler.most_sockets <= CAP + 1, (
            f"the relay held {sampler.most_sockets} sockets of a subject capped at {CAP} "
            f"(at most {sampler.most_bytes} bytes queued)"
        )
        assert len(_held_by_relay(relay.port, ports)) <= CAP

        # (3) A client that reads gets every event, the flood included.
        reader = mint_token(SECRET, subject="reader", restaurant_ids=[restaurant])
        assert _read_all(relay.url, reader, restaurant, FLOOD) == FLOOD
        assert relay.proc is not None and relay.proc.poll() is None
    finally:
        sampler.stop.set()
        for sock in clients:
            sock.close()
        relay.__exit__()

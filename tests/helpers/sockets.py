"""Raw-socket SSE clients: one that reads everything, one that stops reading.

For tests that must see the bytes and the connection as the kernel does
(chunked framing, resets, what the relay holds), below any HTTP client.
"""

from __future__ import annotations

import select
import socket
import threading
import uuid

__all__ = ["Reader", "dropped", "open_stalled"]


class Reader(threading.Thread):
    """A client that reads its stream to the end and keeps every byte."""

    def __init__(self, port: int, path: str, token: str, last_id: str | None = None) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\n"
                f"{resume}Accept: text/event-stream\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        self.received = b""
        self.reset = False

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except OSError:
            self.reset = True
        finally:
            self.sock.close()

    @property
    def body(self) -> str:
        """The response body, its chunked transfer encoding undone."""
        rest = self.received.partition(b"\r\n\r\n")[2]
        body = b""
        while rest:
            size, _crlf, rest = rest.partition(b"\r\n")
            length = int(size, 16) if size.strip() else 0
            if length == 0:
                break
            body += rest[:length]
            rest = rest[length + 2 :]
        return body.decode(errors="replace")


def open_stalled(port: int, token: str, restaurant: uuid.UUID) -> tuple[socket.socket, int]:
    """A stream request from a client that reads the status line, then nothing.

    A small receive buffer (set before connecting, so the window is small from
    the handshake) makes the relay's writes stall early; the socket is not
    read again after the response head.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /v1/restaurants/{restaurant}/stream HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(1024)
        assert chunk, "the relay closed the connection before answering"
        head += chunk
    return sock, int(head.split(b" ", 2)[1])


def dropped(sock: socket.socket) -> bool:
    """Whether the relay closed the connection, seen by a client that does not read:
    a reset (POLLERR/POLLHUP) or a FIN (POLLRDHUP) is reported whatever is still unread."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
    return any(
        mask & (select.POLLERR | select.POLLHUP | select.POLLRDHUP) for _fd, mask in poller.poll(0)
    )

"""A loopback TCP proxy for fault injection, without touching the shared servers.

Two failures it can play:
- ``dropping`` (a network blackhole): bytes in both directions are read and
  discarded, so each side's kernel still acknowledges them and only
  application-level timeouts can tell the link is dead — a half-open link.
- ``cut()`` (an outage): every open connection is reset and new ones are
  refused until ``restore()``.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.helpers.relay_process import free_port


class LoopbackProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.dropping = threading.Event()
        self.cut_off = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection; refuse new ones until ``restore``."""
        self.cut_off.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            _close(s)

    def restore(self) -> None:
        self.cut_off.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.cut_off.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if not self.dropping.is_set():
                    sink.sendall(data)
        _close(source)
        _close(sink)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self.cut()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()

"""HTTP connections that can be aborted, and whose closes never wait without end.

uvicorn ends a connection with ``transport.close()``, which first flushes the
unsent bytes; a client that stopped reading never takes them, so the socket
stayed open, its megabytes of buffers with it, for as long as the client kept
it, uncounted by the connection caps. Two remedies, per connection:

- the ``relay.abort`` ASGI extension (``relay.gateway.sse``): a stream whose
  writes stall drops its connection at once (``abort``), and learns that its
  client left from the connection itself (``on_lost``), with no task of its own;
- a close uvicorn makes itself (``Connection: close``, keep-alive expiry,
  shutdown) that has not flushed within ``CLOSE_LINGER`` is aborted.

An abort is an RST (``SO_LINGER`` 0): the unsent bytes are dropped, from our
buffer and from the kernel's. uvicorn's protocol classes are subclassed, not
patched; the hooks used (``connection_lost``, ``on_response_complete``,
``timeout_keep_alive_handler``, ``shutdown``) are checked by the dead-socket
tests on every uvicorn upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from relay.gateway.sse import ABORT_EXTENSION

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = ["CLOSE_LINGER", "AbortableHttp"]

# A close that has not flushed in this long is made an abort: bytes that a
# client has not taken in 10 s are not worth a socket held without end.
CLOSE_LINGER = 10.0


class _Abortable:
    """One connection's abort hook and its bounded close."""

    __slots__ = ("_deadline", "_lost", "_on_lost", "_protocol")

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol  # uvicorn's protocol: .transport, .loop
        self._lost = False
        self._deadline: asyncio.TimerHandle | None = None
        self._on_lost: Callable[[], None] | None = None

    def wrap(self, app: ASGI3Application) -> ASGI3Application:
        """``app`` with the abort hook in each request's scope."""
        hook: dict[object, object] = {"abort": self.abort, "on_lost": self.on_lost}

        async def offering_abort(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            if scope["type"] == "http":
                scope.setdefault("extensions", {})[ABORT_EXTENSION] = hook
            await app(scope, receive, send)

        return offering_abort

    def abort(self) -> None:
        transport = self._protocol.transport
        if self._lost or transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def bound_close(self) -> None:
        """After uvicorn may have closed the transport: abort it if it has not
        flushed within ``CLOSE_LINGER``."""
        transport = self._protocol.transport
        if self._lost or self._deadline is not None or transport is None:
            return
        if transport.is_closing():
            self._deadline = self._protocol.loop.call_later(CLOSE_LINGER, self.abort)

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the connection is gone (None: no longer);
        a stream learns of its client leaving without a task of its own."""
        self._on_lost = callback
        if callback is not None and self._lost:
            callback()

    def lost(self) -> None:
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()


class _AbortableMixin:
    """Adds ``_Abortable`` to one of uvicorn's HTTP protocol classes."""

    abortable: _Abortable
    app: ASGI3Application

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abortable = _Abortable(self)
        self.app = self.abortable.wrap(self.app)

    def connection_lost(self, exc: Exception | None) -> None:
        self.abortable.lost()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self.abortable.bound_close()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()  # type: ignore[misc]
        self.abortable.bound_close()

    def shutdown(self) -> None:
        super().shutdown()  # type: ignore[misc]
        self.abortable.bound_close()


class _AbortableH11(_AbortableMixin, H11Protocol):
    pass


AbortableHttp: type[asyncio.Protocol] = _AbortableH11
try:  # uvicorn's own choice ("auto"): httptools where installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency
    pass
else:

    class _AbortableHttpTools(_AbortableMixin, HttpToolsProtocol):
        pass

    AbortableHttp = _AbortableHttpTools

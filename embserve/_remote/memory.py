"""An in-memory transport pair: both ends of a connection in this process, for tests.

The twin of :class:`~embserve._remote.socket_transport.SocketTransport` (as distributed's
``inproc`` comm is of its ``tcp`` one): the protocol's tests run the caller and the replica
against each other with no process and no socket, on one event loop or on two (in two
threads). Frames are copied on the way, as a wire would: what arrives owns writable memory of
its own, and a sender that changes its array afterwards does not change what was received.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from embserve._remote.codec import Frame
from embserve._remote.messages import name_of
from embserve._remote.transport import OnClosed, OnMessage, Transport

__all__ = ["MemoryTransport", "memory_pair"]

logger = logging.getLogger("embserve.remote")


class MemoryTransport(Transport):
    """One end of a :func:`memory_pair`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._peer: MemoryTransport | None = None
        self._on_message: OnMessage | None = None
        self._report_closed: OnClosed | None = None
        self._early: list[tuple[int, int, list[Frame]]] = []  # received before start()
        self._lost: str | None = None  # the other end closed before start()
        self.closed = False
        self.sent = 0  # messages sent, for tests that count them

    def start(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        self._on_message, self._report_closed = on_message, on_closed
        early, self._early = self._early, []
        for message in early:
            self._receive(*message)
        if self._lost is not None:
            self._peer_closed(self._lost)

    def send(self, kind: int, ident: int, frames: Sequence[Frame] = ()) -> None:
        if self.closed:
            return
        if not 0 <= kind <= 255:
            raise ValueError(f"a message kind is one byte, got {kind}")
        peer = self._peer
        assert peer is not None
        # Copied as a socket would: the pickle stream as bytes, buffers in memory of their own.
        copied: list[Frame] = [
            bytes(f) if i == 0 else bytearray(memoryview(f).cast("B")) for i, f in enumerate(frames)
        ]
        self.sent += 1
        peer._call(peer._receive, kind, ident, copied)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._early.clear()
        peer = self._peer
        if peer is not None:
            peer._call(peer._peer_closed, "the other side closed the connection")

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        # Run on this end's loop, after what was scheduled before (messages keep their order).
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self._loop:
                self._loop.call_soon(fn, *args)
            else:
                self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # this end's loop is closed: nobody is left to tell
            pass

    def _receive(self, kind: int, ident: int, frames: list[Frame]) -> None:
        if self.closed:
            return
        if self._on_message is None:
            self._early.append((kind, ident, frames))
            return
        try:
            self._on_message(kind, ident, frames)
        except Exception:
            logger.exception("handling a %r message failed", name_of(kind))

    def _peer_closed(self, reason: str) -> None:
        if self.closed:
            return
        if self._report_closed is None:
            self._lost = reason
            return
        self.closed = True
        self._report_closed(reason)


def memory_pair(
    loop: asyncio.AbstractEventLoop | None = None,
    other_loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected ends: the first on ``loop``, the second on ``other_loop`` (both default
    to the running loop)."""
    loop = loop or asyncio.get_running_loop()
    a, b = MemoryTransport(loop), MemoryTransport(other_loop or loop)
    a._peer, b._peer = b, a
    return a, b

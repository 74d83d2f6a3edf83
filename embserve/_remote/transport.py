"""The transport seam: one connection that carries the protocol's messages, whatever it is.

A :class:`Transport` moves messages ``(kind, ident, frames)`` between the two ends of one
replica's connection and knows nothing of what they mean. Implementations: a connected stream
socket (:class:`~embserve._remote.socket_transport.SocketTransport`, for local worker processes),
an in-memory pair (:func:`~embserve._remote.memory.memory_pair`, for tests), and a Dask comm
(the Dask backend's: an async ``write`` task and an async ``read`` loop fit the same contract).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from embserve._remote.codec import Frame

__all__ = ["OnClosed", "OnMessage", "Transport"]

#: Called for each message received: its kind, its ident and its payload frames.
OnMessage = Callable[[int, int, list[Frame]], None]
#: Called once when the connection is lost, with what happened in words.
OnClosed = Callable[[str], None]


class Transport(ABC):
    """One end of a connection that carries protocol messages, in order, both ways.

    Contract:

    - A transport belongs to one event loop: every method is called on that loop, and the
      callbacks run on it.
    - :meth:`start` is called once, with the callbacks. Nothing is delivered before it and
      nothing received before it is lost.
    - :meth:`send` never blocks and never waits: what cannot be written at once is queued, in
      order, and written as the connection takes it. ``frames`` are not copied when that can be
      avoided, so they must not change until written. A broken connection is not an error
      there: the transport closes and ``on_closed`` reports it, possibly from inside
      :meth:`send`, so a sender learns that a message never left from :attr:`closed` being true
      right after it. Sending on a closed transport does nothing. ``on_message`` never runs
      inside :meth:`send`.
    - ``on_message(kind, ident, frames)`` runs for each message, in the order sent. The first
      frame is the pickle stream; the others are buffers in writable memory of their own (numpy
      arrays are built on them). An exception it raises is logged and the transport goes on.
    - ``on_closed(reason)`` runs once, when the other end closed the connection or it broke,
      after every message received before; not when this end called :meth:`close`.
    - :meth:`close` stops both directions at once (what is still queued is dropped) and is
      idempotent.
    """

    closed: bool = False
    #: Where :meth:`broken` reports the end; an implementation sets it in :meth:`start`.
    _on_closed: OnClosed

    def broken(self, reason: str) -> None:
        """The connection broke (or the other end closed it): close this end, and report it
        to ``on_closed`` once. What implementations call when a read or write fails."""
        if self.closed:
            return
        self.close()
        self._on_closed(reason)

    @abstractmethod
    def start(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        """Begin delivering messages to ``on_message``; ``on_closed`` reports the end."""

    @abstractmethod
    def send(self, kind: int, ident: int, frames: Sequence[Frame] = ()) -> None:
        """Send one message (``kind`` 0 to 255; no frames: no payload)."""

    @abstractmethod
    def close(self) -> None:
        """Close this end; the other end's ``on_closed`` reports it."""

"""The requests one end of a transport sent and still awaits answers to: one registry.

Both ends use it: the caller for the requests it sends its replica, the replica for the handle
calls its user code makes. An answer settles its call or feeds its stream; a request whose
answer never came ends with an error when the transport closes, so nothing waits silently.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import pickle
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from embserve._loop import Awaiting
from embserve._remote.codec import Frame, decode, decode_error, encode
from embserve._remote.messages import END, ERR, ITEM, OK, STREAM_WINDOW
from embserve._remote.transport import Transport

if TYPE_CHECKING:
    from embserve.router import Lease

__all__ = ["Pending"]

#: Makes the error of a request that will get no answer: ``started`` is False when the request
#: never left (the transport was closed already), True when it may have reached user code.
Gone = Callable[[bool], BaseException]


class Pending(Awaiting):
    """Sends requests over ``transport`` and routes the answers back to their senders.

    ``cancel`` and ``more`` are the kinds this end sends to give up on a request and to grant
    stream credit. Every method runs on the transport's loop. ``poll_s``: how long the loop
    may poll for an answer before it sleeps, while one is due (see
    :func:`~embserve._loop.poll_while`; 0, the default: it never polls for this end's).

    Attributes:
        calls: the futures of calls awaiting their answer, by ident.
        streams: the queues of streams awaiting items, by ident.
        held: for requests given up while their work may still run, what lets go of their
            router lease once the other end says that work ended (``ENDED``).
    """

    def __init__(
        self, transport: Transport, *, cancel: int, more: int, gone: Gone, poll_s: float = 0.0
    ) -> None:
        self.transport = transport
        self.poll_s = poll_s
        self._cancel = cancel
        self._more = more
        self._gone = gone
        self._ids = itertools.count(1)
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self.streams: dict[int, asyncio.Queue[tuple[int, Any]]] = {}
        self.held: dict[int, Callable[[], None]] = {}

    def awaiting(self) -> bool:
        return bool(self.calls or self.streams)

    async def call(self, kind: int, payload: Any, lease: Lease | None = None) -> Any:
        """Send a request and return its answer (or raise its error).

        Cancelled, it tells the other end, holding ``lease`` until that end's work ended.
        """
        transport = self.transport
        frames = encode(payload)
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls[ident] = future
        try:
            transport.send(kind, ident, frames)
            if transport.closed:  # closed already, or this send found it broken: it never left
                if future.done():
                    future.exception()  # failed as started by the close: the error below wins
                raise self._gone(False)
            return await future
        except asyncio.CancelledError:
            # Our own await cancelled the future: only an answer would have made it done.
            if future.cancelled():
                self.cancel(ident, lease)
            raise
        finally:
            self.calls.pop(ident, None)

    def send(
        self, kind: int, payload: Any, future: asyncio.Future[Any], lease: Lease | None = None
    ) -> Callable[[], None] | None:
        """Send a request whose answer settles ``future`` directly; the function that
        withdraws it, or None (nothing sent) when it cannot be sent now."""
        transport = self.transport
        try:
            frames = encode(payload)
        except Exception:  # arguments that cannot be pickled: the slow path says which
            return None
        ident = next(self._ids)
        transport.send(kind, ident, frames)
        if transport.closed:  # this send found the connection broken: it never left
            return None
        # Registered after sending: the answer comes in a later turn of the loop at the soonest.
        self.calls[ident] = future
        return functools.partial(self._withdraw, ident, lease)

    def _withdraw(self, ident: int, lease: Lease | None) -> None:
        if self.calls.pop(ident, None) is not None:
            self.cancel(ident, lease)

    def cancel(self, ident: int, lease: Lease | None = None) -> None:
        """Give up on request ``ident``: tell the other end, and hold ``lease`` (if any) until
        it says the request's work ended."""
        if self.transport.closed:
            return  # nobody is left to run it, or to say when it ended
        if lease is not None:
            let_go = self.held.pop(ident, None)
            self.held[ident] = lease.hold()
            if let_go is not None:
                let_go()
        self.transport.send(self._cancel, ident)

    def ended(self, ident: int) -> None:
        """The other end says the work of cancelled request ``ident`` ended."""
        let_go = self.held.pop(ident, None)
        if let_go is not None:
            let_go()

    async def stream(
        self, kind: int, payload: Any, lease: Lease | None = None
    ) -> AsyncGenerator[Any, None]:
        """Send a streaming request and yield its items, granting credit as they are taken.

        Closed before its end, it tells the other end, holding ``lease`` as :meth:`call` does.
        """
        transport = self.transport
        frames = encode(payload)
        ident = next(self._ids)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.streams[ident] = queue
        finished = False
        taken = 0
        grant = STREAM_WINDOW // 2
        try:
            transport.send(kind, ident, frames)
            if transport.closed:
                finished = True
                raise self._gone(False)
            while True:
                outcome, value = await queue.get()
                if outcome == ITEM:
                    yield value
                    taken += 1
                    if taken == grant:
                        transport.send(self._more, ident, encode(taken))
                        taken = 0
                    continue
                finished = True
                if outcome == END:
                    return
                raise value
        finally:
            del self.streams[ident]
            if not finished:
                self.cancel(ident, lease)

    def answer(self, outcome: int, ident: int, frames: list[Frame]) -> None:
        """Deliver an answer: ``outcome`` is OK, ERR (an error payload), ITEM or END. A call is
        settled and forgotten; a stream gets ``(outcome, value)``; an answer to a request
        given up already is dropped."""
        future = self.calls.pop(ident, None)
        if future is None:
            queue = self.streams.get(ident)
            if queue is None:
                return
            queue.put_nowait(self._decode(outcome, frames))
            return
        if future.done():
            return
        if outcome == OK and len(frames) == 1:  # a plain value, the usual answer
            try:
                value = pickle.loads(frames[0])
            except Exception as exc:  # an answer this process cannot unpickle fails its call
                future.set_exception(exc)
            else:
                future.set_result(value)
            return
        outcome, value = self._decode(outcome, frames)
        if outcome == OK:
            future.set_result(value)
        else:
            future.set_exception(value)

    @staticmethod
    def _decode(outcome: int, frames: list[Frame]) -> tuple[int, Any]:
        try:
            if outcome == ERR:
                return outcome, decode_error(frames)
            return outcome, decode(frames)
        except Exception as exc:  # an answer this process cannot unpickle fails its request
            return ERR, exc

    def fail_all(self) -> None:
        """End every request waiting (the transport closed): calls and streams with an error
        of their own, each made by ``gone(True)``; held leases are let go."""
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(self._gone(True))
        for queue in self.streams.values():
            queue.put_nowait((ERR, self._gone(True)))
        held, self.held = self.held, {}
        for let_go in held.values():
            let_go()

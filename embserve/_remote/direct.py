"""A replica's direct line: a second connection, on which a plain thread sends a call and reads
its answer itself.

A plain thread's call through the runtime's loop makes three threads take turns (the caller,
the loop, the replica's side) and wakes two of them; on a small machine each wake-up costs
about as much as the call. On a direct line the calling thread writes the ``CALL`` and blocks
reading its ``OK`` or ``ERR``: the replica's side is the one that wakes (or polls), and no
event loop on this side is involved. The messages are the protocol's own, framed as
:class:`~embserve._remote.socket_transport.SocketTransport` frames them, so the replica's side
serves the line with a :class:`~embserve._remote.server.ReplicaServer` of its own over the same
replica (:meth:`ReplicaServer.add_line <embserve._remote.server.ReplicaServer.add_line>`).

One call at a time: a thread :meth:`DirectLine.claim`\\ s the line (without waiting), and a
thread that finds it taken goes through the loop instead. Admission is the caller's, as for
any call: the line carries only calls that already hold a router lease.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from embserve._remote.codec import Frame, decode, decode_error, encode
from embserve._remote.messages import CALL, OK
from embserve._remote.socket_transport import _FIXED, _LENGTH, _ONE, drop_sent, message_header
from embserve.request import Request
from embserve.response import NOT_HERE

__all__ = ["DirectLine"]

_READ = 65536  # a small answer arrives in one read of this size


class DirectLine:
    """The caller's end of a replica's direct line: ``sock``, connected to the replica's side.

    ``gone(started)`` makes the error of a call whose answer cannot come (see
    :class:`~embserve._remote.pending.Pending`). Thread-safe: :meth:`claim` and :meth:`call`
    from any thread, :meth:`close` from any thread (the runtime's loop, when the replica is
    lost).
    """

    def __init__(self, sock: socket.socket, gone: Callable[[bool], BaseException]) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._gone = gone
        self._lock = threading.Lock()
        self._buf = bytearray(_READ)
        self.closed = False

    def claim(self) -> bool:
        """Take the line for one :meth:`call` (which gives it back); False, at once, when
        another thread holds it or it is closed."""
        if not self._lock.acquire(blocking=False):
            return False
        if self.closed:  # checked holding the lock: close() may have run meanwhile
            self._lock.release()
            return False
        return True

    def call(self, request: Request) -> Any:
        """Send ``request`` and return its answer, or raise its error, in this thread; the
        line must be :meth:`claim`\\ ed, and is given back.

        Returns :data:`~embserve.response.NOT_HERE` when the request could not be sent (the
        line broke: it never reached the replica, so the loop's path may send it elsewhere);
        raises :class:`~embserve.ReplicaDiedError` (``started=True``) when the line broke while
        the answer was due. A thread interrupted meanwhile (``KeyboardInterrupt``) closes the
        line, which cancels the call on the replica's side; later calls go through the loop.
        """
        sent = False
        try:
            frames = encode(request.to_wire())
            try:
                self._send(CALL, 0, frames)
                sent = True
                kind, _, answer = self._receive()
            except OSError as exc:
                self.closed = True
                if not sent:  # not all of it left: the replica cannot have read the request
                    return NOT_HERE
                raise self._gone(True) from exc
            except BaseException:  # interrupted: what is left on the line is out of step
                self.closed = True
                raise
            if kind == OK:
                return decode(answer)
            raise decode_error(answer)
        finally:
            if self.closed:
                self._sock.close()
            self._lock.release()

    def close(self) -> None:
        """Close the line: a thread blocked on it gets its error at once; later claims fail."""
        self.closed = True
        with contextlib.suppress(OSError):  # shut down: a thread blocked reading it wakes
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(blocking=False):  # else the thread on it closes it
            self._sock.close()
            self._lock.release()

    # -- framing, blocking (as SocketTransport frames it) ---------------------------------

    def _send(self, kind: int, ident: int, frames: list[Frame]) -> None:
        if len(frames) == 1 and type(frames[0]) is bytes:
            self._sock.sendall(_ONE.pack(kind, ident, 1, len(frames[0])) + frames[0])
            return
        views = [memoryview(f).cast("B") for f in frames]
        header = message_header(kind, ident, [v.nbytes for v in views])
        chunks = collections.deque([memoryview(header), *views])
        while chunks:
            drop_sent(chunks, self._sock.sendmsg(chunks))

    def _receive(self) -> tuple[int, int, list[Frame]]:
        # One answer to one call: nothing follows it, so whatever was read is this message.
        buf = self._buf
        view = memoryview(buf)
        have = self._read_into(view, 0, _FIXED.size)
        kind, ident, count = _FIXED.unpack_from(buf)
        header = _FIXED.size + count * _LENGTH.size
        if have < header:
            have = self._read_into(view, have, header)
        lengths = [
            _LENGTH.unpack_from(buf, _FIXED.size + i * _LENGTH.size)[0] for i in range(count)
        ]
        frames: list[Frame] = []
        position = header
        for index, length in enumerate(lengths):
            end = position + length
            if end <= have:  # read already: a small answer
                chunk = view[position:end]
                # The pickle stream is read once; buffers become arrays, which own writable
                # memory.
                frames.append(bytes(chunk) if index == 0 else bytearray(chunk))
            else:
                frame = bytearray(length)
                ready = max(have - position, 0)
                frame[:ready] = view[position : position + ready]
                self._read_into(memoryview(frame), ready, length)
                frames.append(bytes(frame) if index == 0 else frame)
            position = end
        return kind, ident, frames

    def _read_into(self, view: memoryview, have: int, least: int) -> int:
        # Read into view[have:] until it holds ``least`` bytes or more; how many it holds.
        while have < least:
            count = self._sock.recv_into(view[have:])
            if count == 0:
                raise ConnectionResetError("the replica closed its direct line")
            have += count
        return have

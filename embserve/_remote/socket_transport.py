"""The transport over a connected stream socket, driven by an asyncio loop's selector.

On the wire each message is::

    !B kind | !Q ident | !I frame count | !Q length per frame | frames...

Kind and ident travel outside the pickle, so that a payload the other side cannot unpickle still
names the request it fails. Out-of-band buffers (a numpy array's memory) are handed to
``sendmsg`` as they are, with no copy into a write buffer, and received straight into memory of
their own, which becomes the array on the other side.

The transport reads and writes with ``add_reader``/``add_writer`` callbacks, not asyncio's
transports: those copy what they cannot send at once, and these messages carry arrays of many
megabytes. Small messages, the common case, cost one ``send`` and one ``recv_into``. It needs
only the standard library, so a worker process imports nothing else to talk to its runtime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Sequence

from embserve._remote.codec import Frame
from embserve._remote.messages import name_of
from embserve._remote.transport import OnClosed, OnMessage, Transport

__all__ = ["SocketTransport"]

logger = logging.getLogger("embserve.remote")

_FIXED = struct.Struct("!BQI")  # kind, ident, frame count
_ONE = struct.Struct("!BQIQ")  # the header of a message of one frame
_LENGTH = struct.Struct("!Q")
_LENGTHS = tuple(struct.Struct(f"!{n}Q") for n in range(8))  # the usual frame counts
_BUFFER = 256 * 1024  # messages up to this size are parsed out of one reused read buffer
_SMALL = 16384  # messages below this size are joined into one bytes object and sent at once
_IOV_MAX = 512


def message_header(kind: int, ident: int, sizes: Sequence[int]) -> bytes:
    """The header of a message whose frames are ``sizes`` bytes long (the frames follow it)."""
    return _FIXED.pack(kind, ident, len(sizes)) + b"".join(_LENGTH.pack(n) for n in sizes)


def drop_sent(chunks: collections.deque[memoryview], sent: int) -> None:
    """Take the ``sent`` bytes that a ``sendmsg`` of ``chunks`` wrote off their front."""
    while sent:
        head = chunks[0]
        if sent >= head.nbytes:
            sent -= head.nbytes
            chunks.popleft()
        else:
            chunks[0] = head[sent:]
            sent = 0


def _ignore(kind: int, ident: int, frames: list[Frame]) -> None:
    pass


def _ignore_closed(reason: str) -> None:
    pass


class SocketTransport(Transport):
    """Sends and receives messages over ``sock`` (connected, e.g. one end of a socketpair) on
    ``loop``, the running loop by default."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None) -> None:
        sock.setblocking(False)
        self._loop = loop or asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._on_message: OnMessage = _ignore
        self._on_closed: OnClosed = _ignore_closed
        self.closed = False
        # Reading: one fixed buffer (never resized, so one view of it serves every read), and a
        # buffer of its own for each frame of a large message.
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._large: tuple[int, int, list[int], list[Frame]] | None = None
        self._frame: bytearray | None = None  # the frame of a large message being filled
        self._filled = 0
        # Writing: what the socket did not take yet, in order.
        self._out: collections.deque[memoryview] = collections.deque()

    def start(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        if not self.closed:
            self._loop.add_reader(self._fd, self._readable)

    # -- sending --------------------------------------------------------------------------

    def send(self, kind: int, ident: int, frames: Sequence[Frame] = ()) -> None:
        count = len(frames)
        if count == 0:
            self._send_bytes(_FIXED.pack(kind, ident, 0))
            return
        if count == 1:
            head = frames[0]
            if type(head) is bytes and len(head) < _SMALL:  # a small value, the usual message
                self._send_bytes(_ONE.pack(kind, ident, 1, len(head)) + head)
                return
        sizes = [memoryview(f).nbytes for f in frames]
        header = message_header(kind, ident, sizes)
        if sum(sizes) < _SMALL:
            self._send_bytes(header + b"".join(frames))
        else:
            self._write([header, *frames])

    def _send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        if self._out:
            self._out.append(memoryview(data))
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.broken(f"sending failed: {exc}")
            return
        if sent < len(data):
            self._out.append(memoryview(data)[sent:])
            self._loop.add_writer(self._fd, self._writable)

    def _write(self, chunks: list[Frame]) -> None:
        if self.closed:
            return
        idle = not self._out
        self._out.extend(memoryview(c).cast("B") for c in chunks)
        if idle:
            self._flush()
            if self._out and not self.closed:
                self._loop.add_writer(self._fd, self._writable)

    def _flush(self) -> None:
        out = self._out
        while out:
            batch = [out[i] for i in range(min(len(out), _IOV_MAX))]
            try:
                sent = self._sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.broken(f"sending failed: {exc}")
                return
            drop_sent(out, sent)

    def _writable(self) -> None:
        self._flush()
        if not self._out and not self.closed:
            self._loop.remove_writer(self._fd)

    # -- receiving ------------------------------------------------------------------------

    def _readable(self) -> None:
        frame = self._frame
        try:
            if frame is not None:
                count = self._sock.recv_into(memoryview(frame)[self._filled :])
            else:
                count = self._sock.recv_into(self._view[self._end :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.broken(f"receiving failed: {exc}")
            return
        if count == 0:
            self.broken("the other side closed the connection")
            return
        if frame is not None:
            self._filled += count
            if self._filled < len(frame):
                return
            self._large_frame_done(frame)
        else:
            self._end += count
        self._parse()

    def _parse(self) -> None:
        buf, view = self._buf, self._view
        start, end = self._start, self._end
        while not self.closed and self._frame is None:
            available = end - start
            if available < _FIXED.size:
                break
            kind, ident, count = _FIXED.unpack_from(buf, start)
            if count == 1 and available >= _ONE.size:  # one frame, the usual message
                position = start + _ONE.size
                stop = position + _ONE.unpack_from(buf, start)[3]
                if stop <= end:
                    self._start = start = stop
                    try:
                        self._on_message(kind, ident, [bytes(view[position:stop])])
                    except Exception:
                        logger.exception("handling a %r message failed", name_of(kind))
                    start, end = self._start, self._end
                    continue
            header = _FIXED.size + count * _LENGTH.size
            if available < header:
                if start + header > _BUFFER:
                    start, end = self._compact(start, end)
                break
            lengths = (_LENGTHS[count] if count < 8 else struct.Struct(f"!{count}Q")).unpack_from(
                buf, start + _FIXED.size
            )
            total = header + sum(lengths)
            if total <= available:
                position = start + header
                frames: list[Frame] = []
                for index, length in enumerate(lengths):
                    chunk = view[position : position + length]
                    # The pickle stream is read once; buffers become arrays, which must own
                    # writable memory.
                    frames.append(bytes(chunk) if index == 0 else bytearray(chunk))
                    position += length
                self._start, self._end = start, end = position, end
                self._deliver(kind, ident, frames)
                start, end = self._start, self._end
                continue
            if total <= _BUFFER:  # the rest is on its way and will fit in the buffer
                if start + total > _BUFFER:
                    start, end = self._compact(start, end)
                break
            # A large message: each frame is received into memory of its own.
            self._start = start + header
            self._large = (kind, ident, list(lengths), [])
            self._next_large_frame()
            start, end = self._start, self._end
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _compact(self, start: int, end: int) -> tuple[int, int]:
        pending = end - start
        self._buf[:pending] = bytes(self._view[start:end])
        self._start, self._end = 0, pending
        return 0, pending

    def _next_large_frame(self) -> None:
        # Fill the next frame from what the read buffer already holds; the rest of it is
        # received straight into it by _readable.
        assert self._large is not None
        kind, ident, lengths, frames = self._large
        while len(frames) < len(lengths):
            length = lengths[len(frames)]
            frame = bytearray(length)
            have = min(length, self._end - self._start)
            frame[:have] = self._view[self._start : self._start + have]
            self._start += have
            if have < length:
                self._frame, self._filled = frame, have
                return
            frames.append(frame)
        self._large = None
        self._deliver(kind, ident, frames)

    def _large_frame_done(self, frame: bytearray) -> None:
        assert self._large is not None
        self._large[3].append(frame)
        self._frame = None
        self._start = self._end = 0
        self._next_large_frame()

    def _deliver(self, kind: int, ident: int, frames: list[Frame]) -> None:
        try:
            self._on_message(kind, ident, frames)
        except Exception:
            logger.exception("handling a %r message failed", name_of(kind))

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._out.clear()
        self._sock.close()

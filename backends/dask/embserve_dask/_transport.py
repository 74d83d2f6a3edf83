"""The remote-replica protocol's transport over one ``distributed.comm``: :class:`CommTransport`.

A Dask replica and its runtime talk the core's protocol (:class:`~embserve.spi.RemoteReplica`,
:class:`~embserve.spi.ReplicaServer`) over a comm of the cluster's own kind (``tcp://``,
``tls://`` with the cluster's security, ``inproc://`` in tests), so TLS, distributed's handshake
and its comm configuration apply unchanged.

One comm message carries one or more protocol messages, flat: ``[kind, ident, payload, kind,
ident, payload, ...]``. A payload is None (no frames), the one frame itself when it is a small
``bytes`` (inline in the msgpack header: wrapping it would cost several times the pickling), or
a ``Serialized`` of the registered ``embserve-frames`` family, whose frames distributed writes
as frames of their own: a numpy array's memory is handed to the socket as it is, never copied
into a pickle stream or the msgpack header.

Writing: :meth:`CommTransport.send` is synchronous and a comm write a coroutine, started at once
(:func:`~embserve.spi.spawn_task`; ``comm.write`` normally ends in that first step, having
handed the frames to the stream). A message alone on the comm is so written at once, as fast as
a raw round trip. After a write, what is sent in the same turn of the loop, or while a write is
under way, is held and written in one comm message at the next turn; what is sent while
delivering a comm message that was read goes out in one right after it. Under load a write and
a read thus carry many messages each, which is what makes 64 requests in flight cheap.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
from collections.abc import Sequence
from typing import Any

from distributed.comm.core import CommClosedError

from embserve.spi import Frame, OnClosed, OnMessage, Transport, spawn_task

__all__ = ["CommTransport"]

logger = logging.getLogger("embserve.dask")

# distributed's serialization functions are untyped; they are used through these names. (The
# module is shadowed by a function of the same name in its package, hence import_module.)
_serialize = importlib.import_module("distributed.protocol.serialize")
Serialized: Any = _serialize.Serialized
_register_family: Any = _serialize.register_serialization_family

_FAMILY = "embserve-frames"
# A single pickle stream up to this size travels inline in the msgpack header; a larger one is
# a frame of its own, which msgpack does not copy.
_INLINE = 64 * 1024


def _family_dumps(frames: Sequence[Frame]) -> tuple[dict[str, Any], list[Frame]]:
    return {"serializer": _FAMILY}, list(frames)


def _family_loads(header: dict[str, Any], frames: Sequence[Frame]) -> list[Frame]:
    # The frames are the payload: the protocol's codecs decode them.
    return list(frames)


# Registered on import, in the runtime and in each replica's process, so that both ends read
# the other's payloads.
_register_family(_FAMILY, _family_dumps, _family_loads)


# Out-of-band buffers are put at an address that is a multiple of this. distributed hands a
# message's frames at whatever offset of the buffer it read they fall on, and numpy takes an
# array whose items are not aligned through a slow loop, not BLAS (a float32 matrix-vector
# product 30 times slower here); BLAS is fastest on whole cache lines.
_ALIGN = 64


def _address(view: memoryview) -> int:
    # Where a writable, contiguous, non-empty buffer starts.
    probe = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe  # lets go of the buffer


def _own(frame: Frame, copy: bool) -> Frame:
    """``frame`` as memory an array may be made over: writable and at an address that is a
    multiple of ``_ALIGN``; the frame itself when it is both (and ``copy`` is false)."""
    view = memoryview(frame)
    size = view.nbytes
    if size == 0:
        return bytearray()
    if not copy and not view.readonly and view.c_contiguous and _address(view) % _ALIGN == 0:
        return frame
    store = bytearray(size + _ALIGN - 1)
    start = -_address(memoryview(store)) % _ALIGN
    owned = memoryview(store)[start : start + size]
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    owned[:] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return owned


def _ignore(kind: int, ident: int, frames: list[Frame]) -> None:
    pass


def _ignore_closed(reason: str) -> None:
    pass


class CommTransport(Transport):
    """Carries protocol messages over ``comm`` (connected, its handshake done) on ``loop``, the
    running loop by default. Follows the :class:`~embserve.spi.Transport` contract.

    Attributes:
        comm: the comm it carries them over.
    """

    def __init__(self, comm: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.comm = self._comm = comm
        self._loop = loop or asyncio.get_running_loop()
        # An in-process comm hands over the sender's own objects: buffers are copied on
        # arrival, as a wire would, so that neither end sees the other change them.
        self._copy = str(comm.peer_address).startswith("inproc://")
        self._on_message: OnMessage = _ignore
        self._on_closed: OnClosed = _ignore_closed
        self._reader: asyncio.Task[None] | None = None
        self.closed = False
        # Writing: messages held for the next write, flat as they go on the comm.
        self._outbox: list[Any] = []
        self._writing = False  # a comm write is under way: the comm takes one at a time
        self._holding = False  # delivering a message read: what is sent goes out after it
        self._flush: asyncio.Handle | None = None  # the write of what was held, next turn

    def start(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        if not self.closed:
            self._reader = self._loop.create_task(self._read(), name="embserve-comm-reader")

    # -- sending --------------------------------------------------------------------------

    def send(self, kind: int, ident: int, frames: Sequence[Frame] = ()) -> None:
        if self.closed:
            return
        if not 0 <= kind <= 255:
            raise ValueError(f"a message kind is one byte, got {kind}")
        count = len(frames)
        payload: Any
        if count == 0:
            payload = None
        elif count == 1 and type(frames[0]) is bytes and len(frames[0]) < _INLINE:
            payload = frames[0]
        else:
            # A header of its own each time: distributed adds to it as it writes.
            payload = Serialized({"serializer": _FAMILY}, list(frames))
        self._outbox += (kind, ident, payload)
        if not (self._writing or self._holding or self._flush is not None):
            self._write()

    def _write(self) -> None:
        batch, self._outbox = self._outbox, []
        self._writing = True
        spawn_task(self._loop, self._write_batch(batch))

    async def _write_batch(self, batch: list[Any]) -> None:
        try:
            await self._comm.write(batch)
        except (CommClosedError, OSError) as exc:
            self._writing = False
            self.broken(f"writing to it failed ({exc or type(exc).__name__})")
            return
        except BaseException:  # cancelled with its runner, or a bug: the comm is unusable
            self._writing = False
            self.broken("writing to it was interrupted")
            raise
        self._writing = False
        # What was sent meanwhile, or is sent in this same turn, goes out in one write, next.
        if not self.closed and self._flush is None:
            self._flush = self._loop.call_soon(self._write_held)

    def _write_held(self) -> None:
        self._flush = None
        if self._outbox and not self._writing and not self.closed:
            self._write()

    # -- receiving ------------------------------------------------------------------------

    async def _read(self) -> None:
        comm = self._comm
        try:
            while True:
                message = await comm.read()
                self._deliver(message)
                if self.closed:
                    return
        except asyncio.CancelledError:  # close(): nothing more is delivered
            return
        except (CommClosedError, OSError) as exc:
            reason = f"the other side closed the connection ({exc or type(exc).__name__})"
        except Exception as exc:  # a message distributed could not read: the stream is lost
            logger.exception("reading from %s failed", comm.peer_address)
            reason = f"reading from it failed ({type(exc).__name__}: {exc})"
        self.broken(reason)

    def _deliver(self, message: Sequence[Any]) -> None:
        on_message = self._on_message
        self._holding = True
        try:
            for index in range(0, len(message), 3):
                if self.closed:
                    return
                kind, ident, payload = message[index : index + 3]
                try:
                    on_message(kind, ident, self._frames(payload))
                except Exception:
                    logger.exception("handling a message of kind %r failed", kind)
        finally:
            self._holding = False
        if self._outbox and not self._writing and self._flush is None and not self.closed:
            self._write()

    def _frames(self, payload: Any) -> list[Frame]:
        if payload is None:
            return []
        if type(payload) is bytes:
            return [payload]
        if isinstance(payload, Serialized):  # a comm that does not deserialize leaves it to us
            payload = payload.frames
        frames: list[Frame] = list(payload)
        for index in range(1, len(frames)):
            # Buffers become arrays, which must own writable memory, at an aligned address.
            frames[index] = _own(frames[index], self._copy)
        if self._copy and type(frames[0]) is not bytes:
            frames[0] = bytes(frames[0])
        return frames

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbox = []
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task(self._loop):
            reader.cancel()
        self._comm.abort()

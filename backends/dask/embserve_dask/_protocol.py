"""The messages between a runtime and its Dask replicas, over one ``distributed.comm`` each.

One comm per replica carries every request in both directions, tagged with an id: the runtime's
calls to the replica, and the replica's calls back to the runtime (handles used inside a replica).
Payloads are :mod:`embserve.wire` frames wrapped as ``Serialized`` objects, so distributed sends
numpy buffers as frames of their own, without copying them into a pickle stream, and its
compression, frame splitting and TLS apply unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import itertools
import logging
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from distributed.comm.core import CommClosedError

from embserve import wire
from embserve.errors import ReplicaDiedError, attach_traceback

__all__ = ["Peer", "pack", "unpack"]

# distributed's serialization functions are untyped; they are used through these names. (The
# module is shadowed by a function of the same name in its package, hence import_module.)
_serialize = importlib.import_module("distributed.protocol.serialize")
Serialized: Any = _serialize.Serialized
_register_family: Any = _serialize.register_serialization_family

logger = logging.getLogger("embserve.dask")

#: Requests answered by a series of ``item`` messages and one ``end`` (or ``err``).
STREAM_OPS = frozenset({"stream", "submit_stream"})

_FAMILY = "embserve"


def _family_dumps(value: Any) -> tuple[dict[str, Any], list[Any]]:
    frames = wire.dumps(value)
    return {"serializer": _FAMILY}, [_flat(f) for f in frames]


def _family_loads(header: dict[str, Any], frames: list[Any]) -> Any:
    return wire.loads(list(frames))


def _flat(frame: bytes | memoryview | pickle.PickleBuffer) -> bytes | memoryview:
    if isinstance(frame, pickle.PickleBuffer):
        try:
            return frame.raw()
        except BufferError:  # not contiguous: one copy is the price of sending it at all
            return memoryview(frame).tobytes()
    return frame


# Registered on import, which happens in the runtime and in every worker that runs a replica
# task (unpickling the task imports this package), so both ends can read the other's frames.
_register_family(_FAMILY, _family_dumps, _family_loads)


def _encode(frames: list[Any]) -> dict[str, Any]:
    # A value without out-of-band buffers travels inline, as msgpack bytes: wrapping it as a
    # Serialized object costs several times more than the pickling itself.
    if len(frames) == 1:
        return {"b": frames[0]}
    return {"s": Serialized({"serializer": _FAMILY}, [_flat(f) for f in frames])}


def pack(value: Any) -> dict[str, Any]:
    """``value`` as message fields; large buffers become frames of their own."""
    return _encode(wire.dumps(value))


def pack_exception(exc: BaseException) -> dict[str, Any]:
    """An exception with its replica traceback (see :func:`embserve.wire.dumps_exception`)."""
    return _encode(wire.dumps_exception(exc))


def unpack(msg: dict[str, Any]) -> Any:
    """The value that :func:`pack` put into ``msg``."""
    inline = msg.get("b")
    if inline is not None:
        return pickle.loads(inline)
    payload = msg.get("s")
    if isinstance(payload, Serialized):  # in-process comms may leave it to us
        return _family_loads(payload.header, payload.frames)
    return payload


def unpack_exception(msg: dict[str, Any]) -> BaseException:
    """The exception of :func:`pack_exception`, its replica traceback attached."""
    exc, text = unpack(msg)
    attach_traceback(exc, text, note=True)
    assert isinstance(exc, BaseException)
    return exc


Unary = Callable[[str, Any], Awaitable[Any]]
Streaming = Callable[[str, Any], AsyncIterator[Any]]


class _Stream:
    """Items of one streaming request as they arrive."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()


class Peer:
    """One end of a replica's comm: sends requests, answers the other end's.

    ``serve`` answers unary requests and ``serve_stream`` streaming ones; both run as tasks of
    their own, so requests are served concurrently. When the comm closes every request still
    waiting fails with :class:`~embserve.ReplicaDiedError`: ``started=True`` when it was sent,
    ``started=False`` when it was still waiting to be written.

    A request or answer that is alone on the comm is written at once. Under load messages go
    out through one writer task that sends everything posted since its last write as one
    message, so each write and each read carries many: that is what makes 64 requests in flight
    cheap, and the direct write is what keeps one request alone as fast as a raw round trip.
    """

    def __init__(
        self,
        comm: Any,
        serve: Unary,
        serve_stream: Streaming,
        *,
        name: str,
    ) -> None:
        self.comm = comm
        self.name = name
        self.serve = serve
        self.serve_stream = serve_stream
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any] | _Stream] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self.closed = asyncio.Event()
        self.reason = ""
        self._outbox: list[dict[str, Any]] = []
        self._unsent: set[int] = set()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._writing = False

    # -- sending ------------------------------------------------------------------------

    def _post(self, msg: dict[str, Any], request_id: int | None = None) -> None:
        self._outbox.append(msg)
        if request_id is not None:
            self._unsent.add(request_id)
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_loop())

    async def _send(self, msg: dict[str, Any], request_id: int | None, *, alone: bool) -> None:
        if not alone or self._outbox or self._writing or self.closed.is_set():
            self._post(msg, request_id)
            return
        if request_id is not None:
            self._unsent.add(request_id)
        self._writing = True
        try:
            await self.comm.write(msg)
        except (CommClosedError, OSError) as exc:
            self.abort(f"writing to it failed ({exc or type(exc).__name__})")
            return
        finally:
            self._writing = False
            if self._outbox:
                self._wake.set()
        if request_id is not None:
            self._unsent.discard(request_id)

    async def _write_loop(self) -> None:
        while not self.closed.is_set():
            if not self._outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._writing:  # a direct write is under way; it wakes us when done
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._outbox = self._outbox, []
            self._writing = True
            try:
                await self.comm.write(batch[0] if len(batch) == 1 else {"op": "batch", "m": batch})
            except (CommClosedError, OSError) as exc:
                self.abort(f"writing to it failed ({exc or type(exc).__name__})")
                return
            finally:
                self._writing = False
            for msg in batch:
                self._unsent.discard(msg["id"])

    async def request(self, op: str, value: Any = None) -> Any:
        """Send a unary request and return its answer (or raise its error)."""
        if self.closed.is_set():
            raise ReplicaDiedError(f"{self.name} is gone: {self.reason}", started=False)
        request_id = next(self._ids)
        msg = {"op": op, "id": request_id, **pack(value)}  # unpicklable arguments raise here
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._send(msg, request_id, alone=len(self._waiting) == 1)
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(request_id, None) is not None:
                self._cancel_remote(request_id)
            raise

    async def stream(self, op: str, value: Any = None) -> AsyncIterator[Any]:
        """Send a streaming request and yield its items."""
        if self.closed.is_set():
            raise ReplicaDiedError(f"{self.name} is gone: {self.reason}", started=False)
        request_id = next(self._ids)
        msg = {"op": op, "id": request_id, **pack(value)}
        stream = _Stream()
        self._waiting[request_id] = stream
        await self._send(msg, request_id, alone=len(self._waiting) == 1)
        finished = False
        try:
            while True:
                kind, payload = await stream.queue.get()
                if kind == "item":
                    yield payload
                elif kind == "end":
                    finished = True
                    return
                else:
                    finished = True
                    raise payload
        finally:
            if self._waiting.pop(request_id, None) is not None and not finished:
                self._cancel_remote(request_id)

    def notify(self, op: str, value: Any = None) -> None:
        """Send a message that expects no answer."""
        if not self.closed.is_set():
            self._post({"op": op, "id": -1, **pack(value)})

    def _cancel_remote(self, request_id: int) -> None:
        if not self.closed.is_set():
            self._post({"op": "cancel", "id": request_id})

    # -- receiving ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read messages until the comm closes, then fail what still waits."""
        try:
            while True:
                msg = await self.comm.read()
                self._dispatch(msg)
        except (CommClosedError, OSError) as exc:
            self.reason = self.reason or f"connection closed ({exc or type(exc).__name__})"
        finally:
            self._close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "batch":
            for each in msg["m"]:
                self._dispatch(each)
            return
        request_id = msg["id"]
        if op in ("ok", "err", "item", "end"):
            waiter = self._waiting.get(request_id)
            if waiter is None:
                return  # the caller gave up on it
            # A value this process cannot unpickle fails its own request, not the comm.
            if isinstance(waiter, _Stream):
                payload: Any = None
                try:
                    if op == "err":
                        payload = unpack_exception(msg)
                    elif op == "item":
                        payload = unpack(msg)
                except Exception as exc:
                    op, payload = "err", exc
                waiter.queue.put_nowait((op, payload))
                return
            del self._waiting[request_id]
            if waiter.done():
                return
            try:
                if op == "ok":
                    waiter.set_result(unpack(msg))
                else:
                    waiter.set_exception(unpack_exception(msg))
            except Exception as exc:
                waiter.set_exception(exc)
        elif op == "cancel":
            task = self._serving.get(request_id)
            if task is not None:
                task.cancel()
        else:
            work = self._answer_stream if op in STREAM_OPS else self._answer
            task = asyncio.ensure_future(work(op, request_id, msg))
            if request_id >= 0:
                self._serving[request_id] = task
                task.add_done_callback(functools.partial(self._served, request_id))

    def _served(self, request_id: int, _: asyncio.Future[None]) -> None:
        self._serving.pop(request_id, None)

    async def _answer(self, op: str, request_id: int, msg: dict[str, Any]) -> None:
        try:
            result = await self.serve(op, unpack(msg))
            reply = {"op": "ok", "id": request_id, **pack(result)}
        except asyncio.CancelledError:
            return
        except Exception as exc:
            reply = {"op": "err", "id": request_id, **pack_exception(exc)}
        if request_id >= 0 and not self.closed.is_set():
            await self._send(reply, None, alone=len(self._serving) <= 1)

    async def _answer_stream(self, op: str, request_id: int, msg: dict[str, Any]) -> None:
        try:
            items = self.serve_stream(op, unpack(msg))
        except Exception as exc:
            await self._write_quietly({"op": "err", "id": request_id, **pack_exception(exc)})
            return
        try:
            async for item in items:
                self._post({"op": "item", "id": request_id, **pack(item)})
            reply: dict[str, Any] = {"op": "end", "id": request_id}
        except asyncio.CancelledError:
            return
        except Exception as exc:
            reply = {"op": "err", "id": request_id, **pack_exception(exc)}
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        await self._write_quietly(reply)

    async def _write_quietly(self, msg: dict[str, Any]) -> None:
        if not self.closed.is_set():
            self._post(msg)

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._wake.set()
        for request_id, waiter in self._waiting.items():
            started = request_id not in self._unsent
            if started:
                text = f"{self.name} died while serving the request: {self.reason}"
            else:
                text = f"{self.name} is unreachable ({self.reason}); the request was not sent"
            error = ReplicaDiedError(text, started=started)
            if isinstance(waiter, _Stream):
                waiter.queue.put_nowait(("err", error))
            elif not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()
        self._outbox.clear()
        for task in self._serving.values():
            task.cancel()

    def abort(self, reason: str) -> None:
        """Close the comm at once and fail every waiting request with ``reason``."""
        self.reason = self.reason or reason
        self.comm.abort()
        self._close()

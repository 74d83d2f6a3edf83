"""The main of a replica's worker process: one event loop, one :class:`ReplicaHost`, one channel.

The parent sends the replica's spec first; the worker builds the user object and then runs each
request as a task on its loop (sync user code in the host's threads, as in-thread replicas do).
Handles inside the worker reach the parent's runtime through :class:`ParentRuntime`, over the same
channel. The worker exits when told to stop, when its channel closes (the parent died), or when
its parent process is no longer its parent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from embserve._host import ReplicaHost
from embserve._loop import spawn_task
from embserve.context import ReplicaContext
from embserve.errors import (
    EmbserveError,
    attach_traceback,
    format_traceback,
    remote_traceback,
)
from embserve.handle import (
    Response,
    ResponseStream,
    register_submitter,
    resolve_responses,
    start_call,
)
from embserve.replica import ReplicaSpec
from embserve.request import Request
from embserve.wire import RemoteError
from embserve_process._channel import STREAM_WINDOW, Channel, Frame, decode

__all__ = ["ParentRuntime", "Pending", "error_payload", "load_error", "run_worker"]

# How often the worker checks that its parent is alive, besides noticing its channel close.
_PARENT_CHECK_S = 1.0


def error_payload(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """An exception as (type name, message, traceback text, pickled exception or None).

    Pickled apart from the rest, so that an exception the other side cannot rebuild still arrives
    as a :class:`~embserve.wire.RemoteError` with its type, message and traceback.
    """
    text = remote_traceback(exc) or format_traceback(exc)
    try:
        import cloudpickle

        blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        blob = None
    return type(exc).__qualname__, str(exc), text, blob


def load_error(payload: tuple[str, str, str, bytes | None]) -> BaseException:
    """The exception of :func:`error_payload`, with its remote traceback attached."""
    type_name, message, text, blob = payload
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob is not None else RemoteError(type_name, message)
    except Exception:
        exc = RemoteError(type_name, message)
    attach_traceback(exc, text, note=True)
    return exc


class Pending:
    """Calls and streams sent over a channel, by ident, until their answers come: what each side
    of a channel keeps for the requests it started (the runtime for its replica, a worker for
    the handle calls of its user code)."""

    def __init__(self) -> None:
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self.streams: dict[int, asyncio.Queue[tuple[str, Any]]] = {}

    def answer(self, outcome: str, ident: int, frames: list[Frame]) -> None:
        """Deliver an answer: ``outcome`` is "ok", "err" (frames of :func:`error_payload`),
        "item" or "end". A call is settled and forgotten; a stream gets ``(outcome, value)``."""
        try:
            value = decode(frames)
            if outcome == "err":
                value = load_error(value)
        except Exception as exc:  # an answer this process cannot unpickle
            outcome, value = "err", exc
        future = self.calls.pop(ident, None)
        if future is not None:
            if not future.done():
                if outcome == "ok":
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        queue = self.streams.get(ident)
        if queue is not None:
            queue.put_nowait((outcome, value))

    def fail_all(self, exc: BaseException) -> None:
        """End every call and stream waiting with ``exc`` (the other side is gone)."""
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(exc)
        for queue in self.streams.values():
            queue.put_nowait(("err", exc))


class ParentRuntime:
    """Stands in for the parent's runtime in a worker: handle calls go to it over the channel."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        self._loop = loop
        self._channel = channel
        self._ids = itertools.count(1)
        self._pending = Pending()

    def submit(self, request: Request) -> Response | ResponseStream:
        """Start ``request`` in the parent's runtime."""
        if request.stream:
            return ResponseStream(lambda: self._stream(request), self._loop)
        return start_call(self._loop, self._call(request))

    async def _call(self, request: Request) -> Any:
        args, kwargs = await resolve_responses(request.args, request.kwargs)
        request.args, request.kwargs = args, kwargs
        ident = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.calls[ident] = future
        try:
            self._channel.send("submit", ident, (request.target, request.to_wire()))
            return await future
        except asyncio.CancelledError:
            # Our own await cancelled the future: only an answer would have made it done.
            if future.cancelled():
                self._channel.send("sub_cancel", ident)
            raise
        finally:
            self._pending.calls.pop(ident, None)

    async def _stream(self, request: Request) -> AsyncIterator[Any]:
        args, kwargs = await resolve_responses(request.args, request.kwargs)
        request.args, request.kwargs = args, kwargs
        ident = next(self._ids)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pending.streams[ident] = queue
        finished = False
        try:
            self._channel.send("submit_stream", ident, (request.target, request.to_wire()))
            while True:
                kind, value = await queue.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            self._pending.streams.pop(ident, None)
            if not finished:
                self._channel.send("sub_cancel", ident)

    def answer(self, kind: str, ident: int, frames: list[Frame]) -> None:
        """Deliver the parent's answer (a ``sub_*`` message) to a call or stream started here."""
        self._pending.answer(kind.removeprefix("sub_"), ident, frames)

    def fail_all(self, exc: BaseException) -> None:
        """End every call and stream in flight with ``exc`` (the parent went away)."""
        self._pending.fail_all(exc)


class _Credit:
    # How many more items a stream may send before its consumer asks for more.

    __slots__ = ("granted", "left")

    def __init__(self) -> None:
        self.left = STREAM_WINDOW
        self.granted = asyncio.Event()


class _Worker:
    def __init__(self, sock: socket.socket, parent_pid: int) -> None:
        self._sock = sock
        self._parent_pid = parent_pid
        self._host: ReplicaHost | None = None
        self._tasks: dict[int, asyncio.Future[Any]] = {}
        self._credits: dict[int, _Credit] = {}
        self._runtime: ParentRuntime | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._channel = Channel(loop, self._sock, self._on_message, self._on_closed)
        self._runtime = ParentRuntime(loop, self._channel)
        check = loop.call_later(_PARENT_CHECK_S, self._check_parent)
        try:
            await self._done
        finally:
            check.cancel()
            for task in self._tasks.values():
                task.cancel()
            if self._host is not None:
                self._host.close()
            self._channel.close()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _check_parent(self) -> None:
        if os.getppid() != self._parent_pid:
            self._finish()
        else:
            asyncio.get_running_loop().call_later(_PARENT_CHECK_S, self._check_parent)

    def _on_closed(self, reason: str) -> None:
        if self._runtime is not None:
            self._runtime.fail_all(EmbserveError(f"the parent runtime went away: {reason}"))
        self._finish()

    def _on_message(self, kind: str, ident: int, frames: list[Frame]) -> None:
        if kind in ("call", "stream", "health", "reconfigure"):
            self._spawn(ident, self._serve_request(kind, ident, frames))
        elif kind == "more":
            credit = self._credits.get(ident)
            if credit is not None:
                credit.left += decode(frames)
                credit.granted.set()
        elif kind == "cancel":
            task = self._tasks.get(ident)
            if task is not None:
                task.cancel()
        elif kind.startswith("sub_"):
            assert self._runtime is not None
            self._runtime.answer(kind, ident, frames)
        elif kind == "start":
            self._spawn(0, self._start(frames))
        elif kind == "stop":
            self._finish()

    def _spawn(self, ident: int, coro: Coroutine[Any, Any, None]) -> None:
        task = spawn_task(self._loop, coro)
        if task is None:
            return
        self._tasks[ident] = task
        task.add_done_callback(lambda _: self._tasks.pop(ident, None))

    async def _start(self, frames: list[Frame]) -> None:
        try:
            spec, context = decode(frames)
            assert isinstance(spec, ReplicaSpec) and isinstance(context, ReplicaContext)
            pid = os.getpid()
            context = dataclasses.replace(
                context, worker=str(pid), extra={**context.extra, "pid": pid}
            )
            if spec.runtime_id and self._runtime is not None:
                register_submitter(spec.runtime_id, self._runtime)
            host = ReplicaHost(spec, context)
            await host.start()
        except Exception as exc:
            self._channel.send("start_failed", 0, error_payload(exc))
            return
        self._host = host
        self._channel.send("started", 0, os.getpid())

    async def _serve_request(self, kind: str, ident: int, frames: list[Frame]) -> None:
        host = self._host
        try:
            if host is None:
                raise RuntimeError("the replica has not started")
            payload = decode(frames)
            if kind == "call":
                result = await host.call(Request.from_wire(host.spec.deployment, payload))
            elif kind == "stream":
                request = Request.from_wire(host.spec.deployment, payload)
                credit = self._credits[ident] = _Credit()
                try:
                    async for item in host.stream(request):
                        while credit.left <= 0:
                            credit.granted.clear()
                            await credit.granted.wait()
                        credit.left -= 1
                        self._channel.send("item", ident, item)
                finally:
                    del self._credits[ident]
                self._channel.send("end", ident)
                return
            elif kind == "health":
                await host.check_health()
                result = None
            else:
                await host.reconfigure(payload)
                result = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._channel.send("err", ident, error_payload(exc))
            return
        try:
            self._channel.send("ok", ident, result)
        except Exception as exc:  # the result cannot be pickled: say so, as the caller's error
            attach_traceback(exc)
            self._channel.send("err", ident, error_payload(exc))


class _PollingSelector(selectors.DefaultSelector):
    # Polls for up to `poll_s` before each sleep. Waking a sleeping process costs about as much
    # as a whole call does, and the next request of a busy caller mostly comes within that time.
    # An idle worker sleeps as before, after one such poll.

    def __init__(self, poll_s: float) -> None:
        super().__init__()
        self._poll_s = poll_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        clock = time.monotonic
        start = clock()
        deadline = start + (self._poll_s if timeout is None else min(self._poll_s, timeout))
        while True:
            ready = super().select(0)
            if ready:
                return ready
            now = clock()
            if now >= deadline:
                break
        if timeout is not None:
            timeout = max(0.0, timeout - (now - start))
        return super().select(timeout)


def run_worker(
    sock: socket.socket, gpu_ids: str | None, parent_pid: int, poll_s: float = 0.0
) -> None:
    """The worker process's target: serve one replica over ``sock`` until told to stop.

    ``poll_s``: how long the worker's loop polls for work before each sleep (0: it never polls).
    """
    # Before any user module is unpickled: CUDA reads this once, when it initialises.
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    # Not asyncio.run: its clean-up waits for executor threads, and a thread stuck in user code
    # must not keep a stopped replica's process alive.
    if poll_s > 0:
        loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(_PollingSelector(poll_s))
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_Worker(sock, parent_pid).serve())
    except BaseException:
        code = 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

"""The caller's side of the protocol: :class:`RemoteReplica`, a replica reached over a transport.

One :class:`~embserve._remote.pending.Pending` registry holds every request in flight; the fast
send path settles the caller's future straight from the answer; streams grant credit as they
are read; the handle calls made by user code inside the replica run in this process's runtime
(:class:`~embserve._remote.forwarding.Forwarder`). When the transport closes, every request in
flight fails with :class:`~embserve.ReplicaDiedError` (``started=True``) and later ones fail
with ``started=False``, which the router retries elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from embserve._loop import poll_while
from embserve._remote.codec import (
    Frame,
    decode,
    decode_error,
    encode_code,
    find_unpicklable,
)
from embserve._remote.direct import DirectLine
from embserve._remote.forwarding import Forwarder
from embserve._remote.messages import (
    CALL,
    CANCEL,
    END,
    ENDED,
    HEALTH,
    MORE,
    NOTICE,
    OK,
    RECONFIGURE,
    START,
    START_FAILED,
    STARTED,
    STATS,
    STOP,
    STREAM,
    SUB_CANCEL,
    SUB_MORE,
    SUBMIT,
    SUBMIT_STREAM,
    name_of,
)
from embserve._remote.pending import Pending
from embserve._remote.transport import Transport
from embserve.context import ReplicaContext
from embserve.errors import DeploymentFailedError, ReplicaDiedError
from embserve.handle import Submitter, find_submitter
from embserve.metrics import ReplicaStats
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.request import Request

__all__ = ["RemoteReplica", "encode_start"]

logger = logging.getLogger("embserve.remote")

# How long stop() waits for the replica to close its end before closing ours.
_STOP_TIMEOUT_S = 5.0
# How long a thread whose direct line broke waits for the loop to learn why (an exit code).
_LOST_WAIT_S = 1.0


def encode_start(spec: ReplicaSpec, context: ReplicaContext) -> list[Frame]:
    """The payload of ``START``: user code by reference where the other side can import it
    (given this process's ``sys.path``), by value where it cannot (``__main__``, notebooks);
    see :func:`~embserve._remote.codec.encode_code`. Raises
    :class:`~embserve.DeploymentFailedError`, naming the piece that cannot be pickled and what
    to do about it, when the deployment cannot be sent, before anything was started for it."""
    try:
        return encode_code((spec, context))
    except Exception as exc:
        raise DeploymentFailedError(_cannot_send(spec, exc)) from exc


def _cannot_send(spec: ReplicaSpec, exc: Exception) -> str:
    prefix = f"deployment {spec.deployment!r} cannot be sent to its replica"
    arguments = [(f"constructor argument {i}", a) for i, a in enumerate(spec.init_args)]
    arguments += [(f"constructor argument {k!r}", a) for k, a in spec.init_kwargs.items()]
    arguments.append(("its user_config", spec.config.user_config))
    code = find_unpicklable([("its code", spec.target)])
    if code is not None and code[1] is not spec.target:
        what, value, error = code
        fix = (
            "create it in __init__ instead (or define the deployment in an importable module: "
            "its replica then imports it rather than receiving it by value)"
        )
    else:
        found = find_unpicklable(arguments)
        if found is None:
            return f"{prefix}: {type(exc).__name__}: {exc}"
        what, value, error = found
        fix = "pass what it is made from (a path, its settings) and create it in __init__"
    kind = type(value)
    kind_name = kind.__qualname__
    if kind.__module__ != "builtins":
        kind_name = f"{kind.__module__}.{kind_name}"
    return (
        f"{prefix}: {what} is a {kind_name}, which cannot be "
        f"pickled ({type(error).__name__}: {error}); {fix}"
    )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RemoteReplica(Replica):
    """A replica that runs elsewhere (another process, another machine), reached over a
    :class:`~embserve._remote.transport.Transport`.

    A backend subclasses it for what is its own (starting and stopping the process, why it
    died): it makes a transport, :meth:`connect`\\ s it, and awaits :meth:`begin`. Everything
    runs on the runtime's event loop.

    Args:
        spec: the replica's spec (its id, deployment, and the runtime its handles call).
        submitter: where handle calls made inside the replica go (default: the runtime
            registered in this process under ``spec.runtime_id``).
    """

    def __init__(self, spec: ReplicaSpec, *, submitter: Submitter | None = None) -> None:
        super().__init__(spec.replica_id, spec.deployment)
        self.spec = spec
        self._loop = asyncio.get_running_loop()
        self._submitter = submitter
        self._transport: Transport | None = None
        self._pending: Pending | None = None
        self._line: DirectLine | None = None
        self._forwarder: Forwarder | None = None
        self._started: asyncio.Future[Any] = self._loop.create_future()
        # A start abandoned (its deployment deleted meanwhile) leaves no one to read its error.
        self._started.add_done_callback(_retrieve)
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self.dead_reason: str | None = None
        self._line_lost = threading.Event()  # set with dead_reason, for threads on the line
        self.stopping = False

    # -- connecting -----------------------------------------------------------------------

    def connect(self, transport: Transport, *, poll_s: float = 0.0) -> None:
        """Talk to the replica over ``transport`` from now on (once).

        ``poll_s``: while answers are due, the runtime's loop polls this long for them before
        it sleeps (see :func:`~embserve._loop.poll_while`; not on a loop without a selector,
        such as uvloop's): a replica that answers within it spares the loop's thread a
        wake-up, which costs about as much as the call. 0 (the default): it never polls.
        """
        self._transport = transport
        self._pending = Pending(transport, cancel=CANCEL, more=MORE, gone=self._gone, poll_s=poll_s)
        poll_while(self._loop, self._pending)
        self._forwarder = forwarder = Forwarder(transport, self._find_submitter)
        pending = self._pending
        self._answer = pending.answer
        self._handlers: dict[int, Callable[[int, list[Frame]], None]] = {
            ENDED: lambda ident, frames: pending.ended(ident),
            SUBMIT: lambda ident, frames: forwarder.submit(ident, frames, stream=False),
            SUBMIT_STREAM: lambda ident, frames: forwarder.submit(ident, frames, stream=True),
            SUB_CANCEL: lambda ident, frames: forwarder.cancel(ident),
            SUB_MORE: forwarder.more,
            STARTED: self._on_started,
            START_FAILED: self._on_start_failed,
            NOTICE: self._on_notice,
        }
        transport.start(self._on_message, self._on_closed)

    def connect_line(self, sock: socket.socket) -> None:
        """Take plain threads' calls on ``sock`` too, a connected socket whose other end the
        replica's side serves with :meth:`ReplicaServer.add_line
        <embserve._remote.server.ReplicaServer.add_line>`: a thread that calls sends its
        request and reads the answer itself (see :class:`~embserve._remote.direct.DirectLine`),
        one thread at a time. A backend that connects a line says so with ``direct_calls``."""
        self._line = DirectLine(sock, self._line_gone)

    async def begin(self, start: list[Frame]) -> Any:
        """Send ``START`` (the frames of :func:`encode_start`) and wait until the user object
        is built; returns what the replica said about itself. Raises
        :class:`~embserve.DeploymentFailedError` when it failed, or the replica died, first."""
        assert self._transport is not None, "connect() first"
        self._transport.send(START, 0, start)
        info = await asyncio.shield(self._started)
        self.state = ReplicaState.RUNNING
        return info

    def _find_submitter(self) -> Submitter | None:
        return self._submitter or find_submitter(self.spec.runtime_id)

    def _gone(self, started: bool) -> ReplicaDiedError:
        if started:
            reason = self.dead_reason or "its connection closed"
            return ReplicaDiedError(f"replica {self.replica_id} died: {reason}", started=True)
        reason = self.dead_reason or ("it is stopped" if self.stopping else "its connection broke")
        return ReplicaDiedError(f"replica {self.replica_id} is gone: {reason}", started=False)

    def _line_gone(self, started: bool) -> ReplicaDiedError:
        # In the thread whose call the line failed: the loop mostly learns why a moment later.
        self._line_lost.wait(_LOST_WAIT_S)
        return self._gone(started)

    def _alive(self) -> Pending:
        pending = self._pending
        if pending is None or self.dead_reason is not None or pending.transport.closed:
            raise self._gone(False)
        return pending

    # -- requests -------------------------------------------------------------------------

    async def call(self, request: Request) -> Any:
        return await self._alive().call(CALL, request.to_wire(), request.lease)

    def send(self, request: Request, future: asyncio.Future[Any]) -> Callable[[], None] | None:
        pending = self._pending
        if pending is None or self.dead_reason is not None:
            return None
        return pending.send(CALL, request.to_wire(), future, request.lease)

    def run_here(self, request: Request) -> Callable[[], Any] | None:
        line = self._line
        if line is None or self.dead_reason is not None or not line.claim():
            return None  # no line, or another thread's call is on it
        return functools.partial(line.call, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        items = self._alive().stream(STREAM, request.to_wire(), request.lease)
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

    async def check_health(self) -> None:
        await self._alive().call(HEALTH, None)

    async def reconfigure(self, user_config: Any) -> None:
        await self._alive().call(RECONFIGURE, user_config)

    async def stats(self) -> ReplicaStats | None:
        stats = await self._alive().call(STATS, None)
        return stats if isinstance(stats, ReplicaStats) else None

    async def stop(self) -> None:
        """Ask the replica to stop and wait (a while) until it closed its end."""
        self.state = ReplicaState.STOPPED
        self.stopping = True
        if not self.send_stop():
            self.lose("it was stopped")
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), _STOP_TIMEOUT_S)
        self.lose("it was stopped")

    def send_stop(self) -> bool:
        """Ask the replica to stop (``STOP``); False when it cannot hear any more."""
        transport = self._transport
        if transport is None or transport.closed:
            return False
        transport.send(STOP, 0)
        return True

    # -- messages and the end of the connection -------------------------------------------

    def _on_message(self, kind: int, ident: int, frames: list[Frame]) -> None:
        if OK <= kind <= END:  # OK, ERR, ITEM, END: answers, nearly every message
            self._answer(kind, ident, frames)
            return
        handler = self._handlers.get(kind)
        if handler is None:
            logger.warning("replica %s sent an unexpected %r", self.replica_id, name_of(kind))
            return
        handler(ident, frames)

    def _on_started(self, ident: int, frames: list[Frame]) -> None:
        if not self._started.done():
            self._started.set_result(decode(frames))

    def _on_start_failed(self, ident: int, frames: list[Frame]) -> None:
        error = decode_error(frames)
        if self._started.done():
            return
        if isinstance(error, DeploymentFailedError):
            failure = DeploymentFailedError(str(error))
        else:
            failure = DeploymentFailedError(
                f"deployment {self.deployment!r} failed to start in its replica: "
                f"{type(error).__name__}: {error}"
            )
        self._started.set_exception(failure)

    def _on_notice(self, ident: int, frames: list[Frame]) -> None:
        try:
            value = decode(frames)
        except Exception:  # a notice this process cannot read: the replica itself is fine
            logger.exception("replica %s sent a notice that cannot be read", self.replica_id)
            return
        self.on_notice(value)

    def on_notice(self, value: Any) -> None:
        """The replica's side sent ``value`` unasked (``NOTICE``; see
        :meth:`ReplicaServer.notify <embserve._remote.server.ReplicaServer.notify>`). Ignored by
        default; a backend whose replicas say things of their own (a Dask worker closing)
        overrides this. Runs on the runtime's loop, in the order the notices were sent."""
        logger.debug("replica %s sent a notice: %r", self.replica_id, value)

    def _on_closed(self, reason: str) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self.connection_lost(reason)

    def connection_lost(self, reason: str) -> None:
        """The transport closed (``reason`` in words). By default the replica is lost at once;
        a backend that can say more (an exit code) overrides this and calls :meth:`lose`."""
        self.lose(reason)

    def lose(self, reason: str) -> bool:
        """The replica is gone for ``reason``: close the transport, fail what is in flight, and
        call :meth:`died` unless it was stopping. False when it was lost already."""
        if self.dead_reason is not None:
            return False
        self.dead_reason = reason
        self._line_lost.set()
        if not self._closed.done():
            self._closed.set_result(None)
        if self._transport is not None:
            self._transport.close()
        if self._line is not None:
            self._line.close()
        if self._pending is not None:
            self._pending.fail_all()
        if self._forwarder is not None:
            self._forwarder.close()
        if not self._started.done():
            self._started.set_exception(
                DeploymentFailedError(
                    f"deployment {self.deployment!r}: replica {self.replica_id} "
                    f"died while starting: {reason}"
                )
            )
        elif not self.stopping and self.state is not ReplicaState.STOPPED:
            self.died(reason)
        return True

    def died(self, reason: str) -> None:
        """Called once when a running replica was lost without being stopped; a backend tells
        its runtime (:meth:`Backend.on_replica_died <embserve.backends.Backend>`) here."""

"""The replica's side of the protocol: :class:`ReplicaServer`, serving one
:class:`~embserve._host.ReplicaHost` over a transport.

It builds the host from ``START``, runs each request as a task on its loop (sync user code in
the host's threads, as in-thread replicas do), answers exactly once per request, keeps streams
within the credit the caller grants, answers every ``CANCEL`` with one ``ENDED`` once the work
really ended, and registers a :class:`~embserve._remote.submitter.RemoteSubmitter` so that
handles used by user code reach the caller's runtime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn

from embserve._host import ReplicaHost
from embserve._loop import spawn_task
from embserve._remote.codec import Frame, decode, encode, encode_error
from embserve._remote.credit import Credit
from embserve._remote.messages import (
    CALL,
    CANCEL,
    END,
    ENDED,
    ERR,
    HEALTH,
    ITEM,
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
    SUB_END,
    SUB_ERR,
    SUB_ITEM,
    SUB_OK,
)
from embserve._remote.submitter import RemoteSubmitter
from embserve._remote.transport import Transport
from embserve._remote.work import WorkLease
from embserve.context import ReplicaContext
from embserve.errors import attach_traceback
from embserve.handle import find_submitter, register_submitter, unregister_submitter
from embserve.replica import ReplicaSpec
from embserve.request import Request

__all__ = ["ReplicaServer", "run_replica_process"]


class ReplicaServer:
    """Serves one replica over ``transport`` until told to stop or the transport closes.

    Args:
        transport: the connection to the caller (not started yet).
        worker: where the replica runs, for its :class:`~embserve.ReplicaContext`
            (``context.worker``), e.g. a process id or a worker address.
        info: what the replica tells the caller about itself once started (``STARTED``),
            added to its context's ``extra`` too.
        gpu_ids: the GPUs this process sees, for its context's ``gpu_ids``, when this side
            knows them better than the caller does (None: the caller's context says).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        worker: str = "",
        info: Mapping[str, Any] | None = None,
        gpu_ids: Sequence[str] | None = None,
    ) -> None:
        self._transport = transport
        self._worker = worker
        self._info = dict(info or {})
        self._gpu_ids = None if gpu_ids is None else tuple(gpu_ids)
        self.host: ReplicaHost | None = None
        # Requests whose task is running: the task, and its request (health checks have none).
        self._work: dict[int, tuple[asyncio.Future[None], Request | None]] = {}
        self._cancelled: dict[int, WorkLease] = {}
        self._credits: dict[int, Credit] = {}
        self._runtime_id = ""
        self._done: asyncio.Future[None] | None = None
        self._stopping = False
        self.closes_host = True
        self._lines: list[ReplicaServer] = []

    def add_line(self, transport: Transport) -> None:
        """Serve the calls that arrive on ``transport`` too, on this server's replica, each
        answered there: the replica's side of a direct line (see
        :class:`~embserve._remote.direct.DirectLine`), on which a caller's thread sends a call
        and reads its answer itself. Call before :meth:`serve`, which serves the line until
        this server ends (the line closing ends only the line)."""
        line = ReplicaServer(transport, worker=self._worker, info=self._info, gpu_ids=self._gpu_ids)
        line.closes_host = False
        self._lines.append(line)

    async def serve(self) -> None:
        """Serve until ``STOP``, :meth:`stop` or the end of the connection; then cancel what
        runs, close the host (threads inside user code are left to finish alone) and the
        transport."""
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self._stopping:  # stopped before it began
            self._done.set_result(None)
        self.submitter = submitter = RemoteSubmitter(loop, self._transport)
        answer = submitter.pending.answer
        self._handlers: dict[int, Callable[[int, list[Frame]], None]] = {
            CALL: self._on_call,
            STREAM: self._on_stream,
            HEALTH: self._on_health,
            STATS: self._on_stats,
            RECONFIGURE: self._on_reconfigure,
            CANCEL: self._on_cancel,
            MORE: self._on_more,
            SUB_OK: lambda ident, frames: answer(OK, ident, frames),
            SUB_ERR: lambda ident, frames: answer(ERR, ident, frames),
            SUB_ITEM: lambda ident, frames: answer(ITEM, ident, frames),
            SUB_END: lambda ident, frames: answer(END, ident, frames),
            ENDED: lambda ident, frames: submitter.pending.ended(ident),
            START: self._on_start,
            STOP: lambda ident, frames: self.stop(),
        }
        self._transport.start(self._on_message, self._on_closed)
        lines = [asyncio.ensure_future(line.serve()) for line in self._lines]
        try:
            await self._done
        finally:
            for line in self._lines:
                line.stop()
            for task, _ in list(self._work.values()):
                task.cancel()
            if self.host is not None and self.closes_host:  # False: the host serves others
                self.host.close()
            self._transport.close()
            if self._runtime_id and find_submitter(self._runtime_id) is submitter:
                unregister_submitter(self._runtime_id)
            await asyncio.gather(*lines, return_exceptions=True)

    def notify(self, value: Any) -> None:
        """Tell the caller ``value`` unasked (``NOTICE``; its
        :meth:`~embserve._remote.caller.RemoteReplica.on_notice` gets it), e.g. that the
        machine this replica runs on is closing. Runs on the server's loop; does nothing once
        the connection is closed. Raises what pickling ``value`` raises."""
        self._transport.send(NOTICE, 0, encode(value))

    def stop(self) -> None:
        """Stop serving (the caller asked, or it is gone)."""
        self._stopping = True
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _on_closed(self, reason: str) -> None:
        self.submitter.lost_reason = reason
        self.submitter.pending.fail_all()
        self.stop()

    def _on_message(self, kind: int, ident: int, frames: list[Frame]) -> None:
        if kind == CALL:  # nearly every message
            self._on_call(ident, frames)
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(ident, frames)

    # -- starting -------------------------------------------------------------------------

    def _on_start(self, ident: int, frames: list[Frame]) -> None:
        self._spawn(0, self._start(frames), None)

    async def _start(self, frames: list[Frame]) -> None:
        try:
            spec, context = decode(frames)
            assert isinstance(spec, ReplicaSpec) and isinstance(context, ReplicaContext)
            context = dataclasses.replace(
                context,
                worker=self._worker or context.worker,
                gpu_ids=context.gpu_ids if self._gpu_ids is None else self._gpu_ids,
                extra={**context.extra, **self._info},
            )
            if spec.runtime_id:
                self._runtime_id = spec.runtime_id
                register_submitter(spec.runtime_id, self.submitter)
            host = ReplicaHost(spec, context)
            await host.start()
        except Exception as exc:
            self._transport.send(START_FAILED, 0, encode_error(exc))
            return
        self.host = host
        for line in self._lines:
            line.host = host
        self._transport.send(STARTED, 0, encode(self._info))

    # -- requests -------------------------------------------------------------------------

    def _request(self, ident: int, frames: list[Frame]) -> tuple[ReplicaHost, Request] | None:
        # The request of a CALL or STREAM, or None when it failed at once (answered with ERR).
        try:
            host = self.host
            if host is None:
                raise RuntimeError("the replica has not started")
            return host, Request.from_wire(host.spec.deployment, decode(frames))
        except Exception as exc:
            self._transport.send(ERR, ident, encode_error(exc))
            return None

    def _on_call(self, ident: int, frames: list[Frame]) -> None:
        found = self._request(ident, frames)
        if found is not None:
            host, request = found
            # A batched method: the request waits in its batch with no task of its own, and
            # the batch's end sends every answer in one pass (see _Reply).
            reply = _Reply(self, ident, loop=self._loop)
            withdraw = host.send(request, reply)
            if withdraw is not None:
                reply.withdraw = withdraw
                self._work[ident] = (reply, request)
                return
            self._spawn(ident, self._answer(ident, host.call(request)), request)

    def _on_health(self, ident: int, frames: list[Frame]) -> None:
        if self.host is not None:
            self._spawn(ident, self._answer(ident, self.host.check_health()), None)
        else:
            self._transport.send(ERR, ident, encode_error(RuntimeError("not started")))

    def _on_stats(self, ident: int, frames: list[Frame]) -> None:
        if self.host is None:
            self._transport.send(ERR, ident, encode_error(RuntimeError("not started")))
            return
        self._transport.send(OK, ident, encode(self.host.stats()))

    def _on_reconfigure(self, ident: int, frames: list[Frame]) -> None:
        if self.host is None:
            self._transport.send(ERR, ident, encode_error(RuntimeError("not started")))
            return
        try:
            user_config = decode(frames)
        except Exception as exc:
            self._transport.send(ERR, ident, encode_error(exc))
            return
        self._spawn(ident, self._answer(ident, self.host.reconfigure(user_config)), None)

    async def _answer(self, ident: int, work: Coroutine[Any, Any, Any]) -> None:
        send = self._transport.send
        try:
            result = await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            send(ERR, ident, encode_error(exc))
            return
        try:
            frames = encode(result)
        except Exception as exc:  # the result cannot be pickled: the caller's error says so
            attach_traceback(exc)
            send(ERR, ident, encode_error(exc))
            return
        send(OK, ident, frames)

    def _on_stream(self, ident: int, frames: list[Frame]) -> None:
        found = self._request(ident, frames)
        if found is not None:
            host, request = found
            self._spawn(ident, self._stream(ident, host, request), request)

    async def _stream(self, ident: int, host: ReplicaHost, request: Request) -> None:
        send = self._transport.send
        credit = self._credits[ident] = Credit()
        try:
            async for item in host.stream(request):
                await credit.take()
                send(ITEM, ident, encode(item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the generator raised, or an item cannot be pickled
            attach_traceback(exc)
            send(ERR, ident, encode_error(exc))
            return
        finally:
            del self._credits[ident]
        send(END, ident)

    def _on_more(self, ident: int, frames: list[Frame]) -> None:
        credit = self._credits.get(ident)
        if credit is not None:
            credit.grant(decode(frames))

    # -- cancelling and the end of the work -----------------------------------------------

    def _spawn(self, ident: int, coro: Coroutine[Any, Any, None], request: Request | None) -> None:
        task = spawn_task(self._loop, coro)
        if task is None:  # over in its first step, answer sent
            return
        self._work[ident] = (task, request)
        task.add_done_callback(functools.partial(self._work_done, ident))

    def _on_cancel(self, ident: int, frames: list[Frame]) -> None:
        work = self._work.get(ident)
        if work is None:  # answered already (the answer and the cancel crossed)
            self._transport.send(ENDED, ident)
            return
        task, request = work
        # Given to the request before its task is cancelled, so that the host holds it if its
        # sync code runs on in a thread; ENDED goes once the task and every hold are over.
        lease = WorkLease(functools.partial(self._transport.send, ENDED, ident))
        self._cancelled[ident] = lease
        if request is not None:
            request.lease = lease
        task.cancel()

    def _work_done(self, ident: int, _: asyncio.Future[None]) -> None:
        self._work.pop(ident, None)
        lease = self._cancelled.pop(ident, None)
        if lease is not None:
            lease.release()


class _Reply(asyncio.Future):  # type: ignore[type-arg]
    # The future a batched request's batch settles: settling it sends the answer at once.
    # Cancelling it (the caller's CANCEL) withdraws the request from its batch and ends its
    # work there, as cancelling a request's task would.

    __slots__ = ("_ident", "_server", "withdraw")

    def __init__(
        self, server: ReplicaServer, ident: int, *, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(loop=loop)
        self._server = server
        self._ident = ident
        self.withdraw: Callable[[], None] | None = None

    # Settled, it lets go of its withdraw function (the batch's queue entry, which holds this
    # future: a cycle only the garbage collector would free otherwise).

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self.withdraw = None
        server, ident = self._server, self._ident
        try:
            frames = encode(result)
        except Exception as exc:  # the result cannot be pickled: the caller's error says so
            attach_traceback(exc)
            server._transport.send(ERR, ident, encode_error(exc))
        else:
            server._transport.send(OK, ident, frames)
        server._work_done(ident, self)

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self.withdraw = None
        self.exception()  # retrieved: it goes to the caller, not to the loop's log
        error = exception if isinstance(exception, BaseException) else exception()
        self._server._transport.send(ERR, self._ident, encode_error(error))
        self._server._work_done(self._ident, self)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.withdraw is not None:
            self.withdraw()
            self.withdraw = None
        self._server._work_done(self._ident, self)
        return True


def run_replica_process(main: Callable[[], object]) -> NoReturn:
    """Run a replica process's ``main``, then end the process at once: exit code 0, or 1 with
    the traceback on stderr.

    ``os._exit``, not the interpreter's clean-up (nor ``asyncio.run``'s), which would wait for
    executor threads: a thread stuck in user code must not keep a stopped replica alive.
    """
    code = 0
    try:
        main()
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

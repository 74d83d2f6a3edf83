"""The caller's side of handle calls made inside a remote replica.

User code in a replica that calls a handle sends ``SUBMIT`` (or ``SUBMIT_STREAM``) with the
call's target and wire form; the caller rebuilds the :class:`~embserve.request.Request` and runs
it through the runtime of this process (:func:`embserve.handle.find_submitter`), like any other
call, and sends the outcome back as ``SUB_OK``/``SUB_ERR`` or ``SUB_ITEM``\\ s and ``SUB_END``,
never more items ahead than the replica granted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from embserve._remote.codec import Frame, decode, encode, encode_error
from embserve._remote.credit import Credit
from embserve._remote.messages import SUB_END, SUB_ERR, SUB_ITEM, SUB_OK
from embserve._remote.transport import Transport
from embserve.errors import EmbserveError, attach_traceback
from embserve.handle import Submitter
from embserve.request import Request

__all__ = ["Forwarder"]


class Forwarder:
    """Runs the replica's handle calls in this process's runtime, each as a task of its own.

    ``find`` gives the runtime (None when it is not running any more). Runs on the loop of
    ``transport``.
    """

    def __init__(self, transport: Transport, find: Callable[[], Submitter | None]) -> None:
        self._transport = transport
        self._find = find
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._credits: dict[int, Credit] = {}

    def submit(self, ident: int, frames: list[Frame], *, stream: bool) -> None:
        """Start the handle call ``ident`` of the replica."""
        task = asyncio.get_running_loop().create_task(self._run(ident, frames, stream))
        self.tasks[ident] = task
        task.add_done_callback(lambda _: self.tasks.pop(ident, None))

    def cancel(self, ident: int) -> None:
        """The replica gave up on call ``ident``."""
        task = self.tasks.get(ident)
        if task is not None:
            task.cancel()

    def more(self, ident: int, frames: list[Frame]) -> None:
        """The replica took items of stream ``ident``: it may have as many more."""
        credit = self._credits.get(ident)
        if credit is not None:
            credit.grant(decode(frames))

    def close(self) -> None:
        """Cancel every call in flight (the replica is gone)."""
        for task in list(self.tasks.values()):
            task.cancel()

    async def _run(self, ident: int, frames: list[Frame], stream: bool) -> None:
        send = self._transport.send
        try:
            target, wire = decode(frames)
            request = Request.from_wire(target, wire)
            request.stream = stream
            runtime = self._find()
            if runtime is None:
                raise EmbserveError(f"the runtime of handle target {target!r} is not running")
            if not stream:
                result = await runtime.submit(request)
                try:
                    send(SUB_OK, ident, encode(result))
                except Exception as exc:  # a result the replica cannot be sent
                    attach_traceback(exc)
                    send(SUB_ERR, ident, encode_error(exc))
                return
            credit = self._credits[ident] = Credit()
            items = runtime.submit(request)
            finished = False
            try:
                async for item in items:
                    await credit.take()
                    send(SUB_ITEM, ident, encode(item))
                finished = True
            finally:
                del self._credits[ident]
                if not finished:  # the replica gave up, or an item failed: stop the stream now
                    items.cancel()
            send(SUB_END, ident)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            send(SUB_ERR, ident, encode_error(exc))

"""The replica's side of handle calls: a stand-in for the runtime its handles belong to.

Inside a remote replica, :class:`RemoteSubmitter` is registered under the runtime's id
(:func:`embserve.handle.register_submitter`), so that a handle unpickled there (a constructor
argument, for composition) sends its calls over the replica's transport to the caller's
runtime. Its calls and streams are kept in a :class:`~embserve._remote.pending.Pending` of
their own; streams grant credit as they are read, as the caller's do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from embserve._remote.messages import SUB_CANCEL, SUB_MORE, SUBMIT, SUBMIT_STREAM
from embserve._remote.pending import Pending
from embserve._remote.transport import Transport
from embserve.errors import EmbserveError
from embserve.handle import Response, ResponseStream, resolve_responses, start_call
from embserve.request import Request

__all__ = ["RemoteSubmitter"]


class RemoteSubmitter:
    """Sends the handle calls of user code in this replica to the caller's runtime.

    :meth:`submit` may be called from any thread (sync user code runs in the replica's threads);
    the calls themselves run on ``loop``, the transport's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: Transport) -> None:
        self._loop = loop
        self.pending = Pending(transport, cancel=SUB_CANCEL, more=SUB_MORE, gone=self._gone)
        self.lost_reason = "its connection closed"

    def _gone(self, started: bool) -> EmbserveError:
        return EmbserveError(f"the runtime this replica belongs to went away: {self.lost_reason}")

    def submit(self, request: Request) -> Response | ResponseStream:
        """Start ``request`` in the caller's runtime."""
        if request.stream:
            return ResponseStream(lambda: self._stream(request), self._loop)
        return start_call(self._loop, self._call(request))

    async def _call(self, request: Request) -> Any:
        # Responses among the arguments are this process's futures: only their results travel.
        args, kwargs = await resolve_responses(request.args, request.kwargs)
        request.args, request.kwargs = args, kwargs
        return await self.pending.call(SUBMIT, (request.target, request.to_wire()))

    async def _stream(self, request: Request) -> AsyncIterator[Any]:
        args, kwargs = await resolve_responses(request.args, request.kwargs)
        request.args, request.kwargs = args, kwargs
        items = self.pending.stream(SUBMIT_STREAM, (request.target, request.to_wire()))
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

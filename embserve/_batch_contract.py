"""The :class:`Batcher` contract, apart so that implementations and the seam both import it.

Public through :mod:`embserve.batching`; import it from there.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

__all__ = ["Batcher"]

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(ABC, Generic[In, Out]):
    """Groups items submitted one at a time into batches for one batched method.

    Contract: a batcher is made on the replica's event loop (``loop``) and every method runs
    there. :meth:`submit` returns the result for its own item (results map one to one, in
    order), raises the batch's exception for every item of a failed batch and only those, and a
    cancelled submit either leaves its batch before the batch starts or has its result dropped,
    without harming the others. :meth:`submit_stream` is the same for a batched async
    generator, each caller getting its own outputs. :meth:`close`, called when the replica
    stops, fails the items still waiting and waits for running batches; ``closed`` says it
    was. :func:`embserve.batch` makes one :class:`~embserve.batching.DynamicBatcher` per
    replica and batched method, and closes it when the replica stops.
    """

    #: The event loop the batcher was made on (the replica's).
    loop: asyncio.AbstractEventLoop

    @abstractmethod
    async def submit(self, item: In) -> Out:
        """Queue ``item`` and return its result once its batch ran."""

    @abstractmethod
    def submit_stream(self, item: In) -> AsyncIterator[Out]:
        """Queue ``item`` for a streaming batch and yield its own outputs as they come."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` was called (new items are refused)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop batching: fail waiting items, let running batches finish."""

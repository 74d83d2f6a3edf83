"""The :class:`Batcher` contract, apart so that implementations and the seam both import it.

Public through :mod:`embserve.batching`; import it from there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

__all__ = ["Batcher"]

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(ABC, Generic[In, Out]):
    """Groups items submitted one at a time into batches for one batched method.

    Contract: :meth:`submit` runs on the replica's event loop; it returns the result for its own
    item (results map one to one, in order), raises the batch's exception for every item of a
    failed batch and only those, and a cancelled submit either leaves its batch before the batch
    starts or has its result dropped, without harming the others. :meth:`close` fails the items
    still waiting and waits for running batches.
    """

    @abstractmethod
    async def submit(self, item: In) -> Out:
        """Queue ``item`` and return its result once its batch ran."""

    @abstractmethod
    async def close(self) -> None:
        """Stop batching: fail waiting items, let running batches finish."""

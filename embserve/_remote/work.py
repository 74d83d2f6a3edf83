"""What stands in, inside a remote replica, for the router lease of a request it was told to
cancel: it learns when the request's work really ended, to say so to the caller.

The caller's lease cannot cross the transport. When a ``CANCEL`` comes, the replica gives the
request one of these before cancelling its task; the host holds it as it would hold a real
lease (:meth:`Lease.hold <embserve.router.Lease.hold>`: sync user code runs on in its thread),
and once the task is over and nothing holds it any more, ``on_ended`` runs: the replica sends
``ENDED``, and the caller lets go of the real lease.
"""

from __future__ import annotations

from collections.abc import Callable

from embserve.router import Lease

__all__ = ["WorkLease"]


class WorkLease(Lease):
    """A lease with no router behind it: once released and no longer held, ``on_ended`` runs
    (once) instead of a slot going back."""

    __slots__ = ("_on_ended",)

    def __init__(self, on_ended: Callable[[], None]) -> None:  # no router, so no super().__init__
        self._on_ended = on_ended
        self._holds = 0
        self._released = False

    def _free(self, count: int = 1) -> None:
        self._on_ended()

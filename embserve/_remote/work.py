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
    """A lease with no router behind it: :meth:`release` and every :meth:`hold`'s let-go count
    down, and ``on_ended`` runs once when all are done."""

    __slots__ = ("_on_ended",)

    def __init__(self, on_ended: Callable[[], None]) -> None:  # no router, so no super().__init__
        self._on_ended = on_ended
        self._holds = 0
        self._released = False

    def release(self) -> None:
        """The request's task is over (idempotent)."""
        if self._released:
            return
        self._released = True
        if not self._holds:
            self._on_ended()

    def hold(self) -> Callable[[], None]:
        """Keep the work counted as running; the returned function lets go (once)."""
        if self._released and not self._holds:
            return _nothing
        self._holds += 1
        done = False

        def let_go() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._holds -= 1
            if self._released and not self._holds:
                self._on_ended()

        return let_go


def _nothing() -> None:
    pass

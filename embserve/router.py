"""The Router seam: which replica serves each request, and what waits when all are busy.

A router belongs to one deployment. It owns the in-flight count of each replica
(``Replica.ongoing``), never gives a replica more than ``max_ongoing_requests``, keeps the
requests that find every replica full in a bounded queue (highest ``priority`` first, in arrival
order within a priority), and raises :class:`~embserve.BackPressureError` when that queue is
full, unless the arrival outranks a queued request, which it then displaces. What it hands out is a
:class:`Lease` on one replica slot, given back by :meth:`Lease.release` in one place, once.
Subclasses only choose among replicas (:meth:`Router.choose`); counting and queueing are shared,
so a custom router is one method::

    class LeastLoaded(embserve.router.Router):
        def choose(self, replicas, request):
            best = min(replicas, key=lambda r: r.ongoing)
            return best if best.ongoing < self.max_ongoing_requests else None

    @embserve.deployment(router=LeastLoaded)
    class Model: ...
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import random
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence

from embserve.errors import BackPressureError
from embserve.replica import Replica
from embserve.request import Request

__all__ = [
    "ConsistentHashRouter",
    "Lease",
    "PowerOfTwoChoicesRouter",
    "RoundRobinRouter",
    "Router",
    "make_router",
]


def _let_go() -> None:
    pass


class Lease:
    """One request's slot on one replica, counted in its ``ongoing`` until given back.

    :meth:`release` gives it back and may be called any number of times: only the first
    counts. Work that outlives its caller (sync user code in a thread, which cannot be stopped)
    holds the lease (:meth:`hold`), so that the slot stays taken, and status counts it, until
    that work really ended.
    """

    __slots__ = ("_holds", "_released", "_router", "replica")

    def __init__(self, router: Router, replica: Replica) -> None:
        self._router = router
        self.replica = replica
        self._holds = 0
        self._released = False

    @property
    def released(self) -> bool:
        """Whether the caller is done with the slot (it may still be held, see :meth:`hold`)."""
        return self._released

    def release(self) -> None:
        """The caller is done: give the slot back (unless held); idempotent."""
        if self._released:
            return
        self._released = True
        if not self._holds:
            self._free()

    def _free(self, count: int = 1) -> None:
        # Released and no longer held: the one place slots go back to their router (``count``
        # of them on this lease's replica, for release_all).
        router, replica = self._router, self.replica
        turns = router._turns
        if turns is not None:  # threads share the counts (Router.allow_threads)
            turns.loop_in = True
            if turns.thread_in:
                turns.wait_for_thread()
        try:
            replica.ongoing -= count
            if router._waiters.count:
                router._serve_waiters()
            if replica.ongoing == 0 and replica.idle is not None:
                replica.idle.set()  # wakes Replica.wait_idle
        finally:
            if turns is not None:
                turns.loop_in = False

    @staticmethod
    def release_all(leases: Sequence[Lease]) -> None:
        """:meth:`release` each of ``leases`` (on the loop), in one step where they share a
        replica: one decrement of its count and one look at the router's queue for a batch's
        worth of requests, not one per request."""
        if not leases:
            return
        first = leases[0]
        router, replica = first._router, first.replica
        freed = 0
        for lease in leases:
            if lease._released:
                continue
            lease._released = True
            if lease._holds:
                continue
            if lease.replica is not replica or lease._router is not router:
                lease._free()
                continue
            freed += 1
        if freed:
            first._free(freed)

    def release_here(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`release` from a thread other than ``loop``'s, for a lease that
        :meth:`Router.try_assign_here` gave (never held): what must happen on the loop (waking
        a waiter, or :meth:`~embserve.replica.Replica.wait_idle`) is handed to it."""
        router, replica = self._router, self.replica
        turns = router._turns
        assert turns is not None
        if self._released:  # a thread's lease is its own: nobody else releases it
            return
        self._released = True
        with turns.threads:
            turns.thread_in = True  # a thread's turn: see _Turns
            if turns.loop_in and not turns.retry():  # the loop stays busy: it gives it back
                loop.call_soon_threadsafe(self._free)
                return
            try:
                replica.ongoing -= 1
                wake = router._waiters.count or (replica.ongoing == 0 and replica.idle is not None)
            finally:
                turns.thread_in = False
        if wake:
            loop.call_soon_threadsafe(router._released_here, replica)

    def hold(self) -> Callable[[], None]:
        """Keep the slot taken past :meth:`release`; the returned function lets go (once)."""
        if self._released and not self._holds:
            return _let_go  # given back already: nothing left to hold
        self._holds += 1
        done = False

        def let_go() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._holds -= 1
            if self._released and not self._holds:
                self._free()

        return let_go


_Waiter = tuple["asyncio.Future[Lease]", Request]


class _WaitQueue:
    # Requests waiting for a free replica: a FIFO per priority, highest priority served first.
    # Priorities in use are few, so a sorted list of them beats a heap and makes both ends
    # (serve the first, displace the last) cheap.

    __slots__ = ("_by_priority", "_priorities", "count")

    def __init__(self) -> None:
        self._by_priority: dict[int, deque[_Waiter]] = {}
        self._priorities: list[int] = []  # ascending
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def push(self, waiter: _Waiter) -> None:
        priority = waiter[1].priority
        queue = self._by_priority.get(priority)
        if queue is None:
            queue = self._by_priority[priority] = deque()
            bisect.insort(self._priorities, priority)
        queue.append(waiter)
        self.count += 1

    def first(self) -> _Waiter:
        """The waiter to serve next (the queue is not empty)."""
        return self._by_priority[self._priorities[-1]][0]

    def pop_first(self) -> _Waiter:
        return self._pop(self._priorities[-1], last=False)

    def lowest(self) -> int:
        """The lowest priority waiting (the queue is not empty)."""
        return self._priorities[0]

    def pop_last_lowest(self) -> _Waiter:
        """The waiter that would be served last: the newest of the lowest priority."""
        return self._pop(self._priorities[0], last=True)

    def remove(self, waiter: _Waiter) -> None:
        priority = waiter[1].priority
        queue = self._by_priority.get(priority)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
            self.count -= 1
            if not queue:
                self._drop(priority)

    def _pop(self, priority: int, *, last: bool) -> _Waiter:
        queue = self._by_priority[priority]
        waiter = queue.pop() if last else queue.popleft()
        self.count -= 1
        if not queue:
            self._drop(priority)
        return waiter

    def _drop(self, priority: int) -> None:
        del self._by_priority[priority]
        self._priorities.remove(priority)


# Whether this Python has its GIL (3.13's free-threaded build may not): _Turns relies on it.
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
# How long a side that found the other inside sleeps before it looks again. Only a sleep hands
# the GIL over for sure (sleep(0) mostly takes it back at once); it is rare: the other side
# is inside for a few steps, and is caught there only by a switch of the GIL.
_STEP_S = 20e-6
# How often a thread looks before it leaves the counts to the loop (goes through it instead).
_TRIES = 3


class _Turns:
    # How a router's loop and other threads take turns at its counts (Router.allow_threads).
    # Threads take turns among themselves with a lock; a thread and the loop exclude each other
    # with two flags, each side setting its own before it reads the other's (Dekker's way: under
    # the GIL every store and load of them is one step, in one order, so both cannot pass).
    # The loop, on every request's path, pays two stores and a load, not a lock: it waits
    # only while a thread is inside, which it leaves within a few steps. A thread that finds
    # the loop inside steps back and looks again, and after a few looks leaves the work to the
    # loop (its call goes through the loop; its slot is given back there), so neither waits
    # for the other at the same time and no thread waits long.

    __slots__ = ("loop_in", "thread_in", "threads")

    def __init__(self) -> None:
        self.loop_in = False
        self.thread_in = False
        self.threads = threading.Lock()

    def wait_for_thread(self) -> None:
        # The loop, inside (loop_in set), saw a thread inside: it is there for a few steps.
        while self.thread_in:
            time.sleep(_STEP_S)  # sleeping, so that the thread surely gets the GIL

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        # A turn of the loop's, for what is not on every request's path.
        self.loop_in = True
        if self.thread_in:
            self.wait_for_thread()
        try:
            yield
        finally:
            self.loop_in = False

    def retry(self) -> bool:
        # A thread (holding ``threads``) set thread_in and found the loop inside: step back and
        # look again. True once inside (leave by clearing thread_in); False when the loop stayed
        # inside while it looked, a few times.
        for _ in range(_TRIES):
            self.thread_in = False
            time.sleep(_STEP_S)
            self.thread_in = True
            if not self.loop_in:
                return True
        self.thread_in = False
        return False


class Router(ABC):
    """Assigns requests to replicas of one deployment.

    Contract: every method runs on the runtime's event loop, but :meth:`try_assign_here`
    (with :meth:`Lease.release_here`), which sync callers use from their own threads once
    :meth:`allow_threads` ran. :meth:`assign` returns a
    :class:`Lease` on a replica whose ``ongoing`` it has already counted; the lease's
    :meth:`~Lease.release` gives it back. Waiting requests leave the queue highest
    ``request.priority`` first, in arrival order within a priority. A replica removed by
    :meth:`set_replicas` gets no new request; its in-flight ones finish and are released as
    usual.
    """

    def __init__(
        self,
        *,
        max_ongoing_requests: int,
        max_queued_requests: int = -1,
        rng: random.Random | None = None,
    ) -> None:
        self.max_ongoing_requests = max_ongoing_requests
        self.max_queued_requests = max_queued_requests
        self.rng = rng if rng is not None else random.Random()
        self.replicas: list[Replica] = []
        #: Models a replica keeps (a multiplexed deployment's ``max_num_models_per_replica``);
        #: 0 when the deployment multiplexes none.
        self.max_models_per_replica = 0
        # The models each replica was last sent, most recent last: the replica's own LRU cache
        # as this router made it, so a request goes where its model already is.
        self._models: dict[str, OrderedDict[str, None]] = {}
        # Requests waiting for a free replica.
        self._waiters = _WaitQueue()
        # Set by allow_threads(): threads then take leases too, and every change of the counts
        # is made in a turn of its own (see _Turns).
        self._turns: _Turns | None = None

    @abstractmethod
    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        """Pick a replica with ``ongoing < max_ongoing_requests`` from ``replicas``, or None.

        ``replicas`` is not empty. ``request`` is the request to place (its routing key,
        priority, model id); a router must not keep it. Runs on the runtime's loop, or in a
        sync caller's thread (:meth:`try_assign_here`), never in both at once.
        """

    @property
    def queued(self) -> int:
        """How many requests wait for a free replica."""
        return len(self._waiters)

    def set_replicas(self, replicas: Sequence[Replica]) -> None:
        """Route to exactly ``replicas`` from now on, and serve waiters that now fit."""
        turns = self._turns
        if turns is not None:
            with turns.loop():
                self._set_replicas(replicas)
        else:
            self._set_replicas(replicas)

    def _set_replicas(self, replicas: Sequence[Replica]) -> None:
        self.replicas = list(replicas)
        if self._models:
            ids = {r.replica_id for r in self.replicas}
            for gone in [rid for rid in self._models if rid not in ids]:
                del self._models[gone]
        self._serve_waiters()

    def try_assign(self, request: Request) -> Lease | None:
        """A lease for ``request`` if a replica has room and nobody waits before it; else None."""
        if self._waiters.count or not self.replicas:  # an attribute: cheaper than len()
            return None
        if request.multiplexed_model_id and self.max_models_per_replica:
            replica = self._choose_for_model(request)
        else:
            replica = self.choose(self.replicas, request)
        if replica is None:
            return None
        replica.ongoing += 1
        return Lease(self, replica)

    @property
    def threads_allowed(self) -> bool:
        """Whether :meth:`allow_threads` ran: other threads may take leases."""
        return self._turns is not None

    def allow_threads(self) -> None:
        """From now on, :meth:`try_assign_here` may be called from other threads (call on the
        loop: the loop and those threads then take turns at the counts). Does nothing where
        Python runs without its GIL, which the turns rely on: there, threads' calls go through
        the loop."""
        if self._turns is None and _GIL:
            self._turns = _Turns()
            self.try_assign = self._try_assign_in_turn  # type: ignore[method-assign]

    def _try_assign_in_turn(self, request: Request) -> Lease | None:
        turns = self._turns
        assert turns is not None
        turns.loop_in = True
        if turns.thread_in:
            turns.wait_for_thread()
        try:
            return Router.try_assign(self, request)
        finally:
            turns.loop_in = False

    def try_assign_here(self, request: Request) -> Lease | None:
        """:meth:`try_assign` from any thread, once :meth:`allow_threads` ran (None before);
        give the lease back with :meth:`Lease.release_here`."""
        turns = self._turns
        if turns is None:
            return None
        with turns.threads:
            turns.thread_in = True  # a thread's turn: see _Turns
            if turns.loop_in and not turns.retry():
                return None  # the loop stays busy at the counts: the call goes through it
            try:
                return Router.try_assign(self, request)
            finally:
                turns.thread_in = False

    def _released_here(self, replica: Replica) -> None:
        # On the loop, after Lease.release_here freed a slot that a waiter or wait_idle wants.
        assert self._turns is not None
        with self._turns.loop():
            self._serve_waiters()
            if replica.ongoing == 0 and replica.idle is not None:
                replica.idle.set()

    async def assign(self, request: Request) -> Lease:
        """A lease for ``request``, waiting in the queue when every replica is full.

        Raises :class:`~embserve.BackPressureError` at once when the queue is full and no
        queued request has a lower priority than ``request``; when one has, the newest of the
        lowest priority leaves the queue with that error instead.
        """
        lease = self.try_assign(request)
        if lease is not None:
            return lease
        waiters = self._waiters
        if 0 <= self.max_queued_requests <= len(waiters):
            if self.max_queued_requests and waiters.lowest() < request.priority:
                displaced, _ = waiters.pop_last_lowest()
                if not displaced.done():
                    displaced.set_exception(
                        self._full(f"a request of priority {request.priority} took its place")
                    )
            else:
                raise self._full()
        waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        entry = (waiter, request)
        turns = self._turns
        if turns is None:
            waiters.push(entry)
        else:
            with turns.loop():  # a thread may have freed a slot since try_assign: look again
                waiters.push(entry)
                self._serve_waiters()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Assigned in the same tick we were cancelled: give the slot back.
                waiter.result().release()
            else:
                self._waiters.remove(entry)
            raise

    def _choose_for_model(self, request: Request) -> Replica | None:
        # The least loaded replica with room that holds the request's model; else the one with
        # room holding the fewest models (it loads it without evicting another, if it can);
        # the router's own choice only when every replica with room is full of models.
        model = request.multiplexed_model_id
        limit = self.max_ongoing_requests
        models = self._models
        holder: Replica | None = None
        roomiest: Replica | None = None
        fewest = self.max_models_per_replica
        for replica in self.replicas:
            if replica.ongoing >= limit:
                continue
            held = models.get(replica.replica_id)
            count = len(held) if held is not None else 0
            if held is not None and model in held:
                if holder is None or replica.ongoing < holder.ongoing:
                    holder = replica
            elif count < fewest:
                roomiest, fewest = replica, count
        best = holder or roomiest or self.choose(self.replicas, request)
        if best is None:
            return None
        held = models.setdefault(best.replica_id, OrderedDict())
        held[model] = None
        held.move_to_end(model)
        while len(held) > self.max_models_per_replica:
            held.popitem(last=False)
        return best

    def _full(self, why: str = "") -> BackPressureError:
        detail = f"; {why}" if why else ""
        return BackPressureError(
            f"all replicas are busy and {len(self._waiters)} request(s) wait "
            f"(max_queued_requests={self.max_queued_requests}){detail}; retry later or add "
            "replicas"
        )

    def fail_waiters(self, make_error: Callable[[], BaseException]) -> None:
        """End every queued request with an error of its own (the deployment is going away).

        One instance each: an exception raised in several tasks would collect all their
        tracebacks.
        """
        while self._waiters:
            waiter, _ = self._waiters.pop_first()
            if not waiter.done():
                waiter.set_exception(make_error())

    def _serve_waiters(self) -> None:
        waiters = self._waiters
        while waiters and self.replicas:
            waiter, request = waiters.first()
            if waiter.done():  # cancelled while waiting
                waiters.pop_first()
                continue
            if request.multiplexed_model_id and self.max_models_per_replica:
                replica = self._choose_for_model(request)
            else:
                replica = self.choose(self.replicas, request)
            if replica is None:
                return
            replica.ongoing += 1
            waiters.pop_first()
            waiter.set_result(Lease(self, replica))


class PowerOfTwoChoicesRouter(Router):
    """Sample two replicas, take the one with fewer requests in flight (the default)."""

    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        limit = self.max_ongoing_requests
        count = len(replicas)
        if count == 1:
            only = replicas[0]
            return only if only.ongoing < limit else None
        randrange = self.rng.randrange
        first = randrange(count)
        second = randrange(count - 1)
        if second >= first:
            second += 1
        a, b = replicas[first], replicas[second]
        best = a if a.ongoing <= b.ongoing else b
        if best.ongoing < limit:
            return best
        best = min(replicas, key=_ongoing)
        return best if best.ongoing < limit else None


class RoundRobinRouter(Router):
    """Each replica in turn, skipping those that are full."""

    _next = 0  # the replica to try first; an instance attribute once set

    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        count = len(replicas)
        for step in range(count):
            replica = replicas[(self._next + step) % count]
            if replica.ongoing < self.max_ongoing_requests:
                self._next = (self._next + step + 1) % count
                return replica
        return None


class ConsistentHashRouter(PowerOfTwoChoicesRouter):
    """Requests with the same routing key go to the same replica (sticky sessions, per-user or
    per-model caches), while it has room.

    Replicas sit on a hash ring at ``VIRTUAL_NODES`` points each; a key goes to the first replica
    clockwise from its hash. Adding or removing a replica moves only the keys of its own arcs.
    A key whose replica is full spills to the next replica on the ring with room (consistent
    hashing with bounded loads), so ``max_ongoing_requests`` holds as for every router. Requests
    without a key go to the less loaded of two sampled replicas. Hashes are stable across
    processes and runs (BLAKE2b, not Python's salted ``hash``).
    """

    VIRTUAL_NODES = 64
    _ring_of: tuple[str, ...] = ()
    _points: list[int]
    _owners: list[Replica]

    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        key = request.routing_key
        if key is None:
            return super().choose(replicas, request)
        ids = tuple(r.replica_id for r in replicas)
        if ids != self._ring_of:
            self._build(replicas, ids)
        points, owners = self._points, self._owners
        start = bisect.bisect(points, _hash(key))
        limit = self.max_ongoing_requests
        seen: set[int] = set()
        for step in range(len(owners)):
            replica = owners[(start + step) % len(owners)]
            if replica.ongoing < limit:
                return replica
            seen.add(id(replica))
            if len(seen) == len(replicas):
                break
        return None

    def _build(self, replicas: Sequence[Replica], ids: tuple[str, ...]) -> None:
        ring = sorted(
            (_hash(f"{replica.replica_id}#{n}"), index)
            for index, replica in enumerate(replicas)
            for n in range(self.VIRTUAL_NODES)
        )
        self._points = [point for point, _ in ring]
        self._owners = [replicas[index] for _, index in ring]
        self._ring_of = ids


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _ongoing(replica: Replica) -> int:
    return replica.ongoing


_ROUTERS: dict[str, type[Router]] = {
    "power_of_two": PowerOfTwoChoicesRouter,
    "round_robin": RoundRobinRouter,
    "consistent_hash": ConsistentHashRouter,
}


def make_router(
    kind: str | type[Router],
    *,
    max_ongoing_requests: int,
    max_queued_requests: int,
    rng: random.Random | None = None,
) -> Router:
    """The router a deployment's ``router`` option names: a name or a :class:`Router` subclass."""
    cls = _ROUTERS[kind] if isinstance(kind, str) else kind
    return cls(
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        rng=rng,
    )

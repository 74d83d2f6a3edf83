"""What one machine can give replicas: CPUs, GPUs (whole or shared), and custom resources.

A :class:`ResourcePool` is the capacity of the local backends (in-thread and process). It is a
plain, event-fed structure: replicas acquire a demand such as ``{"CPU": 1, "GPU": 0.5}`` and
release it when they stop; a demand that does not fit now waits in the pool and is granted as
soon as a release makes room. Nothing here starts a process or sleeps, so the placement rules are
tested on their own; :func:`acquire` is the small asyncio bridge the backends await.

GPUs are counted per device. A demand below one GPU takes a share of a single device, best fit
first (two 0.5 replicas share a GPU, a 0.6 and a 0.5 do not); a demand of one or more takes that
many whole, unshared devices. Amounts are counted in ten-thousandths so that ten replicas of 0.1
fill exactly one GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence

from embserve.errors import DeploymentFailedError

__all__ = [
    "Allocation",
    "ResourcePool",
    "acquire",
    "build_pool",
    "default_capacity",
    "detect_gpus",
]

GPU = "GPU"
_UNIT = 10_000


def _units(amount: float) -> int:
    return round(amount * _UNIT)


def _amount(units: int) -> float:
    return units / _UNIT


@functools.lru_cache(maxsize=1)
def detect_gpus() -> tuple[str, ...]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``.

    Cached for the life of the process (a machine does not grow GPUs while serving).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        # CUDA stops at the first invalid id, and "-1" is the usual way to hide every GPU.
        valid: list[str] = []
        for gpu_id in ids:
            if gpu_id.startswith("-"):
                break
            valid.append(gpu_id)
        return tuple(valid)
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(count))


def default_capacity() -> dict[str, float]:
    """``{"CPU": os.cpu_count(), "GPU": detected GPUs}``: what this machine offers."""
    return {"CPU": float(os.cpu_count() or 1), GPU: float(len(detect_gpus()))}


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What one replica holds.

    Attributes:
        owner: the replica id that holds it.
        demand: the deployment's ``resources`` as asked.
        gpu_ids: the GPUs it uses, as ``CUDA_VISIBLE_DEVICES`` names them.
        gpu_shares: the share of each of those GPUs it holds (1.0 for a whole one).
    """

    owner: str
    demand: Mapping[str, float]
    gpu_ids: tuple[str, ...] = ()
    gpu_shares: Mapping[str, float] = dataclasses.field(default_factory=dict)


class _Waiter:
    __slots__ = ("demand", "grant", "group", "notify", "owner")

    def __init__(
        self,
        owner: str,
        demand: Mapping[str, float],
        group: str,
        grant: Callable[[Allocation], None],
        notify: Callable[[str], None],
    ) -> None:
        self.owner = owner
        self.demand = demand
        self.group = group
        self.grant = grant
        self.notify = notify


class ResourcePool:
    """The capacity of one machine and the allocations that hold parts of it.

    Args:
        capacity: amounts per resource name (default: :func:`default_capacity`). ``"GPU"`` is a
            device count; other names are plain amounts. A name missing here has no capacity.
        gpu_ids: the ids of the GPUs (default: the visible ones when there are enough, else
            ``"0"``, ``"1"``, ...).

    Not thread-safe: the backends use one pool from their runtime's event loop.
    """

    def __init__(
        self,
        capacity: Mapping[str, float] | None = None,
        *,
        gpu_ids: Sequence[str] | None = None,
    ) -> None:
        total = dict(default_capacity() if capacity is None else capacity)
        for name, amount in total.items():
            if not isinstance(name, str) or isinstance(amount, bool) or amount < 0:
                raise ValueError(f"capacity must map names to amounts >= 0, got {name!r}: {amount}")
        gpus = total.get(GPU, 0)
        if gpus != int(gpus):
            raise ValueError(f"the GPU capacity is a number of devices, got {gpus}")
        if gpu_ids is None:
            visible = detect_gpus() if gpus else ()
            if len(visible) < gpus:
                visible = tuple(str(i) for i in range(int(gpus)))
            gpu_ids = visible[: int(gpus)]
        self.gpu_ids: tuple[str, ...] = tuple(str(g) for g in gpu_ids)
        if len(self.gpu_ids) != gpus:
            raise ValueError(f"{len(self.gpu_ids)} gpu_ids given for a capacity of {gpus} GPUs")
        self.capacity: dict[str, float] = {k: float(v) for k, v in total.items()}
        self._free = {k: _units(v) for k, v in total.items() if k != GPU}
        self._gpu_free = {gpu_id: _UNIT for gpu_id in self.gpu_ids}
        self._held: dict[str, Allocation] = {}
        self._waiters: list[_Waiter] = []

    # -- questions ------------------------------------------------------------------------

    def free(self) -> dict[str, float]:
        """What is unallocated, per resource; GPUs as the sum of their free shares."""
        free = {k: _amount(v) for k, v in self._free.items()}
        if GPU in self.capacity:
            free[GPU] = _amount(sum(self._gpu_free.values()))
        return free

    def gpu_free(self) -> dict[str, float]:
        """The free share of each GPU."""
        return {gpu_id: _amount(v) for gpu_id, v in self._gpu_free.items()}

    @property
    def allocations(self) -> Mapping[str, Allocation]:
        """The allocations held, by owner."""
        return dict(self._held)

    def never_fits(self, demand: Mapping[str, float]) -> str | None:
        """Why ``demand`` cannot fit even on an idle machine, or None when it can."""
        for name, amount in demand.items():
            if amount <= 0:
                continue
            if name == GPU:
                gpus = len(self.gpu_ids)
                if amount > 1 and amount != int(amount):
                    return f"GPU: {amount} is neither a share of one GPU (< 1) nor a whole number"
                if amount > gpus:
                    return f"GPU: asks {amount:g}, the capacity has {gpus} GPU(s)"
                continue
            have = self.capacity.get(name, 0.0)
            if _units(amount) > _units(have):
                return f"{name}: asks {amount:g}, the capacity has {have:g}"
        return None

    def shortage(self, demand: Mapping[str, float]) -> str | None:
        """Which resource is short for ``demand`` right now, or None when it fits."""
        reason = self.never_fits(demand)
        if reason is not None:
            return reason
        for name, amount in demand.items():
            if amount <= 0:
                continue
            if name == GPU:
                if self._pick_gpus(_units(amount)) is None:
                    shares = ", ".join(f"{g}: {_amount(v):g}" for g, v in self._gpu_free.items())
                    kind = "a share of one GPU" if amount < 1 else "whole GPU(s)"
                    return f"GPU: asks {amount:g} ({kind}); free per GPU: {shares}"
            elif _units(amount) > self._free.get(name, 0):
                free = _amount(self._free.get(name, 0))
                return f"{name}: asks {amount:g}, {free:g} of {self.capacity[name]:g} free"
        return None

    # -- allocation -----------------------------------------------------------------------

    def _pick_gpus(self, units: int) -> list[str] | None:
        if units <= 0:
            return []
        if units < _UNIT:
            # Best fit: the fullest GPU that still has room, so shares pack onto few devices.
            fits = [g for g in self.gpu_ids if self._gpu_free[g] >= units]
            return [min(fits, key=lambda g: self._gpu_free[g])] if fits else None
        whole = [g for g in self.gpu_ids if self._gpu_free[g] == _UNIT]
        count = units // _UNIT
        return whole[:count] if len(whole) >= count else None

    def try_acquire(self, owner: str, demand: Mapping[str, float]) -> Allocation | None:
        """Allocate ``demand`` to ``owner`` if it fits now; None when it does not."""
        if owner in self._held:
            raise ValueError(f"{owner!r} already holds resources")
        if self.shortage(demand) is not None:
            return None
        gpu_units = _units(demand.get(GPU, 0))
        gpus = self._pick_gpus(gpu_units)
        assert gpus is not None
        per_gpu = min(gpu_units, _UNIT)
        for gpu_id in gpus:
            self._gpu_free[gpu_id] -= per_gpu
        for name, amount in demand.items():
            if name != GPU and amount > 0:
                self._free[name] -= _units(amount)
        allocation = Allocation(
            owner,
            dict(demand),
            tuple(gpus),
            {gpu_id: _amount(per_gpu) for gpu_id in gpus},
        )
        self._held[owner] = allocation
        return allocation

    def release(self, owner: str) -> Allocation | None:
        """Give back what ``owner`` holds (nothing if it holds nothing); wake waiters that fit."""
        allocation = self._held.pop(owner, None)
        if allocation is None:
            return None
        for gpu_id, share in allocation.gpu_shares.items():
            self._gpu_free[gpu_id] += _units(share)
        for name, amount in allocation.demand.items():
            if name != GPU and amount > 0:
                self._free[name] += _units(amount)
        self._grant_waiters()
        return allocation

    # -- waiting --------------------------------------------------------------------------

    def wait(
        self,
        owner: str,
        demand: Mapping[str, float],
        *,
        group: str,
        grant: Callable[[Allocation], None],
        notify: Callable[[str], None],
    ) -> None:
        """Queue ``demand``: ``grant`` is called with its allocation once it fits, ``notify``
        with the shortage now and again each time capacity changes and it still does not fit.

        ``group`` (the deployment's name) is what :meth:`waiting` reports.
        """
        waiter = _Waiter(owner, dict(demand), group, grant, notify)
        self._waiters.append(waiter)
        self._grant_waiters()

    def cancel(self, owner: str) -> bool:
        """Stop waiting for ``owner``; returns False when it was not waiting."""
        for index, waiter in enumerate(self._waiters):
            if waiter.owner == owner:
                del self._waiters[index]
                return True
        return False

    def waiting(self) -> dict[str, str]:
        """Why each group with a waiting demand waits (its first waiter's shortage)."""
        reasons: dict[str, str] = {}
        for waiter in self._waiters:
            if waiter.group not in reasons:
                reasons[waiter.group] = self.shortage(waiter.demand) or "about to start"
        return reasons

    def _grant_waiters(self) -> None:
        # In arrival order, but a demand that fits may pass one that does not: a small replica
        # should not wait for a big one that cannot start anyway.
        for waiter in list(self._waiters):
            allocation = self.try_acquire(waiter.owner, waiter.demand)
            if allocation is None:
                reason = self.shortage(waiter.demand)
                waiter.notify(reason or "")
                continue
            self._waiters.remove(waiter)
            waiter.grant(allocation)


async def build_pool(
    capacity: Mapping[str, float] | None, gpu_ids: Sequence[str] | None = None
) -> ResourcePool:
    """A :class:`ResourcePool` built off the event loop: finding the GPUs may run nvidia-smi."""
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(ResourcePool, capacity, gpu_ids=gpu_ids)
    )


async def acquire(
    pool: ResourcePool,
    owner: str,
    demand: Mapping[str, float],
    *,
    group: str,
    pending: dict[str, str],
    allocating: set[str] | None = None,
) -> Allocation:
    """Allocate ``demand`` from ``pool``, waiting while it does not fit.

    While it waits, ``pending[group]`` says which resource is short (the backend's status
    message) and ``owner`` is in ``allocating`` (status shows it ``PENDING_ALLOCATION``).
    Raises :class:`~embserve.DeploymentFailedError` when the demand cannot fit even on an idle
    machine. Cancelling the wait leaves nothing allocated.
    """
    impossible = pool.never_fits(demand)
    if impossible is not None:
        raise DeploymentFailedError(
            f"deployment {group!r} cannot be placed: {impossible} "
            "(give the backend more resources, e.g. ProcessBackend(resources={...}))"
        )
    allocation = pool.try_acquire(owner, demand)
    if allocation is not None:
        return allocation
    granted: asyncio.Future[Allocation] = asyncio.get_running_loop().create_future()

    def grant(allocation: Allocation) -> None:
        if granted.done():  # the waiter was cancelled in the same loop turn: give it back
            pool.release(allocation.owner)
        else:
            granted.set_result(allocation)

    def notify(reason: str) -> None:
        pending[group] = f"waiting for resources: {reason}"

    pool.wait(owner, demand, group=group, grant=grant, notify=notify)
    if allocating is not None:
        allocating.add(owner)
    try:
        return await granted
    except asyncio.CancelledError:
        if not pool.cancel(owner) and granted.done() and not granted.cancelled():
            pool.release(owner)
        raise
    finally:
        if allocating is not None:
            allocating.discard(owner)
        reason = pool.waiting().get(group)
        if reason is None:
            pending.pop(group, None)
        else:
            pending[group] = f"waiting for resources: {reason}"

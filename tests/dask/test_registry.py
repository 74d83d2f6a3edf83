"""The namespace registry in a real (in-process) Dask scheduler: each step atomic under races,
leases that end when a runtime stops heartbeating or its client goes, changes told at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import distributed
import pytest

from embserve_dask._registry import DaskRegistry

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

# distributed's constructors are untyped; tests use them through these names.
Scheduler: Any = distributed.Scheduler
Client: Any = distributed.Client

LEASE_S = 0.6


@pytest.fixture
async def scheduler() -> AsyncIterator[Any]:
    """A scheduler on this loop, on loopback, with no workers (the registry needs none)."""
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as started:
        yield started


async def _registry(
    scheduler: Any, runtime: str, namespace: str = "ns", lease_s: float = LEASE_S
) -> DaskRegistry:
    client = await Client(scheduler.address, asynchronous=True)
    registry = DaskRegistry(client, namespace, runtime, lease_s=lease_s)
    await registry.open()
    return registry


async def _close(*registries: DaskRegistry) -> None:
    for registry in registries:
        await registry.close()
        await registry.client.close()


async def _until(probe: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


async def test_runtimes_joining_together_get_one_owner(scheduler: Any) -> None:
    registries = [await _registry(scheduler, f"rt-{i}") for i in range(4)]
    try:
        entries = await asyncio.gather(
            *(r.join("model", r.runtime_id, version="1", spec=b"spec") for r in registries)
        )
        owners = {entry.owner for entry in entries}
        assert len(owners) == 1 and owners <= {r.runtime_id for r in registries}
        assert {entry.serial for entry in entries} == {1}
        owner = next(r for r in registries if r.runtime_id in owners)
        other = next(r for r in registries if r.runtime_id not in owners)
        assert not await other.set_replicas("model", other.runtime_id, {"m#1": {"a": 1}})
        assert await owner.set_replicas("model", owner.runtime_id, {"m#1": {"a": 1}})
        state = await other.state()
        assert dict(state.deployments["model"].replicas) == {"m#1": {"a": 1}}
    finally:
        await _close(*registries)


async def test_a_new_version_is_a_new_serial_and_keeps_the_owner(scheduler: Any) -> None:
    a, b = await _registry(scheduler, "rt-a"), await _registry(scheduler, "rt-b")
    try:
        await a.join("model", "rt-a", version="1", spec=b"one")
        same = await b.join("model", "rt-b", version="1", spec=b"one again")
        assert (same.owner, same.serial) == ("rt-a", 1)
        assert await b.spec("model") == b"one"  # the same version attaches, spec unchanged
        newer = await b.join("model", "rt-b", version="2", spec=b"two")
        assert (newer.owner, newer.serial, newer.version) == ("rt-a", 2, "2")
        assert await a.spec("model") == b"two"
    finally:
        await _close(a, b)


async def test_an_owner_that_leaves_is_replaced_by_one_claim(scheduler: Any) -> None:
    registries = [await _registry(scheduler, f"rt-{i}") for i in range(4)]
    owner, *others = registries
    try:
        await owner.join("model", owner.runtime_id, version="1", spec=b"s")
        await owner.leave(owner.runtime_id)
        claims = await asyncio.gather(*(r.claim("model", r.runtime_id) for r in others))
        assert sorted(claims) == [False, False, True]
    finally:
        await _close(*registries)


async def test_a_lease_ends_when_heartbeats_stop_and_others_are_told(scheduler: Any) -> None:
    a, b = await _registry(scheduler, "rt-a"), await _registry(scheduler, "rt-b")
    told = asyncio.Event()
    b.watch(told.set)
    try:
        await a.join("model", "rt-a", version="1", spec=b"s")
        assert a._heartbeat is not None
        a._heartbeat.cancel()  # a hangs (or is cut off): its client stays, its lease lapses

        async def ownerless() -> bool:
            return (await b.state()).deployments["model"].owner is None

        await _until(ownerless)
        await asyncio.wait_for(told.wait(), 5.0)
        assert await b.claim("model", "rt-b")
    finally:
        await _close(a, b)


async def test_a_client_that_goes_ends_its_runtimes_lease_at_once(scheduler: Any) -> None:
    # Leases of a minute: what ends this one within the deadline is its client's removal.
    a = await _registry(scheduler, "rt-a", lease_s=60)
    b = await _registry(scheduler, "rt-b", lease_s=60)
    try:
        await a.join("model", "rt-a", version="1", spec=b"s")
        await a.client.close()  # as when its process exits or is killed

        async def ownerless() -> bool:
            return (await b.state()).deployments["model"].owner is None

        await _until(ownerless)
    finally:
        await a.close()
        await _close(b)


async def test_a_namespace_is_forgotten_when_its_last_runtime_leaves(scheduler: Any) -> None:
    a = await _registry(scheduler, "rt-a", namespace="short-lived")
    try:
        await a.join("model", "rt-a", version="1", spec=b"s")
        await a.set_endpoint("model", "/m", None, None)
        await a.leave("rt-a")
        state = await a.state()
        assert not state.deployments and not state.endpoints
    finally:
        await _close(a)

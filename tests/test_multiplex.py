"""Model multiplexing: a replica's model cache (one load per model, LRU beyond its limit) and
routing that sends a request where its model already is."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import embserve
from embserve.request import Request
from embserve.router import make_router
from tests.replicas import StubReplica

pytestmark = pytest.mark.anyio


class Loader:
    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.fail: set[str] = set()

    @embserve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads[model_id] += 1
        if self.gate is not None:
            await self.gate.wait()
        if model_id in self.fail:
            raise OSError(f"no weights for {model_id}")
        return f"model {model_id}"


async def test_each_model_is_loaded_once_and_the_least_recently_used_evicted() -> None:
    loader = Loader()
    assert await loader.get_model("a") == "model a"
    assert await loader.get_model("b") == "model b"
    assert await loader.get_model("a") == "model a"  # a is now the most recently used
    await loader.get_model("c")  # evicts b
    assert loader.loads == {"a": 1, "b": 1, "c": 1}
    await loader.get_model("a")
    await loader.get_model("b")  # loaded again
    assert loader.loads == {"a": 1, "b": 2, "c": 1}


async def test_callers_of_a_model_being_loaded_share_one_load_even_if_one_leaves() -> None:
    loader = Loader()
    loader.gate = asyncio.Event()
    first = asyncio.ensure_future(loader.get_model("a"))
    others = [asyncio.ensure_future(loader.get_model("a")) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    loader.gate.set()
    assert await asyncio.gather(*others) == ["model a"] * 5
    assert loader.loads == {"a": 1}


async def test_a_load_that_fails_caches_nothing() -> None:
    loader = Loader()
    loader.fail = {"x"}
    with pytest.raises(OSError, match="no weights"):
        await loader.get_model("x")
    loader.fail = set()
    assert await loader.get_model("x") == "model x"
    assert loader.loads == {"x": 2}


def test_the_loader_must_be_async() -> None:
    with pytest.raises(TypeError, match="async method"):
        embserve.multiplexed(lambda self, model_id: None)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        embserve.multiplexed(max_num_models_per_replica=0)


def model(name: str) -> Request:
    return Request("d", multiplexed_model_id=name)


def test_requests_go_where_their_model_is_and_spill_when_it_is_full() -> None:
    router = make_router("power_of_two", max_ongoing_requests=1, max_queued_requests=-1)
    router.max_models_per_replica = 2
    pool = [StubReplica(f"r{i}", "d") for i in range(4)]
    router.set_replicas(pool)
    first = router.try_assign(model("m"))
    assert first is not None
    home = first.replica
    first.release()
    for _ in range(20):
        again = router.try_assign(model("m"))
        assert again is not None and again.replica is home
        again.release()
    held = router.try_assign(model("m"))
    assert held is not None
    spilled = router.try_assign(model("m"))  # its home is full: another replica loads it
    assert spilled is not None and spilled.replica is not home
    held.release()
    spilled.release()
    homes = set()
    for _ in range(10):
        lease = router.try_assign(model("m"))
        assert lease is not None
        homes.add(lease.replica)
        lease.release()
    assert homes <= {home, spilled.replica}


@embserve.deployment(num_replicas=3)
class Models:
    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()

    @embserve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads[model_id] += 1
        return model_id

    async def __call__(self) -> tuple[str, str, int]:
        model_id = embserve.get_multiplexed_model_id()
        await self.get_model(model_id)
        replica = embserve.get_replica_context().replica_id
        return replica, model_id, self.loads[model_id]


async def test_a_multiplexed_deployment_loads_each_model_once_and_keeps_it_there() -> None:
    async with embserve.Runtime() as rt:
        handle = await rt.run_async(Models.bind(), name="models")
        homes: dict[str, set[str]] = {}
        for index in range(60):
            model_id = f"m{index % 5}"
            replica, served, loads = await handle.options(multiplexed_model_id=model_id).remote()
            assert served == model_id and loads == 1  # every request after the first is a hit
            homes.setdefault(model_id, set()).add(replica)
        assert all(len(replicas) == 1 for replicas in homes.values()), homes
        assert embserve.get_multiplexed_model_id() == ""

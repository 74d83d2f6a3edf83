"""Routers: strict per-replica limits, FIFO queueing, backpressure, cancellation, fairness."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embserve.errors import BackPressureError
from embserve.replica import Replica
from embserve.request import Request
from embserve.router import Lease, PowerOfTwoChoicesRouter, RoundRobinRouter, Router, make_router
from tests.replicas import StubReplica


def req(key: str | None = None) -> Request:
    return Request("d", routing_key=key)


def slots(count: int) -> list[Replica]:
    return [StubReplica(f"r{i}", "d") for i in range(count)]


def p2c(limit: int = 2, queued: int = -1, seed: int = 0) -> Router:
    return PowerOfTwoChoicesRouter(
        max_ongoing_requests=limit, max_queued_requests=queued, rng=random.Random(seed)
    )


@pytest.mark.anyio
async def test_assign_counts_and_release_uncounts() -> None:
    router = p2c(limit=1)
    (only,) = replicas = slots(1)
    router.set_replicas(replicas)
    lease = await router.assign(req())
    assert lease.replica is only
    assert only.ongoing == 1
    lease.release()
    assert only.ongoing == 0
    lease.release()  # idempotent
    assert only.ongoing == 0


@pytest.mark.anyio
async def test_full_replicas_queue_in_arrival_order() -> None:
    router = p2c(limit=1)
    (only,) = replicas = slots(1)
    router.set_replicas(replicas)
    first = await router.assign(req())
    order: list[int] = []

    async def waiter(index: int) -> None:
        lease = await router.assign(req())
        order.append(index)
        lease.release()

    tasks = [asyncio.ensure_future(waiter(i)) for i in range(5)]
    await asyncio.sleep(0)  # let them queue
    assert router.queued == 5
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert only.ongoing == 0


@pytest.mark.anyio
async def test_backpressure_when_the_queue_is_full() -> None:
    router = p2c(limit=1, queued=2)
    router.set_replicas(slots(1))
    await router.assign(req())
    waiting = [asyncio.ensure_future(router.assign(req())) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BackPressureError, match="max_queued_requests=2"):
        await router.assign(req())
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert router.queued == 0


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    router = p2c(limit=1)
    (only,) = replicas = slots(1)
    router.set_replicas(replicas)
    first = await router.assign(req())
    cancelled = asyncio.ensure_future(router.assign(req()))
    kept = asyncio.ensure_future(router.assign(req()))
    await asyncio.sleep(0)
    cancelled.cancel()
    first.release()
    assert (await kept).replica is only
    assert only.ongoing == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled


@pytest.mark.anyio
async def test_release_all_gives_back_each_slot_once_and_serves_waiters() -> None:
    # A batch's leases go back in one step: a lease released before, a held one and one on
    # another replica among them, and the queue served as one release at a time would.
    router = RoundRobinRouter(max_ongoing_requests=3)
    first, second = replicas = slots(2)
    router.set_replicas(replicas)
    leases = [await router.assign(req()) for _ in range(6)]
    on_first = [lease for lease in leases if lease.replica is first]
    on_second = [lease for lease in leases if lease.replica is second]
    on_first[0].release()  # released already: not given back twice
    refill = await router.assign(req())
    assert refill.replica is first
    assert (first.ongoing, second.ongoing) == (3, 3)
    waiters = [asyncio.ensure_future(router.assign(req())) for _ in range(2)]
    await asyncio.sleep(0)
    let_go = on_first[1].hold()  # work that outlives its caller keeps its slot
    Lease.release_all([*on_first, on_second[0]])
    assert all(lease.released for lease in [*on_first, on_second[0]])
    served = await asyncio.gather(*waiters)  # the two slots freed: first's third, second's
    assert sorted(lease.replica.replica_id for lease in served) == ["r0", "r1"]
    assert (first.ongoing, second.ongoing) == (3, 3)
    let_go()
    assert first.ongoing == 2
    Lease.release_all([*on_first, *on_second, *served, refill])
    assert (first.ongoing, second.ongoing) == (0, 0)
    Lease.release_all([])


@pytest.mark.anyio
async def test_waiters_are_served_when_replicas_arrive() -> None:
    router = p2c(limit=1)
    waiter = asyncio.ensure_future(router.assign(req()))
    await asyncio.sleep(0)
    assert not waiter.done()
    replicas = slots(1)
    router.set_replicas(replicas)
    assert (await waiter).replica is replicas[0]


@pytest.mark.anyio
async def test_fail_waiters_ends_every_queued_request() -> None:
    router = p2c()
    waiters = [asyncio.ensure_future(router.assign(req())) for _ in range(3)]
    await asyncio.sleep(0)
    router.fail_waiters(lambda: RuntimeError("gone"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len({id(r) for r in results}) == 3


def test_power_of_two_prefers_the_less_loaded() -> None:
    router = p2c(limit=100)
    busy, idle = slots(2)
    busy.ongoing = 10
    picks = Counter(router.choose([busy, idle], req()) for _ in range(100))
    assert picks == {idle: 100}


def test_round_robin_takes_turns_and_skips_full_ones() -> None:
    router = RoundRobinRouter(max_ongoing_requests=1)
    a, b, c = replicas = slots(3)
    assert [router.choose(replicas, req()) for _ in range(3)] == [a, b, c]
    b.ongoing = 1
    assert [router.choose(replicas, req()) for _ in range(2)] == [a, c]


def test_make_router_by_name() -> None:
    router = make_router("round_robin", max_ongoing_requests=3, max_queued_requests=4)
    assert isinstance(router, RoundRobinRouter)
    assert (router.max_ongoing_requests, router.max_queued_requests) == (3, 4)


@given(
    kind=st.sampled_from(["power_of_two", "round_robin"]),
    replicas=st.integers(1, 4),
    limit=st.integers(1, 3),
    requests=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_random_concurrency_never_exceeds_the_limit_and_serves_everyone(
    kind: str, replicas: int, limit: int, requests: int, seed: int
) -> None:
    """Requests hold their replica for random steps and some are cancelled; at every step no
    replica is over its limit, and every request not cancelled is served exactly once."""
    rng = random.Random(seed)

    async def scenario() -> None:
        router = make_router(
            kind, max_ongoing_requests=limit, max_queued_requests=-1, rng=random.Random(seed)
        )
        pool = slots(replicas)
        router.set_replicas(pool)
        served: Counter[int] = Counter()

        async def request(index: int) -> None:
            lease = await router.assign(req())
            try:
                assert all(r.ongoing <= limit for r in pool)
                served[index] += 1
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)
            finally:
                lease.release()

        tasks = [asyncio.ensure_future(request(i)) for i in range(requests)]
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        cancelled = {i for i in range(requests) if rng.random() < 0.2}
        for index in cancelled:
            tasks[index].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for index in range(requests):
            if index not in cancelled or not tasks[index].cancelled():
                assert served[index] == 1, index
            else:
                assert served[index] <= 1
        assert all(r.ongoing == 0 for r in pool)
        assert router.queued == 0

    asyncio.run(scenario())


@given(
    seed=st.integers(0, 2**16),
    loads=st.lists(st.integers(0, 5), min_size=2, max_size=8),
)
@settings(max_examples=100, deadline=None)
def test_power_of_two_never_picks_the_one_busiest_replica(seed: int, loads: list[int]) -> None:
    """It takes the lesser of two distinct samples, so a replica busier than every other one is
    never chosen, whatever the randomness."""
    router = p2c(limit=1000, seed=seed)
    pool = slots(len(loads))
    for replica, load in zip(pool, loads, strict=True):
        replica.ongoing = load
    busiest = max(loads)
    chosen = router.choose(pool, req())
    assert chosen is not None
    if loads.count(busiest) == 1:
        assert chosen.ongoing < busiest


def test_power_of_two_spreads_load() -> None:
    """Requests that never finish end up spread evenly (fixed seed: deterministic)."""
    router = p2c(limit=1000, seed=1)
    pool = slots(6)
    for _ in range(600):
        chosen = router.choose(pool, req())
        assert chosen is not None
        chosen.ongoing += 1
    counts = [r.ongoing for r in pool]
    assert max(counts) - min(counts) <= 3, counts


def hash_router(limit: int = 1000) -> Router:
    return make_router("consistent_hash", max_ongoing_requests=limit, max_queued_requests=-1)


def test_consistent_hash_keeps_a_key_on_one_replica_and_spreads_keys() -> None:
    router = hash_router()
    pool = slots(4)
    first = {f"user-{i}": router.choose(pool, req(f"user-{i}")) for i in range(1000)}
    assert all(router.choose(pool, req(key)) is replica for key, replica in first.items())
    shares = Counter(r.replica_id for r in first.values() if r is not None)
    assert len(shares) == 4
    assert all(150 <= count <= 350 for count in shares.values()), shares


@given(
    keys=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=60), gone=st.integers(0, 4)
)
@settings(max_examples=50, deadline=None)
def test_consistent_hash_moves_only_the_keys_of_a_removed_replica(
    keys: list[str], gone: int
) -> None:
    pool = slots(5)
    before = {key: hash_router().choose(pool, req(key)) for key in keys}
    after_pool = [r for i, r in enumerate(pool) if i != gone]
    router = hash_router()
    for key in keys:
        if before[key] is not pool[gone]:
            assert router.choose(after_pool, req(key)) is before[key]


def test_consistent_hash_spills_from_a_full_replica_and_never_overfills() -> None:
    router = hash_router(limit=1)
    pool = slots(3)
    home = router.choose(pool, req("k"))
    assert home is not None
    home.ongoing = 1
    spilled = router.choose(pool, req("k"))
    assert spilled is not None and spilled is not home
    for replica in pool:
        replica.ongoing = 1
    assert router.choose(pool, req("k")) is None
    assert router.choose(pool, req()) is None


@pytest.mark.anyio
async def test_a_queued_request_keeps_its_key() -> None:
    router = hash_router(limit=1)
    pool = slots(2)
    router.set_replicas(pool)
    lease = await router.assign(req("sticky"))
    home = lease.replica
    other = next(r for r in pool if r is not home)
    other.ongoing = 1  # both full: the next request for "sticky" must queue
    waiting = asyncio.ensure_future(router.assign(req("sticky")))
    await asyncio.sleep(0)
    assert not waiting.done()
    lease.release()
    assert (await waiting).replica is home


@given(priorities=st.lists(st.integers(-3, 3), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_waiters_leave_highest_priority_first_and_in_arrival_order_within_one(
    priorities: list[int],
) -> None:
    async def scenario() -> list[int]:
        router = p2c(limit=1)
        router.set_replicas(slots(1))
        busy = await router.assign(req())
        order: list[int] = []

        async def waiter(index: int) -> None:
            lease = await router.assign(Request("d", priority=priorities[index]))
            order.append(index)
            lease.release()

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(len(priorities))]
        await asyncio.sleep(0)
        assert router.queued == len(priorities)
        busy.release()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order == sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))


@pytest.mark.anyio
async def test_a_full_queue_takes_a_higher_priority_in_place_of_its_newest_lowest() -> None:
    router = p2c(limit=1, queued=2)
    router.set_replicas(slots(1))
    busy = await router.assign(req())
    old = asyncio.ensure_future(router.assign(Request("d", priority=0)))
    new = asyncio.ensure_future(router.assign(Request("d", priority=0)))
    await asyncio.sleep(0)
    with pytest.raises(BackPressureError, match="max_queued_requests=2"):
        await router.assign(Request("d", priority=0))  # no one to displace: refused
    urgent = asyncio.ensure_future(router.assign(Request("d", priority=5)))
    await asyncio.sleep(0)
    with pytest.raises(BackPressureError, match="priority 5 took its place"):
        await new
    assert router.queued == 2
    busy.release()
    first = await urgent
    assert not old.done()
    first.release()
    (await old).release()
    assert router.queued == 0


class Yielding(PowerOfTwoChoicesRouter):
    """Hands the GIL over while it chooses, as a slow custom router might."""

    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        chosen = super().choose(replicas, request)
        time.sleep(1e-6)  # between the look at the counts and the count of the choice
        return chosen


def test_threads_and_the_loop_take_turns_at_the_counts() -> None:
    """The loop and four threads take and give back leases of one replica at once, more than
    it has room for, each handing the GIL over in the middle of its turn: the replica never
    counts more than its limit, and every slot comes back."""

    async def main() -> None:
        router = Yielding(max_ongoing_requests=2, rng=random.Random(0))
        (only,) = replicas = slots(1)
        router.set_replicas(replicas)
        router.allow_threads()
        loop = asyncio.get_running_loop()
        counts: list[int] = []

        def thread_side() -> None:
            for _ in range(200):
                lease = router.try_assign_here(req())
                if lease is not None:
                    counts.append(only.ongoing)
                    lease.release_here(loop)

        threads = [threading.Thread(target=thread_side) for _ in range(4)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            leases = [router.try_assign(req()) for _ in range(2)]
            counts.extend(only.ongoing for lease in leases if lease is not None)
            for lease in leases:
                if lease is not None:
                    lease.release()
            await asyncio.sleep(0)
        for thread in threads:
            thread.join()
        await asyncio.sleep(0.01)  # slots a thread left to the loop to give back
        assert len(counts) > 100 and max(counts) <= 2
        assert only.ongoing == 0

    asyncio.run(main())

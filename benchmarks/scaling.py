"""Shared deployments against their floors, on one LocalCluster in one run.

Measures, with two runtimes of one namespace in this process (each on its own loop thread and
Dask client, as two ingress processes would be) and a deployment of two replicas:

- ``registry_update``: from ``set_traffic`` on one runtime until the other routes by it, against
  the floor of a raw Dask event from one client to a subscriber on another (what the registry
  tells its changes by), medians of interleaved rounds;
- ``registry_state``: the time of one read of a namespace's state from the scheduler with R
  replicas published (R = 10, 100, 1000; what every runtime reads on each change);
- ``calls_per_s``: handle calls with 64 in flight through the runtime that owns the replicas and
  through one attached to them (the ratio shows that an attached runtime adds no hop), and the
  p50 of sequential calls through each.

Prints JSON. ``--quick`` runs a smoke-sized version in a few seconds.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where a sibling would shadow
# the `dask` package itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import embserve  # noqa: E402
from embserve_dask import DaskBackend  # noqa: E402
from embserve_dask._registry import DaskRegistry  # noqa: E402

IN_FLIGHT = 64


@embserve.deployment(num_replicas=2, max_ongoing_requests=IN_FLIGHT, max_queued_requests=-1)
class Echo:
    """The deployment measured: returns what it gets."""

    async def __call__(self, x: Any) -> Any:
        return x


@embserve.deployment(num_replicas=1)
class Other:
    """Where the traffic switches to and back."""

    def __call__(self, x: Any) -> Any:
        return x


def _wait(probe: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError("the change was not seen within 10 s")
        time.sleep(0.0002)


def registry_update(a: embserve.Runtime, b: embserve.Runtime, scheduler: str, rounds: int) -> Any:
    """Milliseconds from a change on ``a`` until ``b`` routes by it, and the event floor."""
    import distributed

    Client: Any = distributed.Client
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    heard = threading.Event()
    with Client(scheduler) as sender, Client(scheduler) as listener:
        listener.subscribe_topic(topic, lambda event: heard.set())
        for _ in range(100):  # the subscription reaches the scheduler on its own stream
            sender.log_event(topic, {"round": -1})
            if heard.wait(0.1):
                break
        shared: list[float] = []
        floor: list[float] = []
        for i in range(rounds):
            weights = {"echo": 1.0} if i % 2 else {"echo": 1.0, "other": 1.0}
            began = time.perf_counter()
            a.set_traffic("echo", weights)
            _wait(lambda w=weights: b.status().endpoints["echo"].traffic.keys() == w.keys())
            shared.append((time.perf_counter() - began) * 1e3)
            heard.clear()
            began = time.perf_counter()
            sender.log_event(topic, {"round": i})
            if not heard.wait(10):
                raise TimeoutError("a Dask event was not heard within 10 s")
            floor.append((time.perf_counter() - began) * 1e3)
    return {
        "p50_ms": round(statistics.median(shared), 3),
        "max_ms": round(max(shared), 3),
        "event_floor_p50_ms": round(statistics.median(floor), 3),
        "ratio_to_floor": round(statistics.median(shared) / statistics.median(floor), 2),
    }


async def _state_times(scheduler: str, sizes: list[int], reads: int) -> dict[str, Any]:
    import distributed

    Client: Any = distributed.Client
    out: dict[str, Any] = {}
    async with Client(scheduler, asynchronous=True) as client:
        for size in sizes:
            registry = DaskRegistry(client, f"bench-{uuid.uuid4().hex[:8]}", "bench-owner")
            await registry.open()
            await registry.join("model", "bench-owner", version="1", spec=b"x" * 1024)
            contacts = {
                f"model#{i}": {
                    "address": f"tcp://10.0.{i // 250}.{i % 250}:40000",
                    "token": os.urandom(32),
                    "worker": f"tcp://10.0.{i // 250}.{i % 250}:39000",
                    "key": f"embserve-model#{i}-0123abcd",
                    "info": {"pid": 1000 + i, "gpu_ids": ["0"]},
                    "serial": 1,
                }
                for i in range(size)
            }
            began = time.perf_counter()
            await registry.set_replicas("model", "bench-owner", contacts)
            publish_ms = (time.perf_counter() - began) * 1e3
            times = []
            for _ in range(reads):
                began = time.perf_counter()
                await registry.state()
                times.append((time.perf_counter() - began) * 1e3)
            out[f"replicas_{size}"] = {
                "publish_ms": round(publish_ms, 3),
                "read_p50_ms": round(statistics.median(times), 3),
            }
            await registry.leave("bench-owner")
            await registry.close()
    return out


async def _throughput(handle: embserve.Handle, calls: int) -> float:
    done = 0
    began = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        while done < calls:
            done += 1
            await handle.remote(1)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return calls / (time.perf_counter() - began)


def _sequential_p50_us(handle: embserve.Handle, calls: int) -> float:
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        handle.remote(1).result(timeout_s=10)
        times.append((time.perf_counter() - began) * 1e6)
    return statistics.median(times)


def calls_per_s(a: embserve.Runtime, b: embserve.Runtime, rounds: int, calls: int) -> Any:
    """Calls/s with 64 in flight, and sequential p50, through the owner and an attached one."""
    owner, attached = a.get_handle("echo"), b.get_handle("echo")
    rates: dict[str, list[float]] = {"owner": [], "attached": []}
    p50: dict[str, list[float]] = {"owner": [], "attached": []}
    for rt, handle in ((a, owner), (b, attached)):  # warm both paths up first
        assert rt.loop is not None
        asyncio.run_coroutine_threadsafe(_throughput(handle, calls // 4), rt.loop).result(120)
    for _ in range(rounds):  # interleaved
        for name, rt, handle in (("owner", a, owner), ("attached", b, attached)):
            assert rt.loop is not None
            future = asyncio.run_coroutine_threadsafe(_throughput(handle, calls), rt.loop)
            rates[name].append(future.result(120))
            p50[name].append(_sequential_p50_us(handle, max(50, calls // 20)))
    result: dict[str, Any] = {
        f"{name}_calls_per_s": round(statistics.median(values)) for name, values in rates.items()
    }
    result.update(
        {f"{name}_p50_us": round(statistics.median(values), 1) for name, values in p50.items()}
    )
    result["attached_to_owner_ratio"] = round(
        statistics.median(rates["attached"]) / statistics.median(rates["owner"]), 2
    )
    return result


def main() -> None:
    """Run every measurement and print the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run")
    args = parser.parse_args()
    rounds, calls, sizes = (3, 400, [10, 100]) if args.quick else (15, 4000, [10, 100, 1000])

    import distributed

    LocalCluster: Any = distributed.LocalCluster
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        scheduler = cluster.scheduler_address
        with (
            embserve.Runtime(DaskBackend(scheduler), namespace="bench") as a,
            embserve.Runtime(DaskBackend(scheduler), namespace="bench") as b,
        ):
            a.run(Echo.bind(), name="echo")
            a.run(Other.bind(), name="other")
            b.get_handle("echo")
            _wait(lambda: b.status().deployments["echo"].running_replicas == 2)
            _wait(lambda: "other" in b.status().deployments)
            report = {
                "benchmark": "scaling",
                "quick": args.quick,
                "registry_update": registry_update(a, b, scheduler, rounds * 2),
                "registry_state": asyncio.run(_state_times(scheduler, sizes, rounds * 2)),
                "calls": calls_per_s(a, b, rounds, calls),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The Dask backend's request path against its floors, on one LocalCluster in one run.

Measures, from one asyncio caller in this process to one worker process on loopback:

- ``comm``: a raw ``distributed.comm`` TCP round trip to an echo listener on the worker (the
  floor the backend builds on); with 64 in flight both as 64 comms and pipelined on one,
- ``actor``: a raw Dask actor call (what the backend would be if built on actors),
- ``embserve``: ``await handle.remote(x)`` through a runtime on the DaskBackend,

each as the p50 of sequential calls and as calls per second with 64 in flight. Prints JSON with
the ratios of embserve to both floors. ``--quick`` runs a smoke-sized version in a few seconds.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where this file would shadow the
# `dask` package itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import embserve  # noqa: E402
from embserve_dask import DaskBackend  # noqa: E402

IN_FLIGHT = 64


class EchoActor:
    """The actor of the floor: returns what it gets."""

    def echo(self, x: Any) -> Any:
        """Return ``x``."""
        return x


@embserve.deployment(max_ongoing_requests=IN_FLIGHT, max_queued_requests=-1)
class Echo:
    """The deployment measured: returns what it gets."""

    async def __call__(self, x: Any) -> Any:
        return x


async def start_echo_listener(dask_worker: Any) -> str:
    """Runs on the worker's loop (``client.run``): a listener that answers each message."""
    from distributed.comm import core as comm_core

    listen: Any = comm_core.listen

    async def handler(comm: Any) -> None:
        try:
            while True:
                await comm.write(await comm.read())
        except comm_core.CommClosedError:
            pass

    listener = listen("tcp://127.0.0.1:0", handler)
    await listener.start()
    dask_worker._embserve_bench_listener = listener
    return str(listener.contact_address)


async def p50_us(call: Callable[[], Awaitable[Any]], n: int) -> float:
    """The median latency of ``n`` sequential calls, in microseconds."""
    for _ in range(min(50, n)):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


async def rate(call: Callable[[], Awaitable[Any]], seconds: float) -> float:
    """Calls per second with ``IN_FLIGHT`` callers each calling back to back."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return done / (time.perf_counter() - start)


async def main(quick: bool) -> dict[str, Any]:
    import distributed
    from distributed.comm import core as comm_core

    # distributed's functions are untyped; they are used through these names.
    Client: Any = distributed.Client
    LocalCluster: Any = distributed.LocalCluster
    connect: Any = comm_core.connect

    n, seconds = (300, 1.0) if quick else (3000, 4.0)
    cluster = await LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=":0",
        asynchronous=True,
    )
    client = await Client(cluster, asynchronous=True)
    results: dict[str, Any] = {"quick": quick, "in_flight": IN_FLIGHT}
    try:
        # Floor 1: a raw comm round trip, one message each way.
        (address,) = (await client.run(start_echo_listener)).values()
        comm = await connect(address)

        async def comm_call() -> Any:
            await comm.write({"x": 1})
            return await comm.read()

        results["comm_p50_us"] = await p50_us(comm_call, n)
        # With 64 in flight on one comm the echo answers in order, so a lock keeps each
        # caller's write and read together: the floor's best case is pipelining, not this.
        comms = [await connect(address) for _ in range(IN_FLIGHT)]
        free: asyncio.Queue[Any] = asyncio.Queue()
        for c in comms:
            free.put_nowait(c)

        async def comm_pool_call() -> Any:
            c = await free.get()
            try:
                await c.write({"x": 1})
                return await c.read()
            finally:
                free.put_nowait(c)

        results["comm_calls_per_s"] = await rate(comm_pool_call, seconds)
        # And 64 in flight pipelined on one comm: answers come back in order.
        waiting: collections.deque[asyncio.Future[None]] = collections.deque()

        async def read_answers() -> None:
            while True:
                await comm.read()
                waiting.popleft().set_result(None)

        reader = asyncio.ensure_future(read_answers())

        async def comm_pipelined_call() -> None:
            answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(answer)
            await comm.write({"x": 1})
            await answer

        results["comm_pipelined_calls_per_s"] = await rate(comm_pipelined_call, seconds)
        reader.cancel()
        for c in [comm, *comms]:
            await c.close()

        # Floor 2: a Dask actor.
        actor = await client.submit(EchoActor, actor=True)
        results["actor_p50_us"] = await p50_us(lambda: actor.echo(1), n)
        results["actor_calls_per_s"] = await rate(lambda: actor.echo(1), seconds)

        # The backend.
        async with embserve.Runtime(backend=DaskBackend(client)) as runtime:
            handle = await runtime.run_async(Echo.bind(), name="echo")
            results["embserve_p50_us"] = await p50_us(lambda: handle.remote(1), n)
            results["embserve_calls_per_s"] = await rate(lambda: handle.remote(1), seconds)
    finally:
        await client.close()
        await cluster.close()
    results["p50_vs_comm"] = round(results["embserve_p50_us"] / results["comm_p50_us"], 2)
    results["p50_vs_actor"] = round(results["embserve_p50_us"] / results["actor_p50_us"], 2)
    results["rate_vs_actor"] = round(
        results["embserve_calls_per_s"] / results["actor_calls_per_s"], 2
    )
    results["rate_vs_comm"] = round(
        results["embserve_calls_per_s"] / results["comm_calls_per_s"], 2
    )
    results["rate_vs_comm_pipelined"] = round(
        results["embserve_calls_per_s"] / results["comm_pipelined_calls_per_s"], 2
    )
    for key, value in results.items():
        if isinstance(value, float) and not key.startswith(("p50_vs", "rate_vs")):
            results[key] = round(value, 1)
    return results


def write_report(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as JSON; with ``out``, write it there too, with the machine it ran on."""
    print(json.dumps(report, indent=2))
    if out:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        Path(out).write_text(json.dumps({**report, "machine": machine}, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    options = parser.parse_args()
    write_report(asyncio.run(main(options.quick)), options.out)

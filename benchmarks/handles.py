"""Handle-call overhead on the local backend, each figure beside its floor from the same run.

    python benchmarks/handles.py [--quick]

Prints one JSON object. Figures:

- ``async``: sequential calls from a coroutine on the runtime's loop, against an asyncio queue
  hand-off to a consumer task in the same loop (the least a handle call could cost).
- ``sync``: sequential ``.result()`` calls from a plain thread, against a bare
  ``run_coroutine_threadsafe`` into the loop (the least a sync caller could cost).
- ``throughput``: calls/s with 64 in flight, from the loop and from a thread.
- ``startup``: a runtime started, called once and shut down; idle RSS of this process.

Targets (issue 2): async p50 <= 25 us, sync p50 <= 60 us, >= 40,000 calls/s with 64 in flight,
start + first call + shutdown < 50 ms, idle RSS <= 80 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import embserve


@embserve.deployment(max_ongoing_requests=1000, max_queued_requests=-1)
class Noop:
    """The deployment every figure calls."""

    async def __call__(self, x: int) -> int:
        return x


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in microseconds."""
    ordered = sorted(samples)
    return {
        "p50_us": round(ordered[len(ordered) // 2] * 1e6, 2),
        "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 2),
    }


async def time_async(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    """Latencies of ``count`` sequential awaited calls."""
    for _ in range(count // 10):  # warm up
        await call()
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        start = clock()
        await call()
        samples.append(clock() - start)
    return samples


def time_sync(call: Callable[[], Any], count: int) -> list[float]:
    """Latencies of ``count`` sequential blocking calls."""
    for _ in range(count // 10):
        call()
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


async def queue_floor(count: int) -> list[float]:
    """An asyncio queue hand-off to a consumer task that answers through a future."""
    queue: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            item, future = await queue.get()
            future.set_result(item)

    task = asyncio.ensure_future(consumer())
    loop = asyncio.get_running_loop()

    async def call() -> int:
        future: asyncio.Future[int] = loop.create_future()
        queue.put_nowait((1, future))
        return await future

    samples = await time_async(call, count)
    task.cancel()
    return samples


async def async_throughput(call: Callable[[], Awaitable[Any]], total: int) -> float:
    """Calls per second with 64 callers on the loop."""
    per_caller = total // 64

    async def caller() -> None:
        for _ in range(per_caller):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(64)))
    return per_caller * 64 / (time.perf_counter() - start)


def sync_throughput(call: Callable[[], Any], total: int) -> float:
    """Calls per second from one thread keeping 64 in flight (waves of 64)."""
    waves = total // 64
    start = time.perf_counter()
    for _ in range(waves):
        responses = [call() for _ in range(64)]
        for response in responses:
            response.result()
    return waves * 64 / (time.perf_counter() - start)


def startup_ms(repeats: int) -> float:
    """Median time to start a runtime, answer a first call, and shut it down."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with embserve.Runtime() as runtime:
            runtime.run(Noop.bind()).remote(1).result()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def rss_mib() -> float:
    """Peak resident memory of this process, MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    options = parser.parse_args()
    count = 500 if options.quick else 20_000
    total = 64 * (10 if options.quick else 1_000)
    gc.freeze()

    idle = {"startup_ms": startup_ms(3 if options.quick else 20)}
    with embserve.Runtime() as runtime:
        handle = runtime.run(Noop.bind())
        idle["idle_rss_mib"] = rss_mib()
        loop = runtime.loop
        assert loop is not None

        async def on_loop() -> dict[str, Any]:
            floor = percentiles(await queue_floor(count))
            ours = percentiles(await time_async(lambda: handle.remote(1), count))
            rate = await async_throughput(lambda: handle.remote(1), total)

            async def bare() -> int:
                return 1

            return {"floor": floor, "ours": ours, "calls_per_s": round(rate), "bare": bare}

        measured = asyncio.run_coroutine_threadsafe(on_loop(), loop).result()
        bare = measured.pop("bare")
        sync_floor = percentiles(
            time_sync(lambda: asyncio.run_coroutine_threadsafe(bare(), loop).result(), count)
        )
        sync_ours = percentiles(time_sync(lambda: handle.remote(1).result(), count))
        sync_rate = sync_throughput(lambda: handle.remote(1), total)
        floor_rate = sync_throughput(lambda: asyncio.run_coroutine_threadsafe(bare(), loop), total)

    report: dict[str, Any] = {
        "benchmark": "handles",
        "python": sys.version.split()[0],
        "threads_left": threading.active_count() - 1,
        "async": {
            **measured["ours"],
            "floor_p50_us": measured["floor"]["p50_us"],
            "ratio_p50": round(measured["ours"]["p50_us"] / measured["floor"]["p50_us"], 2),
        },
        "sync": {
            **sync_ours,
            "floor_p50_us": sync_floor["p50_us"],
            "ratio_p50": round(sync_ours["p50_us"] / sync_floor["p50_us"], 2),
        },
        "throughput_64_in_flight": {
            "async_calls_per_s": measured["calls_per_s"],
            "sync_calls_per_s": round(sync_rate),
            "sync_floor_calls_per_s": round(floor_rate),
        },
        **idle,
    }
    report["targets"] = {
        "async_p50_le_25us": report["async"]["p50_us"] <= 25,
        "async_p50_le_5x_floor": report["async"]["ratio_p50"] <= 5,
        "sync_p50_le_60us": report["sync"]["p50_us"] <= 60,
        "calls_per_s_ge_40000": measured["calls_per_s"] >= 40_000,
        "startup_lt_50ms": idle["startup_ms"] < 50,
        "idle_rss_le_80mib": idle["idle_rss_mib"] <= 80,
    }
    write_report(report, options.out)


def write_report(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as JSON; with ``out``, write it there too, with the machine it ran on."""
    print(json.dumps(report, indent=2))
    if out:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        Path(out).write_text(json.dumps({**report, "machine": machine}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Sync callers: plain threads calling a sync deployment, beside a cross-thread loop call.

    python benchmarks/threads.py [--quick] [--out FILE]

Prints one JSON object (and writes it to FILE). The caller is what a Flask or Django view is:
a plain thread calling ``handle.remote(x).result()`` on sync user code in this process. The
floor is the least a thread pays to have the runtime's loop do anything for it:
``asyncio.run_coroutine_threadsafe(noop(), loop).result()`` (one hop there, one back).

- ``one_thread``: p50 of sequential calls from one thread, against the floor's p50.
- ``sixteen_threads``: calls/s of 16 threads calling at once, against the floor's calls/s
  with 16 threads.
- ``in_caller_thread``: the share of calls that ran in their caller's thread.

Medians of interleaved rounds (floor, then ours, each round). Targets (issue 11): p50 <= 0.5x
the floor, 16-thread calls/s >= 1.0x the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import embserve


@embserve.deployment(max_ongoing_requests=16)
class Model:
    """Sync user code, as a scikit-learn model's predict is; says which thread ran it."""

    def __call__(self, x: int) -> int:
        return threading.get_ident()


async def noop() -> int:
    return 0


def p50_us(call: Callable[[], Any], count: int) -> float:
    for _ in range(count // 10):  # warm up
        call()
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        began = clock()
        call()
        samples.append(clock() - began)
    return statistics.median(samples) * 1e6


def calls_per_s(call: Callable[[], Any], threads: int, each: int) -> float:
    start = threading.Barrier(threads + 1)

    def lane() -> None:
        start.wait()
        for _ in range(each):
            call()

    lanes = [threading.Thread(target=lane) for _ in range(threads)]
    for thread in lanes:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in lanes:
        thread.join()
    return threads * each / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--out", help="also write the JSON to this file")
    options = parser.parse_args()
    rounds = 2 if options.quick else 5
    count = 200 if options.quick else 5_000
    each = 50 if options.quick else 1_000

    figures: dict[str, list[float]] = {k: [] for k in ("floor", "ours", "floor16", "ours16")}
    with embserve.Runtime() as runtime:
        handle = runtime.run(Model.bind())
        loop = runtime.loop
        assert loop is not None

        def floor() -> Any:
            return asyncio.run_coroutine_threadsafe(noop(), loop).result()

        def ours() -> Any:
            return handle.remote(1).result()

        for _ in range(rounds):
            figures["floor"].append(p50_us(floor, count))
            figures["ours"].append(p50_us(ours, count))
            figures["floor16"].append(calls_per_s(floor, 16, each))
            figures["ours16"].append(calls_per_s(ours, 16, each))
        me = threading.get_ident()
        here = sum(handle.remote(1).result() == me for _ in range(count)) / count

    median = {name: statistics.median(values) for name, values in figures.items()}
    report: dict[str, Any] = {
        "benchmark": "threads",
        "python": sys.version.split()[0],
        "rounds": rounds,
        "one_thread": {
            "p50_us": round(median["ours"], 2),
            "floor_p50_us": round(median["floor"], 2),
            "ratio": round(median["ours"] / median["floor"], 3),
            "target_ratio_le": 0.5,
        },
        "sixteen_threads": {
            "calls_per_s": round(median["ours16"]),
            "floor_calls_per_s": round(median["floor16"]),
            "ratio": round(median["ours16"] / median["floor16"], 2),
            "target_ratio_ge": 1.0,
        },
        "in_caller_thread": round(here, 3),
    }
    report["targets"] = {
        "p50_le_half_floor": report["one_thread"]["ratio"] <= 0.5,
        "calls_per_s_ge_floor": report["sixteen_threads"]["ratio"] >= 1.0,
    }
    print(json.dumps(report, indent=2))
    if options.out:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        with open(options.out, "w") as out:
            out.write(json.dumps({**report, "machine": machine}, indent=2) + "\n")


if __name__ == "__main__":
    main()

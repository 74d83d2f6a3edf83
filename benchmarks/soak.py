"""A soak: a fixed-rate mixed load with replica kills, watching memory, errors and latency.

    python benchmarks/soak.py [--minutes 10] [--rate 0.7] [--kill-every 60] [--backend process]

Not part of CI (it runs for minutes). It measures what this machine serves first (closed-loop,
64 in flight, for a few seconds), then sends requests at ``--rate`` times that, open-loop (at
fixed times, whether or not answers came: a slow server gets a queue, not fewer requests),
mixed: plain calls, calls whose user code raises, streams and batched calls. Every
``--kill-every`` seconds it SIGKILLs one replica's worker process (process backend). Each
``--report-every`` seconds it prints one JSON line: the RSS of this process and of every
replica process, answers by kind (``ok``, ``user_error``, ``replica_died``, ``rejected``,
``other``), latency percentiles, requests outstanding past ``--hang-s`` (hung), and sends the
generator shed because ``--max-in-flight`` were outstanding (its own overload). The last
line sums up, with the targets: RSS growth after warm-up < 5 %, 0 hung, every kill recovered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import embserve

# Latencies kept per report window, sampled evenly from all of the window's answers.
_SAMPLE = 20_000


@embserve.deployment(num_replicas=2, max_ongoing_requests=16, max_queued_requests=-1)
class Soaked:
    """The deployment under load: every kind of call the soak sends."""

    async def __call__(self, x: int) -> int:
        return x

    async def fail(self, x: int) -> int:
        raise ValueError(f"user error {x}")

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def batched(self, xs: list[int]) -> list[int]:
        return xs


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def replica_pids(rt: embserve.Runtime) -> list[int]:
    """The worker processes of the running replicas (empty for in-thread replicas)."""
    pids = []
    for replica in rt.status().deployments["Soaked"].replicas:
        pid = replica.info.get("pid") if replica.info else None
        if isinstance(pid, int) and pid != os.getpid():
            pids.append(pid)
    return pids


async def one(handle: Any, kind: str, rng: random.Random) -> None:
    """Send one request of ``kind``; raises what the request raised."""
    if kind == "call":
        await handle.remote(rng.randrange(1000))
    elif kind == "fail":
        await handle.fail.remote(1)
    elif kind == "stream":
        items = [i async for i in handle.options(stream=True).count.remote(5)]
        assert items == list(range(5))
    else:
        await handle.batched.remote(rng.randrange(1000))


def kind_of(error: BaseException | None) -> str:
    """How an answer counts in the report."""
    if error is None:
        return "ok"
    if isinstance(error, ValueError):
        return "user_error"
    if isinstance(error, embserve.ReplicaDiedError):
        return "replica_died"
    if isinstance(error, embserve.BackPressureError):
        return "rejected"
    return "other"


async def capacity(handle: Any, kinds: list[str], seconds: float) -> float:
    """Requests of the soak's mix per second with 64 in flight (the load generator included:
    it shares this process and its loop with the runtime, as the soak's does)."""
    done = 0
    deadline = time.monotonic() + seconds
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            # A task a request, as the soak sends them.
            with contextlib.suppress(Exception):
                await asyncio.ensure_future(one(handle, rng.choice(kinds), rng))
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(64)))
    return done / (time.monotonic() - started)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; the summary."""
    rng = random.Random(0)
    async with embserve.Runtime(backend=args.backend) as rt:
        handle = await rt.run_async(Soaked.bind())
        kinds = ["call"] * 6 + ["fail", "stream", "batched", "batched"]
        measured = await capacity(handle, kinds, args.measure_s)
        rate = max(1.0, measured * args.rate)
        outstanding: dict[int, float] = {}
        window: Counter[str] = Counter()
        latencies: list[float] = []
        seen = [0]  # answers in this window
        reports: list[dict[str, Any]] = []
        kills = recovered = 0
        ids = iter(range(10**12))
        tasks: set[asyncio.Task[None]] = set()

        async def send(kind: str) -> None:
            ident = next(ids)
            started = time.monotonic()
            outstanding[ident] = started
            error: BaseException | None = None
            try:
                await one(handle, kind, rng)
            except Exception as exc:
                error = exc
            finally:
                del outstanding[ident]
            window[kind_of(error)] += 1
            # A bounded sample of the window's latencies (reservoir sampling): the generator's
            # own memory must stay flat too, since the RSS measured is this process's.
            seen[0] += 1
            latency = time.monotonic() - started
            if len(latencies) < _SAMPLE:
                latencies.append(latency)
            else:
                slot = rng.randrange(seen[0])
                if slot < _SAMPLE:
                    latencies[slot] = latency

        began = time.monotonic()
        end = began + args.seconds
        next_send, next_kill, next_report = began, began + args.kill_every, began + args.report
        shed = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            while next_send <= now:  # open loop: catch up on sends that are due
                next_send += 1.0 / rate
                if len(outstanding) >= args.max_in_flight:
                    shed += 1  # the load generator's own bound: counted, not sent
                    continue
                task = asyncio.ensure_future(send(rng.choice(kinds)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if args.backend == "process" and now >= next_kill:
                next_kill += args.kill_every
                pids = replica_pids(rt)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
            if now >= next_report:
                next_report += args.report
                hung = sum(1 for t in outstanding.values() if now - t > args.hang_s)
                ordered = sorted(latencies) or [0.0]
                running = rt.status().deployments["Soaked"].running_replicas
                report = {
                    "t_s": round(now - began, 1),
                    "rate_per_s": round(rate),
                    "answers": dict(window),
                    "p50_ms": round(statistics.median(ordered) * 1e3, 3),
                    "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1e3, 3),
                    "outstanding": len(outstanding),
                    "shed": shed,
                    "hung": hung,
                    "rss_mib": {"runtime": round(rss_mib(os.getpid()), 1)}
                    | {str(pid): round(rss_mib(pid), 1) for pid in replica_pids(rt)},
                    "running_replicas": running,
                    "kills": kills,
                }
                if kills and running == 2:
                    recovered = kills
                print(json.dumps(report), flush=True)
                reports.append(report)
                shed = 0
                window.clear()
                latencies.clear()
                seen[0] = 0
            await asyncio.sleep(min(next_send, next_kill, next_report, end) - time.monotonic())
        drain_deadline = time.monotonic() + args.hang_s
        while tasks and time.monotonic() < drain_deadline:
            await asyncio.wait(set(tasks), timeout=drain_deadline - time.monotonic())
        hung_at_end = len(tasks)
    runtime_rss = [r["rss_mib"]["runtime"] for r in reports]
    warm = runtime_rss[len(runtime_rss) // 3 :] or runtime_rss or [0.0]
    growth = (warm[-1] - warm[0]) / warm[0] if warm[0] else 0.0
    return {
        "benchmark": "soak",
        "backend": args.backend,
        "seconds": args.seconds,
        "capacity_per_s": round(measured),
        "rate_per_s": round(rate),
        "kills": kills,
        "kills_recovered": recovered,
        "hung": max([r["hung"] for r in reports] + [hung_at_end]),
        "shed": sum(r["shed"] for r in reports),
        "runtime_rss_growth_after_warmup": round(growth, 4),
        "targets": {
            "rss_growth_lt_5pct": growth < 0.05,
            "zero_hung": hung_at_end == 0 and all(r["hung"] == 0 for r in reports),
            "every_kill_recovered": recovered == kills,
        },
    }


def main() -> None:
    """Parse the options, run the soak, print the summary as the last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    parser.add_argument("--rate", type=float, default=0.7, help="share of measured capacity")
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--report", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--hang-s", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--measure-s", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--backend", default="process")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=1024,
        help="the load generator sheds (and counts) sends beyond this many outstanding",
    )
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = args.minutes * 60
    summary = asyncio.run(soak(args))
    print(json.dumps(summary), flush=True)
    if args.out:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        Path(args.out).write_text(json.dumps({**summary, "machine": machine}, indent=2) + "\n")
    sys.exit(0 if all(summary["targets"].values()) else 1)


if __name__ == "__main__":
    main()

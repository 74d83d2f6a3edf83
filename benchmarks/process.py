"""Calls to a process replica, each figure beside a raw ``multiprocessing`` floor from the same run.

    python benchmarks/process.py [--quick]

Prints one JSON object. Figures:

- ``latency``: sequential handle calls to one process replica (async user code), awaited on the
  runtime's own loop, against a raw round trip over a ``multiprocessing`` Pipe to an echo
  process (pickle 5 each way, no event loop on either side). The replica's worker polls for
  the next request for up to 100 µs before it sleeps, and the runtime's loop for the answer
  (the default); ``no_busy_poll`` is the same with ``ProcessBackend(busy_poll_s=0)``. Shown
  beside them, to explain the gap: a bare socket echo between two asyncio loops
  (``asyncio_echo``: the least any design with an event loop on each side pays) and the same
  handle calls from a plain thread (``.result()``, sent and read by the thread itself on the
  replica's direct line; ``sync_ratio``).
- ``throughput``: calls/s with 64 in flight, against the raw Pipe with 64 messages in flight.
- ``numpy_8mb``: an 8 MiB float64 array sent to the replica and back, against pickle 5 with
  out-of-band buffers over the raw Pipe (frames written as they are, no copy into the pickle).

Targets (issue 5): latency ratio <= 2, numpy_8mb ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import platform
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

import embserve
from embserve.backends import ProcessBackend


@embserve.deployment(max_ongoing_requests=1000, max_queued_requests=-1)
class Echo:
    """The deployment every figure calls."""

    async def __call__(self, x: Any) -> Any:
        return x


# -- the raw floor: an echo process on a multiprocessing Pipe ------------------------------


def send_frames(conn: Connection, value: Any) -> None:
    """``value`` as pickle 5 with its out-of-band buffers, one ``send_bytes`` per frame.

    The first frame carries the buffers' sizes, so the receiver can allocate them up front.
    """
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = b"".join(r.nbytes.to_bytes(8, "big") for r in raws)
    conn.send_bytes(len(raws).to_bytes(4, "big") + sizes + head)
    for raw in raws:
        conn.send_bytes(raw)


def recv_frames(conn: Connection) -> Any:
    """The value :func:`send_frames` sent; buffers are received straight into their memory."""
    first = conn.recv_bytes()
    count = int.from_bytes(first[:4], "big")
    buffers = []
    for index in range(count):
        size = int.from_bytes(first[4 + 8 * index : 12 + 8 * index], "big")
        buffer = bytearray(size)
        conn.recv_bytes_into(buffer)
        buffers.append(buffer)
    return pickle.loads(memoryview(first)[4 + 8 * count :], buffers=buffers)


def echo_server(conn: Connection) -> None:
    """Echo every value until the pipe closes."""
    try:
        while True:
            send_frames(conn, recv_frames(conn))
    except EOFError:
        pass


def loop_echo_server(sock: socket.socket) -> None:
    """Echo raw bytes from an asyncio loop's reader callback (no framing, no pickling)."""
    loop = asyncio.new_event_loop()
    sock.setblocking(False)

    def readable() -> None:
        data = sock.recv(65536)
        if not data:
            loop.stop()
            return
        sock.send(data)

    loop.add_reader(sock.fileno(), readable)
    loop.run_forever()


class LoopEcho:
    """What two asyncio loops alone cost: a socket round trip between reader callbacks.

    Not a target, an explanation: a process replica has an event loop on each side, and this is
    the least such a round trip costs on this machine.
    """

    def __init__(self) -> None:
        self.sock, child = socket.socketpair()
        context = multiprocessing.get_context("spawn")
        self.server = context.Process(target=loop_echo_server, args=(child,), daemon=True)
        self.server.start()
        child.close()
        self.sock.setblocking(False)
        self.waiter: asyncio.Future[bytes] | None = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        data = self.sock.recv(65536)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)

    async def call(self) -> bytes:
        """One round trip of a 64-byte message."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.sock.send(b"x" * 64)
        return await self.waiter

    def close(self) -> None:
        """Stop the echo process."""
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.server.join(5)


class RawPipe:
    """The floor: an echo process on a ``multiprocessing`` Pipe, called without an event loop."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.server = context.Process(target=echo_server, args=(child,), daemon=True)
        self.server.start()
        child.close()

    def call(self, value: Any) -> Any:
        """One round trip."""
        send_frames(self.conn, value)
        return recv_frames(self.conn)

    def window(self, count: int, window: int) -> None:
        """``count`` calls, ``window`` of them in flight at a time."""
        for _ in range(count // window):
            for i in range(window):
                send_frames(self.conn, i)
            for _ in range(window):
                recv_frames(self.conn)

    def close(self) -> None:
        """Stop the echo process."""
        self.conn.close()
        self.server.join(5)


def p50_us(samples: list[float]) -> float:
    """Median in microseconds."""
    return round(statistics.median(samples) * 1e6, 1)


def ms(samples: list[float]) -> float:
    """Median in milliseconds."""
    return round(statistics.median(samples) * 1e3, 3)


def timed(call: Callable[[], Any], count: int) -> list[float]:
    """Latencies of ``count`` sequential blocking calls."""
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


async def timed_async(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    """Latencies of ``count`` sequential awaited calls."""
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        start = clock()
        await call()
        samples.append(clock() - start)
    return samples


async def in_flight(handle: embserve.Handle, count: int, window: int) -> float:
    """Seconds for ``count`` calls with ``window`` in flight at any time, from the loop."""

    async def lane(share: int) -> None:
        for i in range(share):
            await handle.remote(i)

    start = time.perf_counter()
    await asyncio.gather(*(lane(count // window) for _ in range(window)))
    return time.perf_counter() - start


async def measure(count: int, rounds: int, window: int, payload: np.ndarray) -> dict[str, Any]:
    """Every figure, the replica's and the floor's measured in alternating rounds.

    Alternating keeps both under the same load when other work shares the machine.
    """
    floor = RawPipe()
    loops = LoopEcho()
    try:
        async with (
            embserve.Runtime(backend="process") as rt,
            embserve.Runtime(backend=ProcessBackend(busy_poll_s=0)) as sleepy,
        ):
            handle = await rt.run_async(Echo.bind())
            no_poll = await sleepy.run_async(Echo.bind())
            for _ in range(count // 10):  # warm up all four
                floor.call(0)
                await loops.call()
                await handle.remote(0)
                await no_poll.remote(0)
            per_round = max(1, count // rounds)
            raw: list[float] = []
            ours: list[float] = []
            ours_no_poll: list[float] = []
            sync: list[float] = []
            two_loops: list[float] = []
            raw_s = ours_s = 0.0
            raw_big: list[float] = []
            ours_big: list[float] = []
            for _ in range(rounds):
                raw += timed(lambda: floor.call(1), per_round)
                ours += await timed_async(lambda: handle.remote(1), per_round)
                ours_no_poll += await timed_async(lambda: no_poll.remote(1), per_round)
                two_loops += await timed_async(loops.call, per_round)
                sync += await asyncio.to_thread(
                    timed, lambda: handle.remote(1).result(), per_round // 2
                )
                start = time.perf_counter()
                floor.window(per_round * 4, window)
                raw_s += time.perf_counter() - start
                ours_s += await in_flight(handle, per_round * 4, window)
                raw_big += timed(lambda: floor.call(payload), 1)
                ours_big += await timed_async(lambda: handle.remote(payload), 1)
            back = await handle.remote(payload)
            assert np.array_equal(back, payload) and back.flags.writeable
    finally:
        floor.close()
        loops.close()
    calls = rounds * (per_round * 4 // window) * window
    return {
        "raw_p50_us": p50_us(raw),
        "p50_us": p50_us(ours),
        "no_poll_p50_us": p50_us(ours_no_poll),
        "sync_p50_us": p50_us(sync),
        "two_loops_p50_us": p50_us(two_loops),
        "raw_calls_per_s": round(calls / raw_s),
        "calls_per_s": round(calls / ours_s),
        "raw_big_ms": ms(raw_big),
        "big_ms": ms(ours_big),
    }


def main() -> None:
    """Run every figure and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    options = parser.parse_args()
    count, rounds = (600, 6) if options.quick else (6000, 30)
    window = 64
    payload = np.random.default_rng(0).random(1_048_576)  # 8 MiB of float64
    figures = asyncio.run(measure(count, rounds, window, payload))
    report = {
        "benchmark": "process",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "quick": options.quick,
        "latency": {
            "raw_pipe_p50_us": figures["raw_p50_us"],
            "replica_p50_us": figures["p50_us"],
            "ratio": round(figures["p50_us"] / figures["raw_p50_us"], 2),
            "replica_no_busy_poll_p50_us": figures["no_poll_p50_us"],
            "no_busy_poll_ratio": round(figures["no_poll_p50_us"] / figures["raw_p50_us"], 2),
            "asyncio_echo_p50_us": figures["two_loops_p50_us"],
            "replica_sync_caller_p50_us": figures["sync_p50_us"],
            "sync_ratio": round(figures["sync_p50_us"] / figures["raw_p50_us"], 2),
            "target_ratio": 2.0,
        },
        "throughput": {
            "in_flight": window,
            "raw_pipe_calls_per_s": figures["raw_calls_per_s"],
            "replica_calls_per_s": figures["calls_per_s"],
            "ratio": round(figures["calls_per_s"] / figures["raw_calls_per_s"], 2),
        },
        "numpy_8mb": {
            "pickle5_oob_pipe_ms": figures["raw_big_ms"],
            "replica_ms": figures["big_ms"],
            "ratio": round(figures["big_ms"] / figures["raw_big_ms"], 2),
            "target_ratio": 1.5,
        },
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

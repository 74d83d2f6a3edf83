"""HTTP overhead: ``embserve.App`` under hypercorn against a plain Starlette app under hypercorn.

    python benchmarks/http.py [--quick] [--connections 64]

Both apps serve the same no-op handler (``{"ok": true}``), each in a server process of its own;
the load comes from a third process (``wrk`` where installed, otherwise the bounded Python load
generator below: N keep-alive connections, one request in flight on each). Rounds alternate
between the two servers so that both see the same machine; the figures are the medians of the
rounds. Prints one JSON object: req/s, p50 and p99 latency per app, and the ratio of
embserve's req/s to plain Starlette's (target: >= 0.9). ``app_alone_per_request`` adds the
microseconds each app takes per request when called directly, without server or network: the
part of the cost that is embserve's own, and far less noisy on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PATH = "/noop"
# Run as a script, this file's folder heads sys.path and its name hides the standard library's
# `http` package from Starlette: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]


# -- the two servers ------------------------------------------------------------------------


def make_app(kind: str) -> Any:
    """The ASGI app of one side: ``plain`` Starlette or ``embserve``."""
    if kind == "plain":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def noop(request: Request) -> JSONResponse:
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route(PATH, noop)])

    import embserve

    @embserve.deployment(max_ongoing_requests=1000, max_queued_requests=-1)
    class Noop:
        """The no-op endpoint."""

        async def __call__(self, request: Any) -> dict[str, bool]:
            return {"ok": True}

    return embserve.App({PATH: Noop.bind()})


def run_server(kind: str) -> None:
    """Serve one side on a free port of 127.0.0.1; print the port; stop on SIGTERM."""
    from embserve_asgi.server import bind, serve

    sock = bind("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    asyncio.run(serve(make_app(kind), sock, graceful_timeout_s=1.0))


# -- the Python load generator ----------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending the next request as soon as an answer is whole."""

    def __init__(self, request: bytes, until: float, latencies: list[float], done: Any) -> None:
        self.request = request
        self.until = until
        self.latencies = latencies
        self.done = done
        self.buffer = b""
        self.sent = 0.0
        self.errors = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end].lower()
            found = re.search(rb"content-length:\s*(\d+)", head)
            length = int(found.group(1)) if found else 0
            if len(buffer) < end + 4 + length:
                break
            if not head.startswith(b"http/1.1 200"):
                self.errors += 1
            buffer = buffer[end + 4 + length :]
            now = time.perf_counter()
            self.latencies.append(now - self.sent)
            if now >= self.until:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _load(port: int, seconds: float, connections: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    started = time.perf_counter()
    until = started + seconds
    protocols = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            functools.partial(_Connection, request, until, latencies, done), "127.0.0.1", port
        )
        protocols.append(done)
    await asyncio.gather(*protocols)
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": elapsed, "latencies": latencies}


def run_load(port: int, seconds: float, connections: int) -> None:
    """Load ``port`` for ``seconds``; print JSON with the count and latency percentiles."""
    result = asyncio.run(_load(port, seconds, connections))
    latencies = sorted(result["latencies"]) or [0.0]
    print(
        json.dumps(
            {
                "req_per_s": result["requests"] / result["seconds"],
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
            }
        )
    )


def load_once(port: int, seconds: float, connections: int) -> dict[str, float]:
    """One round of load from a process of its own (wrk where installed)."""
    wrk = shutil.which("wrk")
    if wrk is not None:
        out = subprocess.run(
            [
                wrk,
                f"-t{min(2, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                f"http://127.0.0.1:{port}{PATH}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return _parse_wrk(out)
    out = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--load",
            str(port),
            "--seconds",
            str(seconds),
            "--connections",
            str(connections),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures: dict[str, float] = json.loads(out)
    return figures


def _parse_wrk(out: str) -> dict[str, float]:
    def ms(text: str) -> float:
        value = float(re.sub(r"[a-z]+$", "", text))
        unit = re.sub(r"^[\d.]+", "", text)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    # Lines of the latency distribution only: a "+/- Stdev" column such as 62.50% also ends in 50%.
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE)
    assert rate and p50 and p99, out
    return {
        "req_per_s": float(rate.group(1)),
        "p50_ms": ms(p50.group(1)),
        "p99_ms": ms(p99.group(1)),
    }


# -- the apps alone, called in this process -------------------------------------------------


async def _direct(kind: str, count: int) -> float:
    app = make_app(kind)
    startup = getattr(app, "startup", None)
    if startup is not None:
        await startup()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: Any) -> None:
        pass

    for _ in range(count // 5):
        await app(dict(scope), receive, send)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            await app(dict(scope), receive, send)
        best = min(best, (time.perf_counter() - started) / count)
    shutdown = getattr(app, "shutdown", None)
    if shutdown is not None:
        await shutdown()
    return best * 1e6


def direct(count: int) -> dict[str, float]:
    """Microseconds per request of each app called directly (no server), and their ratio."""
    times: dict[str, list[float]] = {"plain": [], "embserve": []}
    for _ in range(2):
        for kind in times:
            times[kind].append(asyncio.run(_direct(kind, count)))
    plain, ours = min(times["plain"]), min(times["embserve"])
    return {
        "plain_us": round(plain, 2),
        "embserve_us": round(ours, 2),
        "ratio": round(ours / plain, 3),
    }


# -- the run ----------------------------------------------------------------------------------


def start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    """A server process of ``kind`` and its port."""
    process = subprocess.Popen(
        [sys.executable, str(HERE), "--serve", kind],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return process, port


def main() -> None:
    """Alternate rounds of load on the two servers and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--serve", choices=["plain", "embserve"], help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve)
        return
    if args.load:
        run_load(args.load, args.seconds, args.connections)
        return
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 3.0)

    servers = {kind: start_server(kind) for kind in ("plain", "embserve")}
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in servers}
    try:
        for _, port in servers.values():  # warm up both before any round counts
            load_once(port, 0.5, args.connections)
        for _ in range(rounds):
            for kind, (_, port) in servers.items():
                results[kind].append(load_once(port, seconds, args.connections))
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    app_alone = direct(2000 if args.quick else 20000)

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        return {
            key: round(statistics.median(row[key] for row in rows), 3)
            for key in ("req_per_s", "p50_ms", "p99_ms")
        }

    plain, embserve_ = summary(results["plain"]), summary(results["embserve"])
    write_report(
        json.dumps(
            {
                "benchmark": "http",
                "load_generator": "wrk" if shutil.which("wrk") else "python",
                "connections": args.connections,
                "rounds": rounds,
                "seconds_per_round": seconds,
                "plain_starlette": plain,
                "embserve": embserve_,
                "ratio_req_per_s": round(embserve_["req_per_s"] / plain["req_per_s"], 3),
                "target_ratio": 0.9,
                "app_alone_per_request": app_alone,
                "rounds_req_per_s": {
                    kind: [round(row["req_per_s"]) for row in rows]
                    for kind, rows in results.items()
                },
            },
            indent=2,
        ),
        args.out,
    )


def write_report(text: str, out: str | None) -> None:
    """Print the JSON ``text``; with ``out``, write it there too, with the machine it ran on."""
    print(text)
    if out:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        report = {**json.loads(text), "machine": machine}
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

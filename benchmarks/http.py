"""HTTP overhead: ``embserve run`` against uvicorn + Starlette and hypercorn + Starlette.

    python benchmarks/http.py [--quick] [--connections 32] [--rounds 5] [--seconds 3]

Six servers, each a process of its own, serve the same no-op handler (``{"ok": true}``, see
``benchmarks/noop_service.py``): ``embserve run`` with ``--server granian`` (its default where
granian is installed), ``--server uvicorn`` and ``--server hypercorn``, and the plain Starlette
app under uvicorn (its defaults: httptools and uvloop where installed; access log off), under
hypercorn (its defaults) and under granian (in process on uvloop, as ``embserve run`` serves
it, through ``embserve_asgi.server.serve``). The load comes from
another process: ``wrk`` where installed, otherwise the Python load generator below (N
keep-alive connections, one request in flight on each, raw HTTP/1.1 on asyncio protocols, on
uvloop where installed). Rounds take the servers in turn, each round in a new order, so that
all see the same machine; the figures are the medians over rounds. The floors are the plain
Starlette apps, measured in the same run; ``ratio`` is embserve's req/s over the floor's.
``embserve run``'s default server is held to uvicorn + Starlette, the fastest common Python
stack; beside that, ``anchors`` compares it with plain Starlette on the same server (no
target).

Beside req/s, each server's CPU time per request (from ``/proc``, on Linux) and its ratio: the
floor's CPU per request over embserve's, so that higher is better, as for req/s. On a shared
machine, where a server does not always have a core, it is the steadier of the two figures.

``app_alone`` adds the microseconds each app takes per request when called directly in this
process, without server or network (medians of interleaved rounds): embserve's App end to end,
the runtime's share of it (the same handle call without HTTP), and plain Starlette.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PATH = "/noop"
# Run as a script, this file's folder heads sys.path and its name hides the standard library's
# `http` package from Starlette: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]

# name -> the floor it is compared with (None: a floor)
SERVERS = {
    "embserve_granian": "uvicorn_starlette",
    "embserve_uvicorn": "uvicorn_starlette",
    "embserve_hypercorn": "hypercorn_starlette",
    "uvicorn_starlette": None,
    "hypercorn_starlette": None,
    "granian_starlette": None,
}
# Compared too, with no target: the same server serving plain Starlette.
ANCHORS = {"embserve_granian": "granian_starlette"}
TARGET_RATIO = 1.0


# -- the servers ------------------------------------------------------------------------------


def _service() -> Any:
    # Imported from its file: the benchmarks folder on sys.path would hide the `http` package.
    import importlib.util

    if "noop_service" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "noop_service", HERE.parent / "noop_service.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["noop_service"] = module
        spec.loader.exec_module(module)
    return sys.modules["noop_service"]


def run_plain(server: str) -> None:
    """Serve plain Starlette with ``server`` on a free port of 127.0.0.1; print the port."""
    import socket

    starlette_app = _service().starlette_app
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(starlette_app, access_log=False, log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
        return
    if server == "granian":
        from embserve_asgi import server as embserve_server

        serving = embserve_server.serve(starlette_app, sock, server="granian")
        embserve_server.run_on(embserve_server.loop_factory("granian"), serving)
        return
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    hypercorn_config = Config()
    hypercorn_config.bind = [f"fd://{sock.detach()}"]
    hypercorn_config.accesslog = None
    hypercorn_config.graceful_timeout = 1.0
    asyncio.run(serve(starlette_app, hypercorn_config))


def start_server(name: str) -> subprocess.Popen[str]:
    """A server process for ``name`` (see SERVERS); :func:`port_of` waits for its port."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if name.startswith("embserve_"):
        embserve = Path(sys.executable).with_name("embserve")
        target = f"{HERE.parent / 'noop_service.py'}:app"
        command = [str(embserve), "run", target, "--port", "0"]
        command += ["--server", name.removeprefix("embserve_"), "--graceful-timeout", "1"]
    else:
        command = [sys.executable, str(HERE), "--serve", name.removesuffix("_starlette")]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


def port_of(name: str, process: subprocess.Popen[str]) -> int:
    """The port ``process`` serves on, read from what it prints once it accepts."""
    assert process.stdout is not None
    for line in process.stdout:  # ends with the process: no hang if it fails
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
        if line.strip().isdigit():  # the plain servers print their port alone
            return int(line)
    raise RuntimeError(f"{name} did not start (exit status {process.wait()})")


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
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
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
            self.done.set_result(self.errors)


async def _load(port: int, seconds: float, connections: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    started = time.perf_counter()
    until = started + seconds
    finished = []
    for _ in range(connections):
        done: asyncio.Future[int] = loop.create_future()
        await loop.create_connection(
            functools.partial(_Connection, request, until, latencies, done), "127.0.0.1", port
        )
        finished.append(done)
    # Bounded: a server that stops answering ends the round with what it answered.
    done_in_time, late = await asyncio.wait(finished, timeout=seconds + 10)
    errors = sum(f.result() for f in done_in_time) + len(late)
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "latencies": latencies,
        "errors": errors,
    }


def run_load(port: int, seconds: float, connections: int) -> None:
    """Load ``port`` for ``seconds``; print JSON with the rate and latency percentiles."""
    try:
        import uvloop

        result = uvloop.run(_load(port, seconds, connections))
    except ImportError:
        result = asyncio.run(_load(port, seconds, connections))
    latencies = sorted(result["latencies"]) or [0.0]
    print(
        json.dumps(
            {
                "req_per_s": result["requests"] / result["seconds"],
                "requests": result["requests"],
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
                "errors": result["errors"],
            }
        )
    )


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user and system) that process ``pid`` used so far; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_once(port: int, seconds: float, connections: int) -> dict[str, float]:
    """One round of load from a process of its own (wrk where installed)."""
    wrk = shutil.which("wrk")
    url = f"http://127.0.0.1:{port}{PATH}"
    if wrk is not None:
        out = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
        return _parse_wrk(out)
    command = [sys.executable, str(HERE), "--load", str(port), "--seconds", str(seconds)]
    out = subprocess.run(
        [*command, "--connections", str(connections)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    figures: dict[str, float] = json.loads(out)
    return figures


def _parse_wrk(out: str) -> dict[str, float]:
    def ms(text: str) -> float:
        value = float(re.sub(r"[a-z]+$", "", text))
        unit = re.sub(r"^[\d.]+", "", text)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    # Lines of the latency distribution only: a "+/- Stdev" column such as 62.50% also ends in 50%.
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE)
    assert rate and p50 and p99, out
    return {
        "req_per_s": float(rate.group(1)),
        "requests": float(count.group(1)) if count else 0.0,
        "p50_ms": ms(p50.group(1)),
        "p99_ms": ms(p99.group(1)),
        "errors": 0.0,
    }


# -- the apps alone, called in this process -------------------------------------------------

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": PATH,
    "raw_path": PATH.encode(),
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def _direct(count: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per request of plain Starlette, embserve's App and the runtime's share of
    the App (the same handle call with the request the App builds, without HTTP), one figure
    per round, the three taking turns within each round on one event loop."""
    import embserve
    from embserve.request import Request
    from embserve_asgi.requests import RequestSnapshot

    service = _service()
    plain = service.starlette_app
    ours = embserve.App({PATH: service.Noop.bind()})
    await ours.startup()
    runtime = ours.runtime
    message = {"type": "http.request", "body": b"", "more_body": False}
    sent = {"plain": 0, "embserve": 0}

    async def receive() -> dict[str, Any]:
        return message

    def sender(kind: str) -> Any:
        async def send(message: Any) -> None:
            sent[kind] += 1

        return send

    send_plain, send_ours = sender("plain"), sender("embserve")

    async def call_plain() -> None:
        await plain(dict(SCOPE), receive, send_plain)

    async def call_ours() -> None:
        await ours(dict(SCOPE), receive, send_ours)

    async def call_runtime() -> None:
        snapshot = RequestSnapshot.from_scope(SCOPE, b"", "id", PATH)
        request = Request("Noop", args=(snapshot,), request_id="id", http_method="GET")
        await runtime.call_async(request)

    calls = {"plain": call_plain, "embserve": call_ours, "runtime": call_runtime}
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    try:
        for call in calls.values():
            for _ in range(count // 5):
                await call()
        for _ in range(rounds):
            for kind, call in calls.items():
                started = time.perf_counter()
                for _ in range(count):
                    await call()
                times[kind].append((time.perf_counter() - started) / count * 1e6)
    finally:
        await ours.shutdown()
    assert min(sent.values()) >= 2 * count * rounds  # every call answered, start and body
    return times


def direct(count: int, rounds: int) -> dict[str, float]:
    """Microseconds per request of each app called directly (no server): medians of
    interleaved rounds, and embserve's ratios to plain Starlette."""
    times = asyncio.run(_direct(count, rounds))
    plain, ours, runtime = (statistics.median(times[k]) for k in ("plain", "embserve", "runtime"))
    return {
        "plain_starlette_us": round(plain, 2),
        "embserve_app_us": round(ours, 2),
        "of_which_runtime_us": round(runtime, 2),
        "app_own_us": round(ours - runtime, 2),
        "ratio_app_to_plain": round(ours / plain, 3),
        "ratio_app_own_to_plain": round((ours - runtime) / plain, 3),
        "rounds": rounds,
        "calls_per_round": count,
    }


# -- the run ----------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("granian", "uvicorn", "httptools", "uvloop", "hypercorn", "starlette"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    """Take the servers in turn, round after round, and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--serve", choices=["uvicorn", "hypercorn", "granian"], help=argparse.SUPPRESS
    )
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_plain(args.serve)
        return
    if args.load:
        run_load(args.load, args.seconds, args.connections)
        return
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (0.4 if args.quick else 3.0)
    connections = 8 if args.quick and args.connections == 32 else args.connections

    servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
    started: dict[str, subprocess.Popen[str]] = {}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SERVERS}
    order = list(SERVERS)
    shuffle = random.Random(0)
    try:
        for name in SERVERS:  # all start at once
            started[name] = start_server(name)
        for name, process in started.items():
            servers[name] = (process, port_of(name, process))
        if not args.quick:  # warm up every server before any round counts
            for _, port in servers.values():
                load_once(port, 0.5, connections)
        for _ in range(rounds):
            shuffle.shuffle(order)
            for name in order:
                process, port = servers[name]
                before = cpu_seconds(process.pid)
                row = load_once(port, seconds, connections)
                after = cpu_seconds(process.pid)
                if before is not None and after is not None and row["requests"]:
                    row["cpu_us_per_request"] = (after - before) / row["requests"] * 1e6
                results[name].append(row)
    finally:
        for process in started.values():
            process.send_signal(signal.SIGTERM)
        for process in started.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        figures = {
            key: round(statistics.median(row[key] for row in rows), 3)
            for key in ("req_per_s", "p50_ms", "p99_ms")
        }
        figures["errors"] = sum(row.get("errors", 0) for row in rows)
        cpu = [row["cpu_us_per_request"] for row in rows if "cpu_us_per_request" in row]
        if cpu:
            figures["cpu_us_per_request"] = round(statistics.median(cpu), 1)
        return figures

    served = {name: summary(rows) for name, rows in results.items()}
    pairs = [(name, floor) for name, floor in SERVERS.items() if floor is not None]
    pairs += ANCHORS.items()
    ratios = {
        f"{name}_to_{floor}": round(served[name]["req_per_s"] / served[floor]["req_per_s"], 3)
        for name, floor in pairs
    }
    # The server's own CPU per request, floor over embserve (higher is better, as req/s):
    # steadier than req/s on a shared machine, where a server is not always on a core.
    cpu_ratios = {
        f"{name}_to_{floor}": round(
            served[floor]["cpu_us_per_request"] / served[name]["cpu_us_per_request"], 3
        )
        for name, floor in pairs
        if "cpu_us_per_request" in served[name] and "cpu_us_per_request" in served[floor]
    }
    from embserve_asgi.server import choose_server

    write_report(
        json.dumps(
            {
                "benchmark": "http",
                "load_generator": "wrk" if shutil.which("wrk") else "python (asyncio protocols)",
                "connections": connections,
                "rounds": rounds,
                "seconds_per_round": seconds,
                "cpus": os.cpu_count(),
                "versions": _versions(),
                "embserve_run_default_server": choose_server("auto"),
                "servers": served,
                "floors": {name: floor for name, floor in SERVERS.items() if floor},
                "anchors": ANCHORS,
                "ratios_req_per_s": ratios,
                "ratios_cpu_per_request": cpu_ratios,
                "target_ratio": TARGET_RATIO,
                "app_alone_per_request": direct(*((500, 3) if args.quick else (4000, 15))),
                "rounds_req_per_s": {
                    name: [round(row["req_per_s"]) for row in rows]
                    for name, rows in results.items()
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

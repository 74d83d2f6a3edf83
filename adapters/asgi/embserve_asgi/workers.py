"""``embserve run --workers N``: N server processes accepting on one listening socket.

Each worker imports the target and runs its own App and runtime, so N workers are one service
only when their runtimes share one set of replicas: a backend says so with a true
``shares_replicas`` attribute (the Dask backend with a namespace). With any other backend each
worker would start replicas of its own (N times the memory and GPUs, N autoscalers), so the
command refuses before it starts anything. The parent binds the socket (a busy port is the
usual one line), starts the workers with the socket inherited, prints the banner once every
worker serves, and on Ctrl-C or SIGTERM stops them all gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from embserve.backends import Backend, resolve_backend
from embserve.errors import EmbserveError
from embserve.runtime import Runtime
from embserve_asgi._target import CommandError
from embserve_asgi.admin import ADMIN_TOKEN_ENV
from embserve_asgi.app import App

__all__ = ["refuse_unshared", "supervise", "worker_command"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long stopped workers get to drain, past their graceful timeout, before they are killed.
_STOP_GRACE_S = 30.0


def refuse_unshared(app: App, workers: int) -> None:
    """Raise :class:`CommandError` unless ``app``'s runtimes in ``workers`` processes would
    share their replicas. Starts nothing: the backend is built, not started."""
    backend = _backend_of(app.runtime)
    if getattr(backend, "shares_replicas", False):
        return
    name = backend.name or type(backend).__name__
    raise CommandError(
        f"--workers {workers} needs replicas shared between processes; the {name} backend "
        "starts its own replicas in each process. Use a Dask backend with a namespace "
        "(docs/scaling.md), or one worker with more replicas (num_replicas=...)"
    )


def _backend_of(runtime: Runtime) -> Backend:
    if runtime.loop is not None:  # started already (by the module that made it)
        return runtime.backend
    try:
        backend = resolve_backend(runtime.backend_spec)
        if runtime.namespace is not None:  # what the runtime does as it starts
            backend.use_namespace(runtime.namespace)
    except (EmbserveError, ValueError, TypeError) as exc:
        raise CommandError((str(exc).splitlines() or [type(exc).__name__])[0]) from None
    return backend


def worker_command(args: argparse.Namespace, server: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the processes ``--workers N`` starts (without
    their descriptors); the admin token goes in the environment, which ps does not show."""
    env = dict(os.environ)
    if args.admin_token is not None:
        env[ADMIN_TOKEN_ENV] = args.admin_token
    command = [sys.executable, "-m", "embserve_asgi.cli", "run", args.target]
    command += ["--server", server, "--workers", str(args.workers)]
    command += ["--graceful-timeout", repr(args.graceful_timeout)]
    command += ["--keep-alive-timeout", repr(args.keep_alive_timeout)]
    for option, value in (
        ("--backend", args.backend),
        ("--namespace", args.namespace),
        ("--body-timeout", args.body_timeout),
        ("--read-timeout", args.read_timeout),
    ):
        if value is not None:
            command += [option, str(value)]
    if args.no_admin:
        command.append("--no-admin")
    if args.access_log:
        command.append("--access-log")
    return command, env


def supervise(
    sock: socket.socket,
    workers: int,
    command: list[str],
    env: dict[str, str],
    graceful_timeout_s: float = 30.0,
) -> int:
    """Run ``workers`` copies of ``command`` serving on ``sock``; the command's exit status.

    Each is given ``--worker-fd`` (the socket) and ``--ready-fd`` (where it writes its banner
    once it serves). 1 when a worker fails to start (it said why) or ends by itself.
    """
    return asyncio.run(_supervise(sock, workers, command, env, graceful_timeout_s))


async def _supervise(
    sock: socket.socket,
    workers: int,
    command: list[str],
    env: dict[str, str],
    graceful_timeout_s: float,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    children: list[subprocess.Popen[bytes]] = []
    try:
        banners: list[asyncio.Future[str]] = []
        for _ in range(workers):
            child, fd = _start_worker(sock, command, env)
            children.append(child)
            banners.append(asyncio.ensure_future(asyncio.to_thread(_read_all, fd)))
        sock.close()  # the workers hold it now; the port is free again once they exit
        exits: list[asyncio.Future[int]] = [
            asyncio.ensure_future(asyncio.to_thread(child.wait)) for child in children
        ]
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())

        # Serving once every worker said so. A worker that ends without saying so failed to
        # start, and has printed why.
        waiting: set[asyncio.Future[Any]] = set(banners)
        while waiting and not stop.is_set():
            done, _ = await asyncio.wait({*waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for banner in done & waiting:
                waiting.discard(banner)
                if not banner.result():
                    child = children[banners.index(banner)]
                    await _stop(children, exits, graceful_timeout_s)
                    if child.returncode != 1:  # 1: the worker printed its one line
                        print(
                            f"embserve run: worker {child.pid} exited with status "
                            f"{child.returncode} before it served",
                            file=sys.stderr,
                            flush=True,
                        )
                    return 1
        if stop.is_set():
            await _stop(children, exits, graceful_timeout_s)
            print("embserve: stopped", flush=True)
            return 0
        print(banners[0].result(), end="", flush=True)

        watched: set[asyncio.Future[Any]] = {stopping, *exits}
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if not stop.is_set():
            ended = next(child for child, done in zip(children, exits, strict=True) if done.done())
            print(
                f"embserve: warning: worker {ended.pid} exited with status {ended.returncode}; "
                "stopping the others",
                file=sys.stderr,
                flush=True,
            )
            status = 1
        await _stop(children, exits, graceful_timeout_s)
        print("embserve: stopped", flush=True)
        return status
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        if sock.fileno() != -1:
            sock.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _start_worker(
    sock: socket.socket, command: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    """One worker, and the descriptor its banner arrives on."""
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [*command, "--worker-fd", str(sock.fileno()), "--ready-fd", str(write_end)],
            pass_fds=(sock.fileno(), write_end),
            env=env,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the worker's copy is the one left: its exit ends the read
    return child, read_end


def _read_all(fd: int) -> str:
    with open(fd, encoding="utf-8") as pipe:
        return pipe.read()


async def _stop(
    children: list[subprocess.Popen[bytes]],
    exits: Sequence[asyncio.Future[int]],
    graceful_timeout_s: float,
) -> None:
    """SIGTERM every worker (each drains as ``embserve run`` does); kill what is left later."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    _, running = await asyncio.wait(exits, timeout=graceful_timeout_s + _STOP_GRACE_S)
    if running:
        for child in children:
            if child.poll() is None:
                print(f"embserve: warning: killing worker {child.pid}", file=sys.stderr)
                child.kill()
        await asyncio.wait(running)

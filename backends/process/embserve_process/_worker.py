"""The main of a replica's worker process: one event loop serving one replica over one socket.

What the worker says and hears is the core's remote-replica protocol
(:class:`~embserve._remote.ReplicaServer` over a :class:`~embserve._remote.SocketTransport`);
what is the process backend's own is here: the environment set before any user module loads,
the loop (polling for work a moment before each sleep, see :class:`_PollingSelector`), and
exiting when the parent is gone. The worker exits when told to stop, when its connection closes
(the parent died), or when its parent process is no longer its parent.

It is started as ``python -c "from embserve_process._worker import main; main()" FD PID POLL``
(see :mod:`embserve_process._replica`): its socket is descriptor ``FD``, and its environment
holds ``CUDA_VISIBLE_DEVICES`` and the parent's ``sys.path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import socket
import sys
import time

from embserve.spi import ReplicaServer, SocketTransport, run_replica_process

__all__ = ["main", "run_worker"]

# How often the worker checks that its parent is alive, besides noticing its connection close.
_PARENT_CHECK_S = 1.0


class _PollingSelector(selectors.DefaultSelector):
    # Polls for up to `poll_s` before each sleep. Waking a sleeping process costs about as much
    # as a whole call does, and the next request of a busy caller mostly comes within that time.
    # An idle worker sleeps as before, after one such poll.

    def __init__(self, poll_s: float) -> None:
        super().__init__()
        self._poll_s = poll_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        clock = time.monotonic
        start = clock()
        deadline = start + (self._poll_s if timeout is None else min(self._poll_s, timeout))
        while True:
            ready = super().select(0)
            if ready:
                return ready
            now = clock()
            if now >= deadline:
                break
        if timeout is not None:
            timeout = max(0.0, timeout - (now - start))
        return super().select(timeout)


async def _serve(sock: socket.socket, parent_pid: int) -> None:
    pid = os.getpid()
    server = ReplicaServer(SocketTransport(sock), worker=str(pid), info={"pid": pid})
    loop = asyncio.get_running_loop()
    check: asyncio.TimerHandle | None = None

    def check_parent() -> None:
        nonlocal check
        if os.getppid() != parent_pid:
            server.stop()
        else:
            check = loop.call_later(_PARENT_CHECK_S, check_parent)

    check = loop.call_later(_PARENT_CHECK_S, check_parent)
    try:
        await server.serve()
    finally:
        if check is not None:
            check.cancel()


def main() -> None:
    """The worker process's entry point: ``argv`` holds the socket's file descriptor, the parent's
    pid and ``poll_s``."""
    # First: Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, parent_pid, poll_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # The parent's path (its script's directory, its current directory, what it added), so that
    # user modules import here as there; removed, so user code's own subprocesses do not see it.
    path = os.environ.pop("EMBSERVE_WORKER_SYS_PATH", None)
    if path is not None:
        sys.path[:] = json.loads(path)
    run_worker(socket.socket(fileno=fd), parent_pid, poll_s)


def run_worker(sock: socket.socket, parent_pid: int, poll_s: float = 0.0) -> None:
    """Serve one replica over ``sock`` until told to stop, then exit the process.

    ``poll_s``: how long the worker's loop polls for work before each sleep (0: it never polls).
    """
    if poll_s > 0:
        loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(_PollingSelector(poll_s))
    else:
        loop = asyncio.new_event_loop()
    run_replica_process(lambda: loop.run_until_complete(_serve(sock, parent_pid)))

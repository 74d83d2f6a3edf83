"""The main of a replica's worker process: one event loop serving one replica over one socket.

What the worker says and hears is the core's remote-replica protocol
(:class:`~embserve._remote.ReplicaServer` over a :class:`~embserve._remote.SocketTransport`);
what is the process backend's own is here: the environment set before any user module loads,
the loop (polling for work a moment before each sleep, see :func:`~embserve.spi.new_loop`), and
exiting when the parent is gone. The worker exits when told to stop, when its connection closes
(the parent died), or when its parent process is no longer its parent.

It is started as ``python -c "from embserve_process._worker import main; main()" FD LINE PID
POLL`` (see :mod:`embserve_process._replica`): its socket is descriptor ``FD``, its direct line
(plain threads' calls, see :meth:`~embserve.spi.ReplicaServer.add_line`) descriptor ``LINE``,
and its environment holds ``CUDA_VISIBLE_DEVICES`` and the parent's ``sys.path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys

from embserve.spi import ReplicaServer, SocketTransport, new_loop, run_replica_process

__all__ = ["main", "run_worker"]

# How often the worker checks that its parent is alive, besides noticing its connection close.
_PARENT_CHECK_S = 1.0


async def _serve(sock: socket.socket, line: socket.socket | None, parent_pid: int) -> None:
    pid = os.getpid()
    server = ReplicaServer(SocketTransport(sock), worker=str(pid), info={"pid": pid})
    if line is not None:
        server.add_line(SocketTransport(line))
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
    """The worker process's entry point: ``argv`` holds the file descriptors of the socket and
    of the direct line, the parent's pid and ``poll_s``."""
    # First: Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, line_fd, parent_pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    poll_s = float(sys.argv[4])
    # The parent's path (its script's directory, its current directory, what it added), so that
    # user modules import here as there; removed, so user code's own subprocesses do not see it.
    path = os.environ.pop("EMBSERVE_WORKER_SYS_PATH", None)
    if path is not None:
        sys.path[:] = json.loads(path)
    run_worker(socket.socket(fileno=fd), parent_pid, poll_s, socket.socket(fileno=line_fd))


def run_worker(
    sock: socket.socket, parent_pid: int, poll_s: float = 0.0, line: socket.socket | None = None
) -> None:
    """Serve one replica over ``sock`` (and plain threads' calls on ``line``, when given) until
    told to stop, then exit the process.

    ``poll_s``: how long the worker's loop polls for work before each sleep (0: it never polls).
    """
    loop = new_loop(poll_s)
    run_replica_process(lambda: loop.run_until_complete(_serve(sock, line, parent_pid)))

"""The runtime's side of one replica in a worker process: starting it, its death, stopping it.

Everything said over the connection is the core's remote-replica protocol
(:class:`~embserve._remote.RemoteReplica` over a :class:`~embserve._remote.SocketTransport`);
what is the process backend's own is here. A worker is an interpreter of its own,
``python -c "...main()"`` started with :class:`subprocess.Popen` (not a ``multiprocessing``
child: those cannot be started from daemonic processes such as a web server's workers, and
re-import the parent's ``__main__``), given one end of a socket pair by descriptor
(``pass_fds``) and the parent's ``sys.path`` in its environment. A worker that dies is noticed
when its connection closes or when its process exits, both watched by the runtime's event loop
(a pidfd where the system has them, else one waiting thread per worker), so nothing polls on
the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from embserve.context import ReplicaContext
from embserve.replica import ReplicaSpec, ReplicaState
from embserve.resources import Allocation
from embserve.spi import RemoteReplica, SocketTransport, encode_start

if TYPE_CHECKING:
    from embserve_process._backend import ProcessBackend

__all__ = ["ProcessReplica"]

logger = logging.getLogger("embserve.process")

# How long a stopping worker may take to exit before it is killed.
_STOP_TIMEOUT_S = 5.0
# After the connection closes, how long to wait for the process to exit (for its exit code in
# the reason) before it is declared dead anyway and killed.
_EXIT_GRACE_S = 0.25

# The worker's main. Not ``-m embserve_process._worker``: that would import the module twice
# (as __main__, and by name from the package).
_BOOT = "from embserve_process._worker import main; main()"

#: The environment variable that gives a worker its parent's ``sys.path`` (JSON), so that it
#: imports the deployments of importable modules as the parent does. The worker removes it.
PATH_VARIABLE = "EMBSERVE_WORKER_SYS_PATH"

# -X and -W options of this interpreter, given to the workers as multiprocessing would.
_interpreter_flags: Any = getattr(subprocess, "_args_from_interpreter_flags", list)


def worker_command(fd: int, line_fd: int, parent_pid: int, poll_s: float) -> list[str]:
    """The command line of a worker serving on descriptor ``fd``, and plain threads' calls on
    descriptor ``line_fd`` (its direct line)."""
    return [
        sys.executable,
        *_interpreter_flags(),
        "-c",
        _BOOT,
        str(fd),
        str(line_fd),
        str(parent_pid),
        repr(poll_s),
    ]


def _exit_reason(pid: int, code: int | None) -> str:
    if code is None:
        return f"its worker process (pid {pid}) closed its connection"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its worker process (pid {pid}) was killed by {name}"
    return f"its worker process (pid {pid}) exited with code {code}"


class ProcessReplica(RemoteReplica):
    """The runtime's view of a replica in a worker process."""

    def __init__(
        self,
        spec: ReplicaSpec,
        backend: ProcessBackend,
        allocation: Allocation | None,
    ) -> None:
        super().__init__(spec)
        self._backend = backend
        self._allocation = allocation
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._grace: asyncio.TimerHandle | None = None
        self.pid = 0

    @property
    def gpu_ids(self) -> tuple[str, ...]:
        """The GPUs this replica holds."""
        return self._allocation.gpu_ids if self._allocation else ()

    @property
    def info(self) -> Mapping[str, Any]:
        info: dict[str, Any] = {"worker": f"pid {self.pid}", "pid": self.pid}
        if self._allocation is not None:
            info["resources"] = dict(self._allocation.demand)
            info["gpu_ids"] = list(self._allocation.gpu_ids)
        return info

    # -- starting -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the worker, send it the spec, and wait until the user object is built."""
        loop = self._loop
        replica_context = ReplicaContext(
            self.deployment,
            self.replica_id,
            gpu_ids=self.gpu_ids,
            extra={"resources": dict(self.spec.config.resources)},
        )
        # Pickled before anything starts: a deployment that cannot be sent fails here, whole.
        start_frames = encode_start(self.spec, replica_context)
        env = dict(os.environ)
        if self._backend.pool is not None and self._backend.pool.gpu_ids:
            # In its environment from the start, so before any user module could read it. A
            # replica that holds no GPU sees none, so it cannot take memory on one by accident.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_ids)
        env[PATH_VARIABLE] = json.dumps(sys.path)
        # One connection for the runtime's loop, one for plain threads' calls (a direct line).
        parent_sock, child_sock = socket.socketpair()
        parent_line, child_line = socket.socketpair()
        fds = (child_sock.fileno(), child_line.fileno())
        start: functools.partial[subprocess.Popen[bytes]] = functools.partial(
            subprocess.Popen,
            worker_command(*fds, os.getpid(), self._backend.busy_poll_s),
            pass_fds=fds,  # only these ends: a worker holds no other worker's socket open
            env=env,
            stdin=subprocess.DEVNULL,  # the terminal's input is the parent's
        )
        try:
            # Forking and exec'ing a large process takes a moment: off the loop. It starts in
            # the parent's current directory, as the parent's relative sys.path entries expect.
            process = await loop.run_in_executor(None, start)
        except BaseException:
            parent_sock.close()
            parent_line.close()
            raise
        finally:
            child_sock.close()
            child_line.close()
        self._process = process
        self.pid = process.pid
        self._watch_exit(process)
        self.connect(SocketTransport(parent_sock, loop), poll_s=self._backend.busy_poll_s)
        self.connect_line(parent_line)
        try:
            await self.begin(start_frames)
        except BaseException:  # the constructor failed, the worker died, or we were cancelled
            await self.stop()
            raise

    def _watch_exit(self, process: subprocess.Popen[bytes]) -> None:
        # A pidfd becomes readable when the process exits, so the loop wakes for it like for
        # a socket. Without one (not Linux >= 5.3), a thread per worker waits for its exit.
        try:
            self._pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            thread = threading.Thread(
                target=self._wait_in_thread,
                args=(process,),
                name=f"embserve-wait-{self.replica_id}",
                daemon=True,
            )
            thread.start()
        else:
            self._loop.add_reader(self._pidfd, self._on_exit)

    def _wait_in_thread(self, process: subprocess.Popen[bytes]) -> None:
        process.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._on_exit)

    # -- death and stopping ---------------------------------------------------------------

    def connection_lost(self, reason: str) -> None:
        # The exit code makes a better reason; it is normally there within microseconds.
        code = None if self._process is None else self._process.poll()
        if code is None:
            self._grace = self._loop.call_later(_EXIT_GRACE_S, self._lost, None)
        else:
            self._lost(code)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        process = self._process
        assert process is not None, "watched only once started"
        # A readable pidfd means the process has exited: this reaps it without waiting.
        code = process.poll()
        if code is None:  # not expected; never leave the worker unreaped
            code = process.wait()
        self._lost(code)
        self._backend.replica_exited(self)
        if not self._exited.done():
            self._exited.set_result(None)

    def _lost(self, code: int | None) -> None:
        if self.dead_reason is not None:
            return
        if self._grace is not None:
            self._grace.cancel()
        process = self._process
        if process is not None and code is None and process.poll() is None:
            process.kill()  # the connection is gone: the worker is of no use any more
        self.lose(_exit_reason(self.pid, code))

    def died(self, reason: str) -> None:
        logger.warning("replica %s died: %s", self.replica_id, reason)
        self._backend.on_replica_died(self, reason)

    async def stop(self) -> None:
        self.state = ReplicaState.STOPPED
        self.stopping = True
        process = self._process
        if process is None:
            self._backend.replica_exited(self)
            return
        self.send_stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), _STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("worker of replica %s did not stop; killing it", self.replica_id)
            process.kill()
            await asyncio.shield(self._exited)

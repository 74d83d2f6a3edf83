"""The replica's Dask task: holds its resources and supervises the replica's own process.

The task holds the resources it asked for (``{"GPU": 0.5}``) for as long as it runs, which is the
replica's whole life: Dask's own resource accounting then keeps other tasks off what this one
holds. It secedes from the worker's thread pool and starts the replica in a child process
(:mod:`embserve_dask._child`) with its own ``CUDA_VISIBLE_DEVICES`` and its own GIL, so user
code neither sees the worker's other GPUs nor stalls the worker's event loop and heartbeats. The
child listens on the worker's host with the worker's security and sends its address back over a
pipe; the task tells the runtime where through a Dask event. Requests then go straight from the
runtime to the child; neither the scheduler nor the worker process sees them.

The task ends when its child exits. It stops the child (and kills it after a grace period) when
the task is cancelled or its worker closes, and relays a closing worker's drain notice to it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import distributed
from distributed.comm.addressing import get_address_host, parse_address, unparse_host_port
from distributed.diagnostics.plugin import WorkerPlugin

from embserve.resources import detect_gpus

__all__ = ["DrainPlugin", "serve_replica"]

#: How long a child told to stop may take to exit before it is killed.
STOP_GRACE_S = 5.0

# How often the task looks whether it was cancelled or its worker closed; neither sends it
# anything it could wait on.
_CHECK_S = 0.5

_BOOT = "from embserve_dask._child import main; main()"

# distributed's functions are untyped; they are used through these names.
secede: Any = distributed.secede
thread_state: Any = importlib.import_module("distributed.worker").thread_state

_lock = threading.Lock()
_supervisors: dict[str, set[_Supervisor]] = {}  # worker address -> replicas running there


def serve_replica(
    replica_id: str,
    topic: str,
    devices: Sequence[str],
    token_sha256: str,
    shared: bool = False,
    busy_poll_s: float | None = None,
) -> str:
    """The Dask task of one replica: runs until the replica's process exits.

    The replica's spec does not pass through the task (nor the scheduler): the runtime sends it
    straight to the replica's process once connected, which unpickles it there.

    Args:
        replica_id: the replica's id.
        topic: the Dask event topic the runtime listens on for the replica's address.
        devices: the positions, among this worker's GPUs, of the GPUs the replica holds.
        token_sha256: the SHA-256 digest (hex) of the token the runtime presents to the
            replica's process; only the digest passes through the scheduler.
        shared: the replica serves every runtime of a namespace that presents the token, and
            outlives the connection of the runtime that started it (see
            :mod:`embserve_dask._child`).
        busy_poll_s: how long the replica's process polls for the next request before it
            sleeps (None: 100 µs where that process may use two CPUs or more, else 0).
    """
    worker = distributed.get_worker()
    # Only this worker's own teardown can keep it alive while its replicas drain.
    worker.plugins.setdefault(DrainPlugin.name, DrainPlugin())
    key = thread_state.key
    secede()
    supervisor = _Supervisor(worker, key, replica_id, topic, token_sha256)
    supervisor.shared = shared
    supervisor.busy_poll_s = busy_poll_s
    with _lock:
        _supervisors.setdefault(worker.address, set()).add(supervisor)
    try:
        supervisor.run(devices)
    finally:
        with _lock:
            _supervisors.get(worker.address, set()).discard(supervisor)
        supervisor.finished.set_result(None)
    return replica_id


def worker_gpu_ids(count: int) -> tuple[str, ...]:
    """The ids of a worker's ``count`` GPUs, as :class:`~embserve.resources.ResourcePool` names
    them: the worker's own ``CUDA_VISIBLE_DEVICES`` when it lists enough, else 0..count-1."""
    visible = detect_gpus() if "CUDA_VISIBLE_DEVICES" in os.environ else ()
    if len(visible) < count:
        visible = tuple(str(i) for i in range(count))
    return visible[:count]


class DrainPlugin(WorkerPlugin):
    """Keeps a closing worker alive until the runtime has drained the replicas it holds.

    A worker closes when it is retired (``client.retire_workers``, adaptive scaling), stopped by
    its nanny or told to by the scheduler. Each replica on it tells its runtime, which stops
    routing to it, starts a replacement elsewhere and stops it once its requests finished.
    Replicas still running after ``timeout_s`` are stopped.
    """

    name = "embserve-drain"

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    async def teardown(self, worker: Any) -> None:
        """Ask every replica on ``worker`` to drain, wait for them to end, stop the rest."""
        import asyncio

        with _lock:
            supervisors = list(_supervisors.get(worker.address, ()))
        if not supervisors:
            return
        lost = _lost_scheduler(worker)
        for supervisor in supervisors:
            supervisor.drain(scheduler_lost=lost)
        waits = [asyncio.wrap_future(s.finished) for s in supervisors]
        await asyncio.wait(waits, timeout=self.timeout_s)
        for supervisor in supervisors:
            supervisor.stop()
        await asyncio.wait(waits, timeout=STOP_GRACE_S + 1)


def _lost_scheduler(worker: Any) -> bool:
    # A worker closes itself when its scheduler connection breaks; its replicas then keep
    # serving (no drain) for as long as this teardown keeps the worker alive.
    stream = getattr(worker, "batched_stream", None)
    comm = getattr(stream, "comm", None)
    return comm is None or bool(comm.closed())


class _Supervisor:
    """One replica's process, seen from the Dask task that started it."""

    def __init__(
        self, worker: Any, key: Any, replica_id: str, topic: str, token_sha256: str
    ) -> None:
        self.worker = worker
        self.token_sha256 = token_sha256
        self.key = key
        self.replica_id = replica_id
        self.topic = topic
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._pipe: Connection | None = None
        self._send_lock = threading.Lock()
        self._kill_at: float | None = None
        self._pending: list[tuple[Any, ...]] = []  # notices sent before the child started
        self._announced = False
        self.shared = False
        self.busy_poll_s: float | None = None

    def run(self, devices: Sequence[str]) -> None:
        """Start the child, announce its address, and wait for it to exit (this thread)."""
        worker = self.worker
        total = {k: float(v) for k, v in worker.state.total_resources.items()}
        env = dict(os.environ)
        gpu_ids: tuple[str, ...] = ()
        count = int(total.get("GPU", 0))
        if count:
            ids = worker_gpu_ids(count)
            gpu_ids = tuple(ids[int(position)] for position in devices)
            # A replica holding no GPU sees none, so it cannot take memory on one by accident.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        ours, theirs = socket.socketpair()
        # A fresh interpreter started by exec rather than multiprocessing: the nanny's workers
        # are daemonic processes, which multiprocessing does not let start children.
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        pipe = Connection(ours.detach())
        settings = {
            "replica_id": self.replica_id,
            "listen": _listen_address(worker.address),
            "security": worker.security,
            "worker": worker.address,
            "worker_name": str(worker.name),
            "worker_resources": total,
            "gpu_ids": list(gpu_ids),
            "token_sha256": self.token_sha256,  # over the pipe: this machine only
            "shared": self.shared,
            "busy_poll_s": self.busy_poll_s,
        }
        try:
            pipe.send((list(sys.path), settings))
            with self._send_lock:
                self._pipe = pipe
                pending, self._pending = self._pending, []
            for notice in pending:
                self._send(notice)
            self._watch(pipe, process)
        finally:
            with self._send_lock:
                self._pipe = None
            pipe.close()
            _reap(process, self._kill_at)
        if not self._announced:
            raise RuntimeError(
                f"the process of replica {self.replica_id} (pid {process.pid}) exited with "
                f"code {process.returncode} before it listened"
            )

    def _watch(self, pipe: Connection, process: subprocess.Popen[bytes]) -> None:
        while process.poll() is None:
            timeout = _CHECK_S
            if self._kill_at is not None:
                timeout = min(timeout, max(0.0, self._kill_at - time.monotonic()))
            if wait([pipe], timeout):
                try:
                    kind, value = pipe.recv()
                except (EOFError, OSError):  # the child exited (or closed its end)
                    return
                if kind == "listening":
                    self._announce(value, process.pid)
            elif self._kill_at is not None and time.monotonic() >= self._kill_at:
                return  # run() kills it
            elif self._kill_at is None and self._abandoned():
                self.stop()

    def _announce(self, address: str, pid: int) -> None:
        self._announced = True
        worker = self.worker
        hello = {
            "replica": self.replica_id,
            "address": address,
            "worker": worker.address,
            "pid": pid,
        }
        worker.loop.add_callback(worker.log_event, self.topic, hello)

    def _abandoned(self) -> bool:
        # Dask cannot interrupt a running task: a cancelled one only changes state.
        worker = self.worker
        if worker.status.name in ("closed", "failed"):
            return True
        task = worker.state.tasks.get(self.key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    def _send(self, notice: tuple[Any, ...]) -> None:
        with self._send_lock:
            pipe = self._pipe
            if pipe is None:
                self._pending.append(notice)
                return
            with contextlib.suppress(OSError):  # the child is gone; the watch sees it
                pipe.send(notice)

    def drain(self, *, scheduler_lost: bool) -> None:
        """Relay a closing worker's notice to the replica (from any thread)."""
        self._send(("drain", scheduler_lost))

    def stop(self) -> None:
        """Ask the replica's process to exit; it is killed if still there after the grace."""
        if self._kill_at is None:
            self._kill_at = time.monotonic() + STOP_GRACE_S
        self._send(("stop",))


def _reap(process: subprocess.Popen[bytes], kill_at: float | None) -> None:
    # Its pipe closed: it is exiting, or was told to stop and had its grace period.
    grace = STOP_GRACE_S if kill_at is None else kill_at - time.monotonic()
    try:
        process.wait(max(0.0, grace))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _listen_address(worker_address: str) -> str:
    scheme, _ = parse_address(worker_address)
    if scheme == "inproc":
        # In-process comms do not cross processes: the replica listens on loopback TCP instead.
        return "tcp://127.0.0.1"
    return f"{scheme}://{unparse_host_port(get_address_host(worker_address), 0)}"

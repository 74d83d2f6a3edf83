"""The replica's own process: a listener, then one comm to the runtime and a server on it.

Started by the replica's Dask task (:mod:`embserve_dask._worker`) with the replica's
``CUDA_VISIBLE_DEVICES`` already in its environment, so no user module is imported before the
devices are chosen. The task sends its settings over a pipe; the process listens on the worker's
host with the worker's security, sends its contact address back, and serves the first runtime
that connects and presents the replica's token (the settings hold its SHA-256 digest): the
core's :class:`~embserve.spi.ReplicaServer` over a
:class:`~embserve_dask._transport.CommTransport`, which gets the spec in ``START`` and unpickles
it only then, here. When the task relays that its worker is closing, the server tells the
runtime in a notice. The process exits when the runtime stops it or its comm closes, when the
task says ``stop``, or when the task's process goes away (the pipe closes, or the worker process
is no longer its parent).

Admission: distributed unpickles the ``__Pickled__`` parts of any message it reads, whatever the
comm's ``deserialize`` says, so a peer could run code here with its first message. Nothing this
process legitimately reads needs that (handshakes are plain msgpack; the protocol's payloads are
frames that only :class:`~embserve.spi.ReplicaServer` decodes, after admission), so the process
turns it off (:func:`_refuse_pickled_parts`) and reads with ``deserialize=False``. The first
message of a new comm must then be ``{TOKEN_KEY: token}``; a comm that sends anything else, or
nothing within :data:`ADMISSION_TIMEOUT_S`, is closed and logged, and the replica goes on
waiting for (or serving) its runtime.

Shared replicas (a namespace's, ``settings["shared"]``): the process serves every runtime that
presents the token, each comm with a server of its own over the one user object, which the
first comm (its owner's) builds with ``START``. It outlives any runtime's comm, so another
runtime takes it over when its owner goes; a ``STOP`` from any comm (the owner retiring it)
ends it once the other runtimes closed theirs (they drain first), or after its graceful
shutdown time. The task ends it when every runtime has let go of its Dask future.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

from distributed.comm import core as comm_core

from embserve.spi import (
    STOP,
    Frame,
    OnClosed,
    OnMessage,
    ReplicaServer,
    default_poll_s,
    new_loop,
    run_replica_process,
)
from embserve_dask._transport import CommTransport

__all__ = ["ADMISSION_TIMEOUT_S", "CONNECT_TIMEOUT_S", "TOKEN_KEY", "main"]

logger = logging.getLogger("embserve.dask")

#: How long a replica waits for its runtime to connect before it gives up and exits.
CONNECT_TIMEOUT_S = 60.0

#: How long a new comm may take to present the token before it is closed.
ADMISSION_TIMEOUT_S = 10.0

#: The key of the first message of the runtime's comm; its value is the replica's token.
TOKEN_KEY = "embserve-replica-token"

# How often the process checks that the worker that started it is still its parent, in case
# the pipe outlives it (a forked grandchild holding its end).
_PARENT_CHECK_S = 1.0

# distributed's functions are untyped; they are used through this name.
listen: Any = comm_core.listen


class _Replica:
    """The replica's listener, then its one comm to the runtime and the server on it."""

    def __init__(self, pipe: Connection, parent_pid: int, settings: dict[str, Any]) -> None:
        self.pipe = pipe
        self.parent_pid = parent_pid
        self.settings = settings
        self.server: ReplicaServer | None = None
        self._comm: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stopped = False
        self._draining: dict[str, bool] | None = None  # the notice, once the worker is closing
        self.shared: _Shared | None = None

    async def main(self) -> None:
        if self.settings.get("shared"):
            await _Shared(self).main()
            return
        async with self.listening(self._on_comm, self.stop) as (listener, timeout):
            comm = await self._comm
            timeout.cancel()
            listener.stop()
            if comm is not None:
                await self._serve(comm)

    @contextlib.asynccontextmanager
    async def listening(
        self, on_comm: Callable[[Any], Any], on_timeout: Callable[[], object]
    ) -> AsyncIterator[tuple[Any, asyncio.TimerHandle]]:
        """Listen for the runtime's comm (``on_comm`` gets each) and tell the parent where,
        watching the pipe and the parent meanwhile; ``on_timeout`` runs when nothing connects
        within CONNECT_TIMEOUT_S. Yields the listener and that timer; all stop on leaving."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        check = loop.call_later(_PARENT_CHECK_S, self._check_parent)
        listener = listen(
            self.settings["listen"],
            on_comm,
            deserialize=False,  # payloads stay frames; see the module's "Admission"
            **self.settings["security"].get_listen_args("worker"),
        )
        await listener.start()
        timeout = loop.call_later(CONNECT_TIMEOUT_S, on_timeout)
        try:
            self.pipe.send(("listening", listener.contact_address))
            yield listener, timeout
        finally:
            timeout.cancel()
            check.cancel()
            loop.remove_reader(self.pipe.fileno())
            listener.stop()

    def info(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "worker": settings["worker"],
            "worker_name": settings["worker_name"],
            "pid": os.getpid(),
            "worker_pid": self.parent_pid,
            "gpu_ids": list(settings["gpu_ids"]),
            "worker_resources": settings["worker_resources"],
        }

    def make_server(self, transport: CommTransport) -> ReplicaServer:
        settings = self.settings
        return ReplicaServer(
            transport, worker=settings["worker"], info=self.info(), gpu_ids=settings["gpu_ids"]
        )

    async def _serve(self, comm: Any) -> None:
        self.server = server = self.make_server(CommTransport(comm))
        if self._draining is not None:  # the worker began closing as the runtime connected
            server.notify(self._draining)
        await server.serve()

    async def _on_comm(self, comm: Any) -> None:
        if self._comm.done() or not await self.admits(comm):
            comm.abort()  # one runtime, one comm: anything else is a stray
            return
        if self._comm.done():  # another comm was admitted meanwhile
            comm.abort()
            return
        self._comm.set_result(comm)

    async def admits(self, comm: Any) -> bool:
        # Comms are admitted each on its own: a peer that sends nothing delays no other one.
        try:
            first = await asyncio.wait_for(comm.read(), ADMISSION_TIMEOUT_S)
        except Exception as exc:  # whatever it sent or failed to send, it is not admitted
            first, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "it did not present the replica's token"
        token = first.get(TOKEN_KEY) if isinstance(first, dict) else None
        if isinstance(token, bytes):
            digest = hashlib.sha256(token).hexdigest()
            if hmac.compare_digest(digest, self.settings["token_sha256"]):
                return True
            why = "it presented a wrong token"
        logger.warning(
            "replica %s refused a connection from %s: %s",
            self.settings["replica_id"],
            comm.peer_address,
            why,
        )
        return False

    def stop(self) -> None:
        """End the replica: stop serving, or stop waiting for the runtime."""
        if self._stopped:
            return
        self._stopped = True
        if self.shared is not None:
            self.shared.end()
            return
        if self.server is not None:
            self.server.stop()
        elif not self._comm.done():
            self._comm.set_result(None)

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            self.stop()
        else:
            asyncio.get_running_loop().call_later(_PARENT_CHECK_S, self._check_parent)

    def _on_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):  # the task's process is gone
            self.stop()
            return
        if message[0] == "drain":
            self._drain(scheduler_lost=message[1])
        else:  # "stop": the task was cancelled or its worker closed
            self.stop()

    def _drain(self, *, scheduler_lost: bool) -> None:
        if self._draining is not None:
            return
        self._draining = {"draining": True, "scheduler_lost": scheduler_lost}
        if self.shared is not None:
            self.shared.notify(self._draining)
        elif self.server is not None:
            self.server.notify(self._draining)
        elif not self._comm.done():
            # No runtime has connected yet: nothing to drain, so stop waiting for one.
            self.stop()


class _Watched(CommTransport):
    # A comm transport that says when its peer asked the replica to stop.

    def __init__(self, comm: Any, on_stop: Any) -> None:
        super().__init__(comm)
        self._on_stop = on_stop

    def start(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        def watched(kind: int, ident: int, frames: list[Frame]) -> None:
            if kind == STOP:
                self._on_stop()
            on_message(kind, ident, frames)

        super().start(watched, on_closed)


class _Shared:
    """A shared replica: one server per admitted comm, over the one user object."""

    def __init__(self, replica: _Replica) -> None:
        self.replica = replica
        replica.shared = self
        self.servers: dict[ReplicaServer, asyncio.Task[None]] = {}
        self._end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._retiring = False
        self.host: Any = None  # the user object's host, once the owner's START built it

    async def main(self) -> None:
        try:
            async with self.replica.listening(self._on_comm, self._first_timeout):
                await self._end
        finally:
            for server in list(self.servers):
                server.stop()
            await asyncio.gather(*self.servers.values(), return_exceptions=True)
            host = self._host()
            if host is not None:
                host.close()

    def _first_timeout(self) -> None:
        if not self.servers and self._host() is None:
            self.end()

    def _host(self) -> Any:
        if self.host is None:
            self.host = next((s.host for s in self.servers if s.host is not None), None)
        return self.host

    async def _on_comm(self, comm: Any) -> None:
        if self._retiring or self._end.done() or not await self.replica.admits(comm):
            comm.abort()
            return
        host = self._host()
        server = self.replica.make_server(_Watched(comm, self._stop_asked))
        server.closes_host = False
        server.host = host  # None for the first comm, whose START builds it
        if self.replica._draining is not None:
            server.notify(self.replica._draining)
        task = asyncio.ensure_future(server.serve())
        self.servers[server] = task
        task.add_done_callback(lambda _: self._ended(server))

    def _ended(self, server: ReplicaServer) -> None:
        if server.host is not None and self.host is None:
            self.host = server.host  # kept for the runtimes that attach later
        self.servers.pop(server, None)
        if self._retiring and not self.servers:
            self.end()

    def _stop_asked(self) -> None:
        # The owner retires the replica: the other runtimes drain and close their comms.
        if self._retiring:
            return
        self._retiring = True
        host = self._host()
        grace = host.spec.config.graceful_shutdown_timeout_s if host is not None else 0.0
        asyncio.get_running_loop().call_later(grace + 1.0, self.end)

    def notify(self, value: Any) -> None:
        for server in self.servers:
            server.notify(value)

    def end(self) -> None:
        if not self._end.done():
            self._end.set_result(None)


class _RefusedPickle:
    # Stands in for distributed's pickle module where messages are decoded: dumps as before,
    # loads refused (see the module's "Admission").

    def __init__(self, real: Any) -> None:
        self.dumps = real.dumps

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a replica's process unpickles nothing from a comm's messages")


def _refuse_pickled_parts() -> None:
    core = importlib.import_module("distributed.protocol.core")
    real = getattr(core, "pickle", None)
    if real is not None and not isinstance(real, _RefusedPickle):
        core.pickle = _RefusedPickle(real)  # type: ignore[attr-defined]


async def _run(pipe: Connection, parent_pid: int, settings: dict[str, Any]) -> None:
    await _Replica(pipe, parent_pid, settings).main()


def main() -> None:
    """The process's entry point: ``argv`` holds the pipe's file descriptor and the parent pid."""
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    # Ctrl-C in a terminal reaches the whole process group; the worker decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _refuse_pickled_parts()
    pipe = Connection(fd)

    def serve() -> None:
        sys_path, settings = pipe.recv()
        # The worker's own path (upload_file, its local directory): user code resolves as there.
        sys.path[:] = sys_path
        poll_s = settings.get("busy_poll_s")
        loop = new_loop(default_poll_s() if poll_s is None else poll_s)
        loop.run_until_complete(_run(pipe, parent_pid, settings))

    run_replica_process(serve)

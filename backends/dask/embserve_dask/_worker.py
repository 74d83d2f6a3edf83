"""The replica side: one long-running Dask task per replica, serving over a comm of its own.

The task holds the resources it asked for (``{"GPU": 0.5}``) for as long as it runs, which is the
replica's whole life: Dask's own resource accounting then keeps other replicas off what this one
holds. It secedes from the worker's thread pool, runs the :class:`~embserve._host.ReplicaHost`
on an event loop of its own (so user code that blocks its loop cannot stall the worker's
heartbeats), listens on the worker's host with the worker's security, and tells the runtime
where through a Dask event. Requests then go straight from the runtime to this listener; the
scheduler sees none of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import distributed
from distributed.comm import core as comm_core
from distributed.comm.addressing import get_address_host, parse_address, unparse_host_port
from distributed.diagnostics.plugin import WorkerPlugin

from embserve import handle as handle_module
from embserve._host import ReplicaHost
from embserve.context import ReplicaContext
from embserve.handle import Response, ResponseStream, resolve_responses, start_call
from embserve.replica import ReplicaSpec
from embserve.request import Request
from embserve_dask._protocol import Peer

__all__ = ["DrainPlugin", "serve_replica"]

#: How long a replica task waits for its runtime to connect before it gives up and ends.
CONNECT_TIMEOUT_S = 60.0

# distributed's functions are untyped; they are used through these names.
listen: Any = comm_core.listen
secede: Any = distributed.secede

_lock = threading.Lock()
_servers: dict[str, set[_ReplicaServer]] = {}  # worker address -> replicas running there
_proxies: dict[str, list[_RuntimeProxy]] = {}  # runtime id -> proxies in this process


def serve_replica(spec: ReplicaSpec, topic: str) -> str:
    """The Dask task of one replica: runs until the runtime stops it or goes away."""
    worker = distributed.get_worker()
    # Only this worker's own teardown can keep it alive while its replicas drain.
    worker.plugins.setdefault(DrainPlugin.name, DrainPlugin())
    secede()
    server = _ReplicaServer(spec, worker, topic)
    with _lock:
        _servers.setdefault(worker.address, set()).add(server)
    try:
        asyncio.run(server.main())
    finally:
        with _lock:
            _servers.get(worker.address, set()).discard(server)
        server.finished.set_result(None)
    return spec.replica_id


class DrainPlugin(WorkerPlugin):
    """Keeps a closing worker alive until the runtime has drained the replicas it holds.

    A worker closes when it is retired (``client.retire_workers``, adaptive scaling), stopped by
    its nanny or told to by the scheduler. Each replica on it tells its runtime, which stops
    routing to it, starts a replacement elsewhere and stops it once its requests finished.
    """

    name = "embserve-drain"

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    async def teardown(self, worker: Any) -> None:
        """Ask every replica on ``worker`` to drain and wait for them to end."""
        with _lock:
            servers = list(_servers.get(worker.address, ()))
        lost = _lost_scheduler(worker)
        for server in servers:
            server.drain(scheduler_lost=lost)
        waits = [asyncio.wrap_future(server.finished) for server in servers]
        if waits:
            await asyncio.wait(waits, timeout=self.timeout_s)


def _lost_scheduler(worker: Any) -> bool:
    # A worker closes itself when its scheduler connection breaks; its replicas then keep
    # serving (no drain) for as long as this teardown keeps the worker alive.
    stream = getattr(worker, "batched_stream", None)
    comm = getattr(stream, "comm", None)
    return comm is None or bool(comm.closed())


class _ReplicaServer:
    """One replica on a worker: its listener, its comm to the runtime, its host."""

    def __init__(self, spec: ReplicaSpec, worker: Any, topic: str) -> None:
        self.spec = spec
        self.worker = worker
        self.topic = topic
        self.host: ReplicaHost | None = None
        self.peer: Peer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._connected: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._draining = False
        self._proxy: _RuntimeProxy | None = None

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._connected, self._done = asyncio.Event(), asyncio.Event()
        worker = self.worker
        scheme, _ = parse_address(worker.address)
        if scheme == "inproc":
            where = "inproc://"
        else:
            where = f"{scheme}://{unparse_host_port(get_address_host(worker.address), 0)}"
        listener = listen(
            where, self._on_comm, deserialize=True, **worker.security.get_listen_args("worker")
        )
        await listener.start()
        try:
            hello = {
                "replica": self.spec.replica_id,
                "address": listener.contact_address,
                "worker": worker.address,
            }
            worker.loop.add_callback(worker.log_event, self.topic, hello)
            try:
                await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                return
            if self.peer is not None:
                await self._done.wait()
        finally:
            listener.stop()
            self._close_host()

    async def _on_comm(self, comm: Any) -> None:
        assert self._connected is not None and self._done is not None
        if self.peer is not None:  # one runtime, one comm: anything else is a stray
            comm.abort()
            return
        self.peer = Peer(comm, self._serve, self._serve_stream, name="the runtime")
        self._connected.set()
        try:
            await self.peer.run()
        finally:
            self._done.set()

    def drain(self, *, scheduler_lost: bool = False) -> None:
        """Tell the runtime this replica's worker is closing (from any thread)."""
        loop, peer = self.loop, self.peer
        if loop is None or self._draining:
            return
        self._draining = True
        if peer is not None:
            notice = {"scheduler_lost": scheduler_lost}
            loop.call_soon_threadsafe(peer.notify, "draining", notice)
        elif self._connected is not None:
            # No runtime has connected yet: nothing to drain, so stop waiting for one.
            loop.call_soon_threadsafe(self._connected.set)

    # -- requests from the runtime --------------------------------------------------------

    async def _serve(self, op: str, value: Any) -> Any:
        host = self.host
        if op == "call":
            assert host is not None
            return await host.call(Request.from_wire(self.spec.deployment, value))
        if op == "start":
            return await self._start()
        if op == "health":
            assert host is not None
            await host.check_health()
            return None
        if op == "reconfigure":
            assert host is not None
            await host.reconfigure(value)
            return None
        if op in ("stop", "exit"):
            self._close_host()
            return None
        raise ValueError(f"unknown request {op!r}")

    def _serve_stream(self, op: str, value: Any) -> AsyncIterator[Any]:
        assert self.host is not None and op == "stream"
        return self.host.stream(Request.from_wire(self.spec.deployment, value))

    async def _start(self) -> dict[str, Any]:
        spec, worker = self.spec, self.worker
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        total = dict(worker.state.total_resources)
        gpu_ids: tuple[str, ...] = ()
        if visible:
            gpu_ids = tuple(v.strip() for v in visible.split(",") if v.strip())
        elif spec.config.resources.get("GPU", 0) > 0:
            # No pinning given: a worker declaring GPU=n is taken to own devices 0..n-1.
            gpu_ids = tuple(str(i) for i in range(int(total.get("GPU", 0))))
        info = {
            "worker": worker.address,
            "worker_name": str(worker.name),
            "pid": os.getpid(),
            "gpu_ids": list(gpu_ids),
            "resources": dict(spec.config.resources),
            "worker_resources": total,
        }
        context = ReplicaContext(
            spec.deployment,
            spec.replica_id,
            gpu_ids=gpu_ids,
            worker=worker.address,
            extra=info,
        )
        assert self.peer is not None
        self._register_proxy()
        self.host = ReplicaHost(spec, context)
        await self.host.start()
        return info

    def _register_proxy(self) -> None:
        runtime_id = self.spec.runtime_id
        assert self.peer is not None and self.loop is not None
        proxy = _RuntimeProxy(self.peer, self.loop)
        with _lock:
            current = handle_module.find_submitter(runtime_id)
            proxies = _proxies.setdefault(runtime_id, [])
            # The runtime itself lives in this process (a LocalCluster with processes=False):
            # its handles already reach it, and a proxy must not take its place.
            if current is not None and current not in proxies:
                return
            proxies.append(proxy)
            handle_module.register_submitter(runtime_id, proxy)
        self._proxy = proxy

    def _close_host(self) -> None:
        host, self.host = self.host, None
        if host is not None:
            host.close()
        proxy = self._proxy
        if proxy is None:
            return
        self._proxy = None
        runtime_id = self.spec.runtime_id
        with _lock:
            proxies = _proxies.get(runtime_id, [])
            if proxy in proxies:
                proxies.remove(proxy)
            if handle_module.find_submitter(runtime_id) is proxy:
                if proxies:
                    handle_module.register_submitter(runtime_id, proxies[-1])
                else:
                    handle_module.unregister_submitter(runtime_id)


class _RuntimeProxy:
    """Handles unpickled on a worker call their runtime through this, over a replica's comm."""

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.loop = loop

    def submit(self, request: Request) -> Response | ResponseStream:
        if request.stream:
            return ResponseStream(lambda: self._stream(request), self.loop)
        return start_call(self.loop, self._submit(request))

    async def _submit(self, request: Request) -> Any:
        request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        return await self.peer.request("submit", (request.target, request.to_wire()))

    async def _stream(self, request: Request) -> AsyncIterator[Any]:
        request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        async for item in self.peer.stream("submit_stream", (request.target, request.to_wire())):
            yield item

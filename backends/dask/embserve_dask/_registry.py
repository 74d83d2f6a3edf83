"""A namespace's registry in the Dask scheduler: :class:`RegistryPlugin`, and its client.

Why a scheduler plugin rather than Dask's Lock, Variable and Pub/Sub: every step a runtime
takes (join, claim, publish a replica set) must read and write several things at once (the
owner, the spec's serial, the replicas), and a plugin's handler runs whole on the scheduler's
single event loop, so each is an atomic compare-and-set with no lock to leak. Leases are the
plugin's too: each runtime heartbeats; one that stops for ``lease_s`` (killed, partitioned) or
whose client the scheduler removes (it exited, its connection closed) loses its deployments at
once, and every runtime hears of it through a Dask event (pushed over the client's existing
connection, no polling), and claims what has no owner. A namespace whose last runtime left is
forgotten, so nothing outlives every runtime that used it.

The state holds each replica's admission token, so that any runtime of the namespace can reach
it: it is served only to the scheduler's clients (who can run code on the workers anyway), and
never put in an event. Requests never go through the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from embserve.sharing import NamespaceState, Registry, SharedDeployment, SharedEndpoint

__all__ = ["DaskRegistry", "RegistryPlugin"]

logger = logging.getLogger("embserve.dask")

#: How long a runtime's lease lasts without a heartbeat (runtimes heartbeat three times in it).
LEASE_S = 3.0
_EXPIRY_CHECK_S = 0.25


def topic_of(namespace: str) -> str:
    """The Dask event topic a namespace's changes are told on."""
    return f"embserve-namespace-{namespace}"


class _Namespace:
    def __init__(self) -> None:
        self.generation = 0
        self.members: dict[str, tuple[str, float]] = {}  # runtime -> (client id, lease end)
        self.deployments: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}


class RegistryPlugin(SchedulerPlugin):
    """The registries of every namespace on this scheduler (registered once, idempotent)."""

    name = "embserve-registry"
    idempotent = True

    def __init__(self, lease_s: float = LEASE_S) -> None:
        self.lease_s = lease_s
        self.namespaces: dict[str, _Namespace] = {}
        self.scheduler: Any = None
        self._expiry: asyncio.TimerHandle | None = None

    async def start(self, scheduler: Any) -> None:
        """Install the handlers on ``scheduler`` and start expiring leases."""
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "embserve_join": self.join,
                "embserve_claim": self.claim,
                "embserve_replicas": self.set_replicas,
                "embserve_endpoint": self.set_endpoint,
                "embserve_delete": self.delete,
                "embserve_state": self.state,
                "embserve_spec": self.spec,
                "embserve_heartbeat": self.heartbeat,
                "embserve_leave": self.leave,
            }
        )
        self._expiry = asyncio.get_running_loop().call_later(_EXPIRY_CHECK_S, self._expire)

    async def close(self) -> None:
        """Stop expiring leases."""
        if self._expiry is not None:
            self._expiry.cancel()

    # -- members and leases ---------------------------------------------------------------

    def _member(self, namespace: str, runtime: str, client: str) -> _Namespace:
        ns = self.namespaces.setdefault(namespace, _Namespace())
        ns.members[runtime] = (client, time.monotonic() + self.lease_s)
        return ns

    def _changed(self, namespace: str, ns: _Namespace) -> None:
        ns.generation += 1
        self.scheduler.log_event(topic_of(namespace), {"generation": ns.generation})

    def _drop(self, namespace: str, ns: _Namespace, runtime: str) -> None:
        ns.members.pop(runtime, None)
        for deployment in ns.deployments.values():
            if deployment["owner"] == runtime:
                deployment["owner"] = None
        if not ns.members:
            # Nobody uses it: its replicas went with their clients' futures.
            del self.namespaces[namespace]
        self._changed(namespace, ns)

    def _expire(self) -> None:
        now = time.monotonic()
        for namespace, ns in list(self.namespaces.items()):
            for runtime, (_, until) in list(ns.members.items()):
                if until < now and namespace in self.namespaces:
                    logger.info("namespace %s: runtime %s's lease expired", namespace, runtime)
                    self._drop(namespace, ns, runtime)
        self._expiry = asyncio.get_running_loop().call_later(_EXPIRY_CHECK_S, self._expire)

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client left: the runtimes it served lose their leases now."""
        for namespace, ns in list(self.namespaces.items()):
            for runtime, (owner_client, _) in list(ns.members.items()):
                if owner_client == client and namespace in self.namespaces:
                    self._drop(namespace, ns, runtime)

    def heartbeat(self, namespace: str, runtime: str, client: str) -> dict[str, Any]:
        """Renew ``runtime``'s lease. Says whether it had expired (it is a member again now),
        and the namespace's generation (so that a runtime that missed an event learns it)."""
        ns = self.namespaces.get(namespace)
        known = ns is not None and runtime in ns.members
        ns = self._member(namespace, runtime, client)
        return {"known": known, "generation": ns.generation}

    def leave(self, namespace: str, runtime: str) -> None:
        """``runtime`` leaves ``namespace``."""
        ns = self.namespaces.get(namespace)
        if ns is not None and runtime in ns.members:
            self._drop(namespace, ns, runtime)

    # -- deployments and endpoints --------------------------------------------------------

    def join(
        self,
        namespace: str,
        runtime: str,
        client: str,
        name: str,
        version: str | None,
        spec: bytes,
    ) -> dict[str, Any]:
        """See :meth:`embserve.sharing.Registry.join`."""
        ns = self._member(namespace, runtime, client)
        entry = ns.deployments.get(name)
        if entry is None:
            entry = ns.deployments[name] = {
                "name": name,
                "owner": runtime,
                "version": version,
                "serial": 1,
                "spec": spec,
                "replicas": {},
            }
        elif entry["version"] != version:  # the same version (None too) attaches
            entry.update(version=version, spec=spec, serial=entry["serial"] + 1)
        if entry["owner"] is None:
            entry["owner"] = runtime
        self._changed(namespace, ns)
        return _public(entry)

    def claim(self, namespace: str, runtime: str, client: str, name: str) -> bool:
        """See :meth:`embserve.sharing.Registry.claim`."""
        ns = self._member(namespace, runtime, client)
        entry = ns.deployments.get(name)
        if entry is None:
            return False
        if entry["owner"] is None:
            entry["owner"] = runtime
            self._changed(namespace, ns)
        return bool(entry["owner"] == runtime)

    def set_replicas(
        self, namespace: str, runtime: str, name: str, replicas: dict[str, Any]
    ) -> bool:
        """See :meth:`embserve.sharing.Registry.set_replicas`."""
        ns = self.namespaces.get(namespace)
        entry = ns.deployments.get(name) if ns is not None else None
        if ns is None or entry is None or entry["owner"] != runtime:
            return False
        entry["replicas"] = replicas
        self._changed(namespace, ns)
        return True

    def set_endpoint(
        self,
        namespace: str,
        name: str,
        route_prefix: str | None,
        traffic: dict[str, float] | None,
        shadow: dict[str, float] | None,
    ) -> None:
        """See :meth:`embserve.sharing.Registry.set_endpoint`."""
        ns = self.namespaces.setdefault(namespace, _Namespace())
        endpoint = ns.endpoints.setdefault(
            name, {"name": name, "traffic": {name: 1.0}, "shadow": {}}
        )
        endpoint["route_prefix"] = route_prefix
        if traffic is not None:
            endpoint.update(traffic=traffic, shadow=shadow or {})
        self._changed(namespace, ns)

    def delete(self, namespace: str, name: str) -> None:
        """See :meth:`embserve.sharing.Registry.delete`."""
        ns = self.namespaces.get(namespace)
        if ns is not None:
            ns.deployments.pop(name, None)
            ns.endpoints.pop(name, None)
            self._changed(namespace, ns)

    def state(self, namespace: str) -> dict[str, Any]:
        """The namespace now: generation, deployments (without their specs), endpoints."""
        ns = self.namespaces.get(namespace) or _Namespace()
        return {
            "generation": ns.generation,
            "deployments": [_public(d) for d in ns.deployments.values()],
            "endpoints": list(ns.endpoints.values()),
        }

    def spec(self, namespace: str, name: str) -> bytes | None:
        """The spec of deployment ``name``."""
        ns = self.namespaces.get(namespace)
        entry = ns.deployments.get(name) if ns is not None else None
        return None if entry is None else bytes(entry["spec"])


def _public(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "spec"}


def _deployment(raw: Mapping[str, Any]) -> SharedDeployment:
    return SharedDeployment(
        name=raw["name"],
        owner=raw["owner"],
        version=raw["version"],
        serial=int(raw["serial"]),
        replicas=dict(raw["replicas"]),
    )


class DaskRegistry(Registry):
    """The client of a namespace's :class:`RegistryPlugin`, over a runtime's Dask client.

    Heartbeats every third of the lease; when a heartbeat finds the lease had expired (the
    runtime was cut off), it tells the watcher, who learns what it lost.
    """

    def __init__(
        self, client: Any, namespace: str, runtime_id: str, lease_s: float = LEASE_S
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.runtime_id = runtime_id
        self.lease_s = lease_s
        self._on_change: Callable[[], None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._seen = -1  # the generation of the last state read

    async def open(self) -> None:
        """Install the plugin (once per scheduler), and start heartbeating."""
        await self.client.register_plugin(RegistryPlugin(self.lease_s))
        self.client.subscribe_topic(topic_of(self.namespace), self._on_event)
        await self._call("heartbeat", runtime=self.runtime_id, client=self.client.id)
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def close(self) -> None:
        """Stop heartbeating and listening."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(topic_of(self.namespace))

    async def _beat(self) -> None:
        lost = False
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                beat = await asyncio.wait_for(
                    self._call("heartbeat", runtime=self.runtime_id, client=self.client.id),
                    self.lease_s,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not lost:
                    logger.warning("namespace %s: heartbeat failed: %s", self.namespace, exc)
                lost = True
                continue
            # The lease had lapsed, the scheduler was unreachable, or an event was missed (a
            # subscription reaches the scheduler on a stream of its own): read the state again.
            behind = beat["generation"] != self._seen
            if (not beat["known"] or lost or behind) and self._on_change is not None:
                self._on_change()
            lost = False

    def _on_event(self, event: tuple[float, Any]) -> None:
        if self._on_change is not None:
            self._on_change()

    async def _call(self, op: str, **kwargs: Any) -> Any:
        handler = getattr(self.client.scheduler, f"embserve_{op}")
        return await handler(namespace=self.namespace, **kwargs)

    async def join(
        self, name: str, runtime_id: str, *, version: str | None, spec: bytes
    ) -> SharedDeployment:
        """See :meth:`embserve.sharing.Registry.join`."""
        raw = await self._call(
            "join",
            runtime=runtime_id,
            client=self.client.id,
            name=name,
            version=version,
            spec=spec,
        )
        return _deployment(raw)

    async def claim(self, name: str, runtime_id: str) -> bool:
        """See :meth:`embserve.sharing.Registry.claim`."""
        return bool(await self._call("claim", runtime=runtime_id, client=self.client.id, name=name))

    async def set_replicas(
        self, name: str, runtime_id: str, replicas: Mapping[str, Mapping[str, Any]]
    ) -> bool:
        """See :meth:`embserve.sharing.Registry.set_replicas`."""
        plain = {rid: dict(contact) for rid, contact in replicas.items()}
        return bool(await self._call("replicas", runtime=runtime_id, name=name, replicas=plain))

    async def set_endpoint(
        self,
        name: str,
        route_prefix: str | None,
        traffic: Mapping[str, float] | None,
        shadow: Mapping[str, float] | None,
    ) -> None:
        """See :meth:`embserve.sharing.Registry.set_endpoint`."""
        await self._call(
            "endpoint",
            name=name,
            route_prefix=route_prefix,
            traffic=None if traffic is None else dict(traffic),
            shadow=None if shadow is None else dict(shadow),
        )

    async def delete(self, name: str) -> None:
        """See :meth:`embserve.sharing.Registry.delete`."""
        await self._call("delete", name=name)

    async def state(self) -> NamespaceState:
        """See :meth:`embserve.sharing.Registry.state`."""
        raw = await self._call("state")
        self._seen = int(raw["generation"])
        return NamespaceState(
            generation=int(raw["generation"]),
            deployments={d["name"]: _deployment(d) for d in raw["deployments"]},
            endpoints={
                e["name"]: SharedEndpoint(
                    e["name"], e.get("route_prefix"), dict(e["traffic"]), dict(e["shadow"])
                )
                for e in raw["endpoints"]
            },
        )

    async def spec(self, name: str) -> bytes:
        """See :meth:`embserve.sharing.Registry.spec`."""
        spec = await self._call("spec", name=name)
        if spec is None:
            raise KeyError(f"namespace {self.namespace!r} has no deployment {name!r}")
        return bytes(spec)

    async def leave(self, runtime_id: str) -> None:
        """See :meth:`embserve.sharing.Registry.leave`."""
        if self._heartbeat is not None and runtime_id == self.runtime_id:
            self._heartbeat.cancel()  # else its next beat would make it a member again
        await self._call("leave", runtime=runtime_id)

    def watch(self, on_change: Callable[[], None]) -> None:
        """See :meth:`embserve.sharing.Registry.watch`."""
        self._on_change = on_change

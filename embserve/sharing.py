"""The seam of shared deployments: a namespace's registry, kept where every runtime reaches it.

Runtimes built with the same ``namespace`` on a backend whose :attr:`Backend.shares_replicas
<embserve.backends.Backend.shares_replicas>` is true share their deployments: the first to run
one starts its replicas and *owns* it (restarts, autoscaling, rolling updates); the others
*attach* and route to the same replicas directly. What they agree on lives in a
:class:`Registry` the backend provides (the Dask backend's lives in the Dask scheduler): per
deployment its owner, its code version, the serial of its spec and how to reach each of its
replicas; per endpoint its route prefix and traffic policy. A registry tells every runtime of a
change (:meth:`Registry.watch`); each then reads the state it needs.

The registry guarantees, under races and exits: one owner per deployment at a time; an owner
that leaves or stops renewing its lease loses its deployments within a few seconds, so that
another runtime :meth:`Registry.claim`\\ s them; only the owner's replica sets are accepted.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["NamespaceState", "Registry", "SharedDeployment", "SharedEndpoint"]


@dataclasses.dataclass(frozen=True)
class SharedDeployment:
    """One deployment as the registry knows it.

    ``replicas`` maps each replica id to what another runtime needs to reach it (the backend's
    own contact: an address, an admission token) and the ``serial`` of the spec it started
    from.
    """

    name: str
    owner: str | None
    version: str | None
    serial: int
    replicas: Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class SharedEndpoint:
    """One endpoint as the registry knows it."""

    name: str
    route_prefix: str | None
    traffic: Mapping[str, float]
    shadow: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class NamespaceState:
    """Everything in a namespace; ``generation`` grows with every change."""

    generation: int
    deployments: Mapping[str, SharedDeployment]
    endpoints: Mapping[str, SharedEndpoint]


class Registry(ABC):
    """A namespace's registry. Every coroutine runs on the runtime's loop; each is one atomic
    step on the registry's side, so two runtimes racing get one answer each, consistently."""

    @abstractmethod
    async def join(
        self, name: str, runtime_id: str, *, version: str | None, spec: bytes
    ) -> SharedDeployment:
        """Run deployment ``name``: create it, owned by ``runtime_id``, if it is new; attach
        when it runs the same ``version``; else make ``spec`` (a new version) its spec under
        a new serial, which its owner rolls out. A deployment without an owner gets
        ``runtime_id`` as its owner."""

    @abstractmethod
    async def claim(self, name: str, runtime_id: str) -> bool:
        """Become the owner of ``name`` if it has none; True when ``runtime_id`` owns it."""

    @abstractmethod
    async def set_replicas(
        self, name: str, runtime_id: str, replicas: Mapping[str, Mapping[str, Any]]
    ) -> bool:
        """Publish ``name``'s replica set; refused (False) unless ``runtime_id`` owns it."""

    @abstractmethod
    async def set_endpoint(
        self,
        name: str,
        route_prefix: str | None,
        traffic: Mapping[str, float] | None,
        shadow: Mapping[str, float] | None,
    ) -> None:
        """Create endpoint ``name`` (``traffic`` None: all to the deployment of its name) or
        change its route prefix, and its policy where ``traffic`` is given."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove deployment and endpoint ``name``."""

    @abstractmethod
    async def state(self) -> NamespaceState:
        """The namespace as it is now."""

    @abstractmethod
    async def spec(self, name: str) -> bytes:
        """The spec of ``name`` (what :meth:`join` was given for its current serial)."""

    @abstractmethod
    async def leave(self, runtime_id: str) -> None:
        """``runtime_id`` goes: its deployments lose their owner now."""

    @abstractmethod
    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` on the runtime's loop whenever the namespace changed (within a
        second of the change) and whenever the registry's link was lost and is back."""

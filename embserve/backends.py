"""The Backend seam (where replicas run) and the registry that finds backends by name.

Backends register in the entry-point group ``embserve.backends`` as ``scheme = module:Class``.
``Runtime(backend="dask://host:8786")`` loads the class registered as ``dask`` and builds it with
:meth:`Backend.from_address`; ``Runtime(backend="process")`` builds it with no arguments. Classes
are reachable as attributes too (``embserve.backends.ProcessBackend``), loaded on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from embserve.errors import BackendNotFoundError
from embserve.replica import Replica, ReplicaSpec

if TYPE_CHECKING:
    from importlib import metadata

    from embserve.sharing import Registry

__all__ = ["Backend", "ReplicaDied", "load_backend", "resolve_backend"]

ENTRY_POINT_GROUP = "embserve.backends"

#: Called by a backend, on the runtime's loop, when a replica dies on its own.
ReplicaDied = Callable[[Replica, str], None]

# Which extra of embserve holds the backends this project ships, for the error that names what
# to install.
_EXTRAS = {"process": "process", "dask": "dask", "tls": "dask", "tcp": "dask"}


class Backend(ABC):
    """Places, starts, watches and stops replicas.

    Contract: every coroutine runs on the runtime's event loop. :meth:`start` is awaited once
    before any replica starts and :meth:`close` once after every replica stopped.
    :meth:`start_replica` returns a RUNNING replica, waits (with the reason in ``pending``) while
    no capacity fits the deployment's ``resources``, and raises
    :class:`~embserve.DeploymentFailedError` with the user's traceback when the constructor
    fails. A replica that dies on its own is reported through the ``on_replica_died`` callback.
    """

    #: The scheme or name this backend registers under.
    name: ClassVar[str] = ""
    #: Whether replicas run user code in this process, with :meth:`Replica.run_here
    #: <embserve.replica.Replica.run_here>` (sync callers then run it in their own thread).
    in_process: ClassVar[bool] = False
    #: Whether replicas elsewhere take a plain thread's call on a line of their own, whatever
    #: the kind of its method (:meth:`Replica.run_here <embserve.replica.Replica.run_here>`):
    #: the thread sends it and reads the answer itself, with no hop through the runtime's loop.
    direct_calls: ClassVar[bool] = False

    def __init__(self) -> None:
        self.on_replica_died: ReplicaDied = _ignore_death
        #: Why replicas of a deployment wait, keyed by deployment name (for status).
        self.pending: dict[str, str] = {}
        #: The ids of replicas waiting for resources (status shows them PENDING_ALLOCATION).
        self.allocating: set[str] = set()

    @classmethod
    def from_address(cls, address: str) -> Backend:
        """Build the backend for an address such as ``dask://host:8786``."""
        raise ValueError(f"backend {cls.__name__} takes no address, got {address!r}")

    async def start(self, on_replica_died: ReplicaDied) -> None:
        """Prepare to start replicas; remember whom to tell when one dies."""
        self.on_replica_died = on_replica_died

    @abstractmethod
    async def start_replica(self, spec: ReplicaSpec) -> Replica:
        """Place and start one replica and return it RUNNING."""

    async def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing)
        """Release what the backend holds (connections, worker processes)."""

    def describe(self) -> str:
        """A short description for status: the backend's name and where it runs."""
        return self.name or type(self).__name__

    # -- sharing replicas between runtimes (see embserve.sharing) -------------------------

    @property
    def shares_replicas(self) -> bool:
        """True when runtimes in other processes can share this backend's replicas (a
        namespace is set and the backend supports it): what ``--workers N`` needs."""
        return False

    def use_namespace(self, namespace: str) -> None:
        """Share deployments with the runtimes of ``namespace`` (called before :meth:`start`).

        Raises :class:`ValueError` for a backend whose replicas only its own runtime reaches.
        """
        raise ValueError(
            f"the {self.describe()} backend cannot share replicas between runtimes, so it takes "
            f"no namespace (got {namespace!r}); use the Dask backend for shared deployments"
        )

    async def open_registry(self, runtime_id: str) -> Registry:
        """The namespace's :class:`~embserve.sharing.Registry`, for ``runtime_id`` (after
        :meth:`start`; only when :attr:`shares_replicas`)."""
        raise NotImplementedError(f"{type(self).__name__} shares no replicas")

    def contact(self, replica: Replica) -> Mapping[str, Any]:
        """What another runtime needs to reach ``replica`` (plain values: msgpack-able)."""
        raise NotImplementedError(f"{type(self).__name__} shares no replicas")

    async def adopt(self, spec: ReplicaSpec, contact: Mapping[str, Any]) -> Replica:
        """Connect to a RUNNING replica another runtime started (``contact`` is what
        :meth:`contact` gave there); raises :class:`OSError` when it cannot be reached."""
        raise NotImplementedError(f"{type(self).__name__} shares no replicas")

    def set_owner(self, replica: Replica, owned: bool) -> None:  # noqa: B027  (optional hook)
        """Whether this runtime owns ``replica``: stopping an owned replica stops it for
        every runtime; stopping one that is not only lets go of it."""


def _ignore_death(replica: Replica, reason: str) -> None:
    pass


def _entry_points() -> dict[str, metadata.EntryPoint]:
    from importlib import metadata  # costs tens of ms: only when a backend is looked up

    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``.

    Raises :class:`~embserve.BackendNotFoundError` naming the distribution to install.
    """
    if name == "local":
        from embserve.local import LocalBackend

        return LocalBackend
    entry = _entry_points().get(name)
    if entry is None:
        known = ", ".join(sorted({"local", *_entry_points()}))
        extra = _EXTRAS.get(name)
        install = ""
        if extra is not None:
            from embserve._install import install_command

            install = f"; install it with `{install_command(extra)}`"
        raise BackendNotFoundError(
            f"no embserve backend named {name!r} is installed{install} (installed: {known})"
        )
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendNotFoundError(f"entry point {entry.value!r} is not a Backend subclass")
    return cls


def resolve_backend(backend: str | Backend | None) -> Backend:
    """A Backend from what a user passed: an instance, a name, or an address with a scheme."""
    if isinstance(backend, Backend):
        return backend
    if backend is None:
        backend = "local"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a name, an address or a Backend, got {backend!r}")
    scheme, sep, _ = backend.partition("://")
    cls = load_backend(scheme)
    return cls.from_address(backend) if sep else cls()


def __getattr__(name: str) -> Any:
    # embserve.backends.ProcessBackend and friends, loaded from their entry points on first use.
    if name == "LocalBackend":
        from embserve.local import LocalBackend

        return LocalBackend
    for entry in _entry_points().values():
        if entry.attr == name:
            return entry.load()
    if name.endswith("Backend"):
        scheme = name[: -len("Backend")].lower()
        return load_backend(scheme)  # raises the error that names what to install
    raise AttributeError(f"module 'embserve.backends' has no attribute {name!r}")

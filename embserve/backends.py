"""The Backend seam (where replicas run) and the registry that finds backends by name.

Backends register in the entry-point group ``embserve.backends`` as ``scheme = module:Class``.
``Runtime(backend="dask://host:8786")`` loads the class registered as ``dask`` and builds it with
:meth:`Backend.from_address`; ``Runtime(backend="process")`` builds it with no arguments. Classes
are reachable as attributes too (``embserve.backends.ProcessBackend``), loaded on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from embserve.errors import BackendNotFoundError
from embserve.replica import Replica, ReplicaSpec

if TYPE_CHECKING:
    from importlib import metadata

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

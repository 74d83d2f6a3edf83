"""What user code can learn about the replica it runs in."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["ReplicaContext", "get_replica_context"]


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """The replica that is running the current code.

    Attributes:
        deployment: the deployment's name.
        replica_id: the replica's id, unique within its runtime.
        gpu_ids: the GPUs this replica holds (as ``CUDA_VISIBLE_DEVICES`` would name them).
        worker: where the replica runs: ``"local"``, a process id, or a Dask worker address.
        extra: anything else the backend knows (resources held, node name).
        app_name: the application the deployment runs in: the name it, or the deployment that
            binds it, was run under (``embserve.run(app, name=...)``).
    """

    deployment: str
    replica_id: str
    gpu_ids: tuple[str, ...] = ()
    worker: str = "local"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    app_name: str = ""

    @property
    def replica_tag(self) -> str:
        """Ray Serve's name for :attr:`replica_id`."""
        return self.replica_id


_current: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "embserve_replica_context", default=None
)


def get_replica_context() -> ReplicaContext:
    """The :class:`ReplicaContext` of the replica running the caller.

    Works in constructors, methods, sync code in the replica's threads and async code on its loop,
    on every backend. Raises ``RuntimeError`` when called outside a replica.
    """
    context = _current.get()
    if context is None:
        raise RuntimeError("get_replica_context() called outside a replica")
    return context


#: Make a context the current replica's (used by replica hosts; ``initializer`` of their thread
#: pools); returns the token for :data:`reset_replica_context`. The context variable's own
#: method: no frame of ours on the hot path of a call.
set_replica_context = _current.set
#: Undo :data:`set_replica_context`.
reset_replica_context = _current.reset

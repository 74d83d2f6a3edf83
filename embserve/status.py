"""Typed snapshots of a runtime's state, as ``Runtime.status()`` returns them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from embserve.replica import ReplicaState

__all__ = ["DeploymentStatus", "EndpointStatus", "ReplicaStatus", "RuntimeStatus"]


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    """One replica: its id, state, why it is in that state, and its requests in flight."""

    replica_id: str
    state: ReplicaState
    message: str = ""
    ongoing_requests: int = 0
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DeploymentStatus:
    """One deployment.

    ``state`` is ``"UPDATING"`` while replicas start or are replaced, ``"HEALTHY"`` when the
    target number run, ``"UNHEALTHY"`` when they cannot (``message`` says why), ``"DELETING"``
    while it drains away.
    """

    name: str
    state: str
    message: str
    target_replicas: int
    replicas: tuple[ReplicaStatus, ...]
    queued_requests: int = 0
    version: str | None = None

    @property
    def running_replicas(self) -> int:
        """How many replicas are RUNNING."""
        return sum(r.state is ReplicaState.RUNNING for r in self.replicas)


@dataclasses.dataclass(frozen=True)
class EndpointStatus:
    """One endpoint: its route prefix and where its traffic goes."""

    name: str
    route_prefix: str | None
    traffic: Mapping[str, float]
    shadow: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class RuntimeStatus:
    """Everything a runtime holds, at one moment."""

    backend: str
    deployments: Mapping[str, DeploymentStatus]
    endpoints: Mapping[str, EndpointStatus]

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-ready data."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, ReplicaState):
        return value.value
    return value

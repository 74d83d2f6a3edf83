"""Typed snapshots of a runtime's state, as ``Runtime.status()`` returns them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from embserve.replica import ReplicaState

__all__ = [
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "EndpointStatus",
    "ReplicaStatus",
    "RuntimeStatus",
    "ServeStatus",
]


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
        """The snapshot as plain JSON-ready data (the machine form; ``str()`` is for people)."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeStatus:
        """The snapshot back from :meth:`to_dict`'s form (as ``/-/status`` serves it).

        Missing ``message`` fields become ``""`` (the admin page leaves them out) and keys this
        version does not know are ignored, so a newer server's status still reads.
        """
        return cls(
            backend=str(data["backend"]),
            deployments={
                str(name): _deployment_from_dict(d) for name, d in data["deployments"].items()
            },
            endpoints={
                str(name): EndpointStatus(
                    name=str(e["name"]),
                    route_prefix=e.get("route_prefix"),
                    traffic=dict(e.get("traffic", {})),
                    shadow=dict(e.get("shadow", {})),
                )
                for name, e in data["endpoints"].items()
            },
        )

    def __str__(self) -> str:
        """A table a person can read: one line per deployment and per replica (≤ 120 wide)."""
        lines = [_fit(f"backend: {self.backend}")]
        if not self.deployments:
            lines.append("no deployments")
        for name in sorted(self.deployments):
            lines.extend(_deployment_lines(self.deployments[name]))
        for name in sorted(self.endpoints):
            endpoint = self.endpoints[name]
            route = endpoint.route_prefix or "(no route)"
            traffic = ", ".join(f"{d} {share:.0%}" for d, share in endpoint.traffic.items())
            shadow = ", ".join(f"{d} {share:.0%}" for d, share in endpoint.shadow.items())
            extra = f"; shadow {shadow}" if shadow else ""
            lines.append(_fit(f"endpoint {name} {route} -> {traffic}{extra}"))
        return "\n".join(lines)


_WIDTH = 120


def _fit(line: str) -> str:
    return line if len(line) <= _WIDTH else line[: _WIDTH - 3] + "..."


def _deployment_lines(status: DeploymentStatus) -> list[str]:
    version = f" v{status.version}" if status.version else ""
    queued = f", {status.queued_requests} queued" if status.queued_requests else ""
    head = (
        f"{status.name}{version}  {status.state}  "
        f"{status.running_replicas}/{status.target_replicas} running{queued}"
    )
    if status.message:
        head += f"  ({status.message.splitlines()[0]})"
    lines = [_fit(head)]
    for replica in status.replicas:
        where = str(replica.info.get("worker", "")) if replica.info else ""
        gpus = replica.info.get("gpu_ids") if replica.info else None
        if gpus:
            where += f" gpu {','.join(map(str, gpus))}"
        row = (
            f"  {replica.replica_id:<24} {replica.state.value:<18} {where:<28} "
            f"{replica.ongoing_requests} in flight"
        )
        if replica.message:
            row += f"  ({replica.message.splitlines()[0]})"
        lines.append(_fit(row.rstrip()))
    return lines


def _deployment_from_dict(data: Mapping[str, Any]) -> DeploymentStatus:
    return DeploymentStatus(
        name=str(data["name"]),
        state=str(data["state"]),
        message=str(data.get("message", "")),
        target_replicas=int(data["target_replicas"]),
        replicas=tuple(
            ReplicaStatus(
                replica_id=str(r["replica_id"]),
                state=ReplicaState(r["state"]),
                message=str(r.get("message", "")),
                ongoing_requests=int(r.get("ongoing_requests", 0)),
                info=dict(r.get("info") or {}),
            )
            for r in data.get("replicas", ())
        ),
        queued_requests=int(data.get("queued_requests", 0)),
        version=data.get("version"),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, ReplicaState):
        return value.value
    return value


# -- Ray Serve's shape, as embserve.status() returns it --------------------------------------


@dataclasses.dataclass(frozen=True)
class DeploymentStatusOverview:
    """One deployment of an application, in Ray Serve's shape.

    ``status`` is ``"UPDATING"``, ``"HEALTHY"``, ``"UNHEALTHY"`` or ``"DELETING"``;
    ``replica_states`` counts the replicas in each state (``{"RUNNING": 2}``).
    """

    name: str
    status: str
    message: str
    replica_states: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class ApplicationStatusOverview:
    """One application (what ``embserve.run(app, name=...)`` ran), in Ray Serve's shape.

    ``status`` is ``"RUNNING"`` when every deployment is healthy, ``"DEPLOYING"`` while one
    starts or updates, ``"UNHEALTHY"`` when one cannot run (``message`` says why), and
    ``"DELETING"`` while it drains away. ``deployments`` are keyed by their names as written.
    """

    name: str
    status: str
    message: str
    route_prefix: str | None
    deployments: Mapping[str, DeploymentStatusOverview]


@dataclasses.dataclass(frozen=True)
class ServeStatus:
    """What :func:`embserve.status` returns: the applications of the default runtime, and the
    URL its HTTP server listens on (None when none runs)."""

    applications: Mapping[str, ApplicationStatusOverview]
    http_url: str | None = None


def deployment_overview(name: str, status: DeploymentStatus) -> DeploymentStatusOverview:
    """``status`` in Ray Serve's shape, under the name the user gave the deployment."""
    counts: dict[str, int] = {}
    for replica in status.replicas:
        counts[replica.state.value] = counts.get(replica.state.value, 0) + 1
    return DeploymentStatusOverview(name, status.state, status.message, counts)


def application_status(deployments: Mapping[str, DeploymentStatusOverview]) -> tuple[str, str]:
    """An application's status and message, from those of its deployments."""
    states = {d.status for d in deployments.values()}
    messages = [f"{d.name}: {d.message}" for d in deployments.values() if d.message]
    if "UNHEALTHY" in states:
        status = "UNHEALTHY"
    elif "DELETING" in states:
        status = "DELETING"
    elif states <= {"HEALTHY"} and states:
        status = "RUNNING"
    else:
        status = "DEPLOYING"
    return status, "; ".join(messages)
